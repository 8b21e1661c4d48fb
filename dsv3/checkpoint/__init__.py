"""Checkpoints: dsv3's own safetensors files, Hugging Face DeepSeek-V2/V3 checkpoints, and the
DeepSeek reference format (`inference/convert.py` output).

    save(model, "m.safetensors")            one file: state_dict + args/dtype metadata
    load("m.safetensors", device, dtype)    -> Transformer, bit-identical to what was saved
    load_hf("dir/", device, dtype)          config.json + model.safetensors or shards
    load_reference("dir/", args, ...)       model{rank}-mp{N}.safetensors, any N
    load_sharded(path, args, world, rank)   one rank's state dict of a sharded model

Only safetensors and JSON are ever read. PyTorch pickles (.bin/.pt/.pth/.pkl, or a pickle
renamed .safetensors) are refused with `CheckpointError` and never unpickled: unpickling runs
arbitrary code. Every file header is checked (and truncation detected) before any tensor is read.

Loading builds the model on the meta device, moves it to `device` with `to_empty`, then copies the
checkpoint in one tensor (or one expert) at a time, so peak memory is about the model's size.
Names, coverage and shapes are all checked before any data is read: missing, unexpected or
mis-shaped tensors raise `CheckpointError` listing the first few by name, with counts.
When the checkpoint dtype differs from the requested one, weights are cast, or fp8
(de)quantised block by block.

Modules: `hf_config` (config.json <-> ModelArgs), `reader` (the validated reader), `plan`
(pieces: validate, then copy), `native`, `hf`, `sharded` (the formats). Tensor names come from
the one table in `dsv3.names`.
"""

from importlib import import_module
from typing import Any

from .hf_config import args_from_hf_config, fetch_hf_config, hf_config_from_args, read_hf_config

# The rest needs torch: imported on first use, so that config translation (`hf_config`, also
# `dsv3.args_from_hf_config`) stays torch-free.
_LAZY = {
    "dsv3_to_hf_state_dict": "hf",
    "hf_to_dsv3_state_dict": "hf",
    "load_hf": "hf",
    "FORMAT_VERSION": "native",
    "load": "native",
    "save": "native",
    "saved_args": "native",
    "CheckpointError": "reader",
    "load_reference": "sharded",
    "load_sharded": "sharded",
}

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "args_from_hf_config",
    "dsv3_to_hf_state_dict",
    "fetch_hf_config",
    "hf_config_from_args",
    "hf_to_dsv3_state_dict",
    "load",
    "load_hf",
    "load_reference",
    "load_sharded",
    "read_hf_config",
    "save",
    "saved_args",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsv3.checkpoint' has no attribute {name!r}")
