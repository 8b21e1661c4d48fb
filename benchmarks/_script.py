"""`python benchmarks/NAME.py` runs as `python -m benchmarks.NAME`: the scripts import dsv3 and
each other as the package they are, which a plain file run (sys.path[0] = benchmarks/, no
package) cannot."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def run_as_module(file: str) -> None:
    """Run the script `file` as the module benchmarks.<its name> from the repository root, with
    the same arguments, and exit with its status."""
    path = Path(file).resolve()
    sys.path[0] = str(path.parent.parent)  # the repository root, as `python -m` from there
    runpy.run_module(f"benchmarks.{path.stem}", run_name="__main__", alter_sys=True)
    sys.exit()
