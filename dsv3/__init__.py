"""dsv3: an exact, per-layer-configurable re-implementation of DeepSeek-V3's inference model.

from dsv3 import ModelArgs, Transformer, ConfigError, count_params
"""

from .checkpoint import CheckpointError, load, load_hf, load_reference, save
from .config import ConfigError, LayerArgs, ModelArgs
from .model import Transformer
from .params import count_params, estimate

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LayerArgs",
    "ModelArgs",
    "Transformer",
    "count_params",
    "estimate",
    "load",
    "load_hf",
    "load_reference",
    "save",
]
