"""Every setting of the app, read once from the environment (all optional).

The library reads two more on its own, at call time: `DSV3_MEMORY_LIMIT` (the budget of one
build or run, `dsv3.memory`) and `DSV3_KEEP_FREED_MEMORY` (glibc tuning, `dsv3.memory`).
"""

from __future__ import annotations

import os

from dsv3.memory import parse_bytes


def _size(name: str, default: str | None) -> int | None:
    text = os.environ.get(name) or default
    return parse_bytes(text) if text else None


HOST = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
PORT = int(os.environ.get("GRADIO_SERVER_PORT", 7860))
# `user:password` login for the page and the API.
AUTH: tuple[str, str] | None = (
    tuple(os.environ["DSV3_AUTH"].split(":", 1))  # type: ignore[assignment]
    if ":" in os.environ.get("DSV3_AUTH", "")
    else None
)
# Largest weights download / upload.
EXPORT_LIMIT: int = _size("DSV3_EXPORT_LIMIT", "2GiB")  # type: ignore[assignment]
IMPORT_LIMIT: int = _size("DSV3_IMPORT_LIMIT", "2GiB")  # type: ignore[assignment]
# Cap on what all sessions' models hold together; None = only the device's free memory counts.
SERVER_MEMORY: int | None = _size("DSV3_SERVER_MEMORY", None)
# Seconds an idle session keeps its model.
SESSION_TTL_S = float(os.environ.get("DSV3_SESSION_TTL", 1800))
# Key for configs saved in the browser (fix it so they survive restarts).
BROWSER_SECRET = os.environ.get("DSV3_BROWSER_SECRET", "dsv3-playground-local-presets")
