"""dsv3: an exact, per-layer-configurable re-implementation of DeepSeek-V3's inference model.

    from dsv3 import ModelArgs, Transformer, ConfigError, count_params

Configuration, counting and estimates import without torch; `Transformer` and the checkpoint
functions load it on first use, so the app's page does not wait for torch
(benchmarks/run.py, section app, measures the start-up).
"""

from importlib import import_module
from typing import Any

from .config import ConfigError, LayerArgs, ModelArgs
from .params import count_params, estimate

_LAZY = {
    "Transformer": "model",
    "args_from_hf_config": "checkpoint.hf_config",  # torch-free
    "CheckpointError": "checkpoint",
    "load": "checkpoint",
    "load_hf": "checkpoint",
    "load_reference": "checkpoint",
    "save": "checkpoint",
}

__all__ = ["ConfigError", "LayerArgs", "ModelArgs", "count_params", "estimate", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
