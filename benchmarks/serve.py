"""Start and stop a web app on a free loopback port: `python app.py` for the load test and the
benchmark's app section, or any other command (the benchmark's minimal Gradio app)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    cmd: list[str] | None = None, env: dict | None = None, timeout: float = 180
) -> tuple[subprocess.Popen, float, str]:
    """Start `cmd` (default `python app.py`) from the repository root with GRADIO_SERVER_PORT a
    free port (and `env` added); returns (process, seconds to first page, url) once the page
    answers 200."""
    cmd = cmd or [sys.executable, "app.py"]
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        **(env or {}),
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0, url
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{cmd} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
