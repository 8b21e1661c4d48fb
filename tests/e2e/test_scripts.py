"""The benchmark scripts run as files too (`python benchmarks/run.py --gpu`, as issue texts and
users write them), not only as modules, and without a GPU say so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
@pytest.mark.parametrize(
    "script, says",
    [
        ("gpu_check.py", "gpu_check: no CUDA device"),
        ("gpu_profile.py", "gpu_profile: no CUDA device; nothing measured."),
    ],
)
def test_gpu_scripts_as_files_say_no_gpu_in_one_line(tmp_path, cwd, script, says):
    path = ROOT / "benchmarks" / script
    where = ROOT if cwd == "root" else tmp_path
    run = subprocess.run(
        [sys.executable, str(path.relative_to(ROOT) if cwd == "root" else path)],
        cwd=where, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [run.stdout.strip()]
    assert run.stdout.startswith(says) and "Traceback" not in run.stderr


def test_run_py_as_a_file_takes_its_arguments():
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--gpu", "--only", "gpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| GPU section | not measured (no GPU) |" in run.stdout
    assert "Traceback" not in run.stderr
