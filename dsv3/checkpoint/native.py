"""dsv3's own checkpoint: one .safetensors file holding the state_dict under dsv3 names, with the
ModelArgs, the build dtype and the format version in its metadata."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError, ModelArgs
from ..model import Transformer
from ..names import scale_name
from .plan import Piece, empty_model, fill, targets_of
from .reader import PICKLE_SUFFIXES, CheckpointError, Source

__all__ = ["FORMAT_VERSION", "load", "save"]

FORMAT_VERSION = 1  # of dsv3's own file: bump when its names or metadata change meaning
_META_VERSION, _META_ARGS, _META_DTYPE = "dsv3.format_version", "dsv3.args", "dsv3.dtype"


def save(model: Transformer, path: str | os.PathLike) -> Path:
    """Write `model` to one .safetensors file: its state_dict under dsv3 names plus metadata
    (ModelArgs JSON, the build dtype name, the format version). Written to a temporary file
    then renamed, so an interrupted save never leaves a truncated checkpoint behind."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name}: dsv3 checkpoints are .safetensors files")
    if model.device.type == "meta":
        raise CheckpointError("a model built on meta has no weights to save; build it on cpu/cuda")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": "pt",
        _META_VERSION: str(FORMAT_VERSION),
        _META_ARGS: model.args.to_json(),
        _META_DTYPE: model.dtype_name,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def saved_args(path: str | os.PathLike) -> ModelArgs | None:
    """The ModelArgs a file saved by `save` carries in its metadata; None for a safetensors file
    of another format. Reads the (validated) header only."""
    path = Path(path)
    with Source([path]) as src:
        meta = src.metadata
    if _META_ARGS not in meta:
        return None
    try:
        return ModelArgs.from_json(meta[_META_ARGS])
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}", field=e.field, layer=e.layer) from None


def load(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Rebuild a model saved by `save`. With dtype None it is rebuilt in the saved dtype,
    bit-identical (fp8 scales included); another dtype casts or (de)quantises on load."""
    path = Path(path)
    with Source([path]) as src:
        meta = src.metadata
        if _META_ARGS not in meta:
            raise CheckpointError(
                f"{path.name}: not a dsv3 checkpoint (no {_META_ARGS} metadata); use load_hf for "
                f"Hugging Face checkpoints or load_reference for DeepSeek's convert.py output"
            )
        version = meta.get(_META_VERSION, "?")
        if version != str(FORMAT_VERSION):
            raise CheckpointError(
                f"{path.name}: dsv3 checkpoint format {version!r}; this version reads "
                f"{FORMAT_VERSION}"
            )
        try:
            args = ModelArgs.from_json(meta[_META_ARGS])
        except ConfigError as e:
            raise ConfigError(f"{path.name}: {e}", field=e.field, layer=e.layer) from None
        model = empty_model(args, device, dtype if dtype is not None else meta.get(_META_DTYPE))
        names = set(src.keys())
        scales = {scale_name(n) for n in names} & names
        pieces = [
            Piece(name, name, scale=scale_name(name) if scale_name(name) in names else None)
            for name in src.keys()
            if name not in scales  # a scale travels with its weight
        ]
        fill(targets_of(model), pieces, src, [], label=path.name, scale_fmt=args.scale_fmt)
    return model.eval()
