"""The real app, launched once in this process for every end-to-end test (HTTP and browser)."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def url():
    import torch

    import app  # building the page must neither launch it nor touch CUDA
    from ui.layout import launch_kwargs

    assert not app.demo.is_running and not torch.cuda.is_initialized()
    port = free_port()
    app.demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.demo.close()
