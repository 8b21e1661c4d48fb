"""Start-up: the page is built without torch (it loads after the page is served)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_app_builds_the_page_without_torch():
    code = "import sys, app; assert app.demo is not None; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_config_and_estimates_import_without_torch():
    code = (
        "import sys, dsv3; from dsv3 import presets, memory; "
        "dsv3.estimate(presets.load('deepseek-v3-671b'), 'fp8'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
