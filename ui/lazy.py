"""`runtime`: ui.runtime imported on first attribute access. It pulls in torch (about 1.3 s);
the page needs it only at the first build, so `python app.py` serves sooner."""

from __future__ import annotations

import importlib
from typing import Any


class _OnFirstUse:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


runtime: Any = _OnFirstUse("ui.runtime")
