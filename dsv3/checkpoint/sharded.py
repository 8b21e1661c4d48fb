"""DeepSeek's per-rank files and sharded loads, through one piece builder (`_rank_pieces`):

- `load_reference`: convert.py's `model{rank}-mp{N}.safetensors` joined into one full model;
- `load_sharded`: rank r's state dict of a `world_size`-way model, read from full files or from
  per-rank files of any N, touching only the slices that rank holds.

Both read through the validated reader (`Source`) and are checked as a whole before any data is
read (`plan.validate`). Split dimensions come from the one name table (`dsv3.names`); routed
experts are not split: rank r holds experts [r*E/N, (r+1)*E/N).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelArgs
from ..dist.comm import resolve_world
from ..dist.plan import check_shardable, local_index, split_widths
from ..layers import FP8
from ..model import Transformer
from ..names import from_mtp, layer_of, mtp_copy, per_expert, placement, scale_name, to_mtp
from .plan import Piece, empty_model, fill, targets_of
from .reader import Source, checkpoint_files

__all__ = ["load_reference", "load_sharded"]

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": FP8,
    "I64": torch.int64,
    "I32": torch.int32,
}


def _weight_of(name: str) -> str:
    """The weight an fp8 scale goes with (`X.scale` -> `X.weight`, `experts.w1_scale` ->
    `experts.w1`), or "" for names that are not scales."""
    if name.endswith(".scale"):
        return name[: -len("scale")] + "weight"
    return name[: -len("_scale")] if name.endswith("_scale") else ""


def _prefix(key: str, mp: int | None) -> str:
    """The "r:" rank prefix of a per-rank file's key ("" for full files)."""
    return key.split(":", 1)[0] + ":" if mp else ""


def _rank_pieces(
    src: Source,
    mp: int | None,
    args: ModelArgs,
    world_size: int,
    rank: int,
    rename: Callable[[str], str | None] | None = None,
    skip_layers: bool = False,
) -> tuple[list[Piece], list[str]]:
    """Pieces of rank `rank`'s tensors (of a `world_size`-way model) from `src`: full tensors
    (mp None, one file or several) or convert.py's per-rank files (keys "r:name", mp ranks).
    `rename` maps checkpoint names to dsv3's (None skips one); `skip_layers` drops layers
    past the model's MTP modules (n_layers + n_mtp_layers..). Layers n_layers.. go to the MTP
    modules (`mtp.N.`), their copies of the embedding and head skipped. Returns (pieces,
    unexpected names)."""
    widths = split_widths(args)
    widths.update({from_mtp(k): v for k, v in widths.items()})  # MTP weights by layer name too
    n_all = args.n_layers + args.n_mtp_layers
    by_name: dict[str, list[str]] = {}  # reference name -> its source keys in rank order
    for key in src.keys():
        name = key.split(":", 1)[1] if mp else key
        name = rename(name) if rename is not None else name
        if name is None or (skip_layers and (layer_of(name) or 0) >= n_all):
            continue
        if mtp_copy(name) is not None and (layer_of(name) or 0) >= args.n_layers:
            continue  # an MTP layer's copy of the embedding/head: the model shares its own
        by_name.setdefault(name, []).append(key)
    names = {(_prefix(k, mp), n) for n, keys in by_name.items() for k in keys}
    pieces: list[Piece] = []
    unexpected: list[str] = []

    def scale_of(key: str, name: str) -> str | None:
        prefix = _prefix(key, mp)
        if (prefix, scale_name(name)) not in names:
            return None
        return next(k for k in by_name[scale_name(name)] if k.startswith(prefix))

    for name, keys in by_name.items():
        if _weight_of(name) in by_name:
            continue  # a scale goes with its weight
        expert = per_expert(name)
        if expert is not None:  # whole experts, each on one rank
            if name.endswith(".scale"):
                unexpected += keys  # a scale without its weight
                continue
            stacked, e = expert
            for key in keys:
                if local_index(name, src.shape(key), args, world_size, rank, widths) is None:
                    continue
                first = rank * (args.for_layer(layer_of(name)).n_routed_experts // world_size)
                pieces.append(Piece(key, stacked, (e - first,), scale=scale_of(key, name)))
            continue
        kind, dim = placement(name)
        if not mp or mp == 1 or kind != "split":  # a full tensor (per-rank files repeat these)
            key = keys[0]
            index = local_index(name, src.shape(key), args, world_size, rank, widths)
            pieces.append(Piece(key, name, src_index=index or (), scale=scale_of(key, name)))
            continue
        if len(keys) != mp:
            unexpected.append(f"{name} (only on {len(keys)} of {mp} ranks)")
            continue
        # The full tensor is the per-rank pieces concatenated along `dim`; take this rank's rows.
        sizes = [src.shape(k)[dim] for k in keys]
        full = list(src.shape(keys[0]))
        full[dim] = sum(sizes)
        index = local_index(name, tuple(full), args, world_size, rank, widths)
        want = index[dim] if index else slice(0, full[dim])
        pre, offset = (slice(None),) * dim, 0
        for key, size in zip(keys, sizes):
            lo, hi = max(want.start, offset), min(want.stop, offset + size)
            if lo < hi:
                src_index = (*pre, slice(lo - offset, hi - offset))
                dst_index = (*pre, slice(lo - want.start, hi - want.start))
                pieces.append(Piece(key, name, dst_index, src_index, scale=scale_of(key, name)))
            offset += size
    for p in pieces:  # checkpoint layer n_layers + k is MTP module `mtp.{n_layers + k}`
        p.dst = to_mtp(p.dst, args.n_layers)
    return pieces, unexpected


def load_reference(
    path: str | os.PathLike,
    args: ModelArgs,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Load DeepSeek's own format (`inference/convert.py` output): a directory of
    `model{rank}-mp{N}.safetensors`, or one such file. Shards are joined along the dims
    convert.py split them (`dsv3.names.SPLIT_DIM`) and the experts of all ranks are united.
    The reference format carries no config: pass the `args` it was made for. dtype None gives
    "fp8" when the files hold fp8 scales, else "bf16"."""
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
    files, mp = checkpoint_files(Path(path), per_rank=True)
    mp = mp or 1
    with Source(files, prefixes=[f"{r}:" for r in range(mp)]) as src:
        if dtype is None:
            dtype = "fp8" if any(k.endswith(".scale") for k in src.keys()) else "bf16"
        model = empty_model(args, device, dtype)
        pieces, unexpected = _rank_pieces(src, mp, args, 1, 0)
        fill(
            targets_of(model),
            pieces,
            src,
            unexpected,
            label=Path(path).name,
            scale_fmt=args.scale_fmt,
        )
    return model.eval()


def load_sharded(
    path: str | os.PathLike,
    args: ModelArgs,
    world_size: int | None = None,
    rank: int | None = None,
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict read from safetensors, touching only its slices:

    - a file, or a directory of files, holding full tensors (dsv3's own files, a plain
      state_dict; with `rename`, a checkpoint whose names map one to one onto dsv3's, e.g. an
      HF checkpoint through `dsv3.names.hf_to_dsv3`; `rename` returns None to skip a key);
    - a directory of the reference's `model{rank}-mp{M}.safetensors` (convert.py output): for
      M == world_size each rank reads its own file; for another M the rank's range is read from
      the shards that cover it.
    Returns the keys, shapes and the files' dtypes of the sharded model's state_dict (experts
    stacked), every tensor checked; load it with `model.load_state_dict(sd)`. Layers past
    the model's MTP modules (>= n_layers + n_mtp_layers) are skipped."""
    world_size, rank = resolve_world(world_size, rank)
    files, mp = checkpoint_files(Path(path))
    prefixes = [f"{r}:" for r in range(mp)] if mp else None
    with Source(files, prefixes=prefixes) as src:
        fp8 = any(src.dtype(k) == "F8_E4M3" for k in src.keys())
        check_shardable(args, world_size, "fp8" if fp8 else None)
        pieces, unexpected = _rank_pieces(src, mp, args, world_size, rank, rename, True)
        meta = Transformer(args, "meta", "fp8" if fp8 else "fp32", world_size=world_size, rank=rank)
        dtypes = {p.dst: _TORCH_DTYPES.get(src.dtype(p.src)) for p in pieces}
        targets = {}
        for name, t in targets_of(meta).items():  # the files' dtypes; scales stay float32
            targets[name] = torch.empty(t.shape, dtype=dtypes.get(name) or t.dtype)
        fill(targets, pieces, src, unexpected, label=Path(path).name)
    return targets
