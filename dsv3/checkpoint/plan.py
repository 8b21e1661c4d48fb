"""The copy plan: which source tensor (or slice) goes to which model tensor (or slice), checked
as a whole before any data is read (`validate`), then copied one piece at a time (`copy`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import BLOCK_SIZE, ModelArgs
from ..layers import FP8, dequantize, quantize_fp8
from ..model import Transformer
from ..names import scale_name
from .reader import CheckpointError, Source

__all__ = ["Piece", "copy", "empty_model", "fill", "targets_of", "validate"]


@dataclass
class Piece:
    """One source tensor (or a slice of it) going to one target tensor (or a slice of it)."""

    src: str
    dst: str
    dst_index: tuple = ()  # into the target: (e,) for expert e, slices for model-parallel shards
    src_index: tuple = ()  # into the source: e.g. the gate half of a fused gate_up_proj
    scale: str | None = None  # source name of the fp8 block scale of this piece, if any
    rows: torch.Tensor | None = None  # a row permutation applied to the source (rope layout)


def index_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta")[index].shape) if index else tuple(shape)


def scale_index(index: tuple, ndim: int, read: bool = False) -> tuple:
    """Index of a weight slice -> index of its block scale (slices of the last two dims in
    units of 128). A slice written to must start on a block boundary to carry its own scale;
    a slice read (`read`) may also lie inside one block, whose scale it shares."""
    out = []
    for d, ix in enumerate(index):
        if isinstance(ix, slice) and d >= ndim - 2 and ix != slice(None):
            start, stop = ix.start or 0, ix.stop
            inside = read and stop is not None and start // BLOCK_SIZE == (stop - 1) // BLOCK_SIZE
            if start % BLOCK_SIZE and not inside:
                raise CheckpointError(
                    f"fp8 shard boundary at {start} is not a multiple of the {BLOCK_SIZE} block"
                )
            ix = slice(start // BLOCK_SIZE, None if stop is None else -(-stop // BLOCK_SIZE))
        out.append(ix)
    return tuple(out)


def is_fp8(dtype: str) -> bool:
    """A safetensors ("F8_E4M3") or torch ("torch.float8_e4m3fn") dtype name of an fp8 type."""
    return dtype.startswith("F8_") or dtype.startswith("torch.float8")


def _summary(kind: str, names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n]) + (", ..." if len(names) > n else "")
    return f"{len(names)} {kind} ({shown})"


def fill(
    targets: dict[str, torch.Tensor],
    pieces: list[Piece],
    src: Source,
    unexpected: list[str],
    label: str,
    scale_fmt: str | None = None,
) -> None:
    """Check `pieces` against `targets` (dsv3 name -> destination tensor), then copy them: every
    check runs before any data is read. `scale_fmt`: the model's (`ModelArgs.scale_fmt`), for
    weights quantised on the way."""
    validate(targets, pieces, src, unexpected, label)
    copy(targets, pieces, src, scale_fmt)


def validate(
    targets: dict[str, torch.Tensor],
    pieces: list[Piece],
    src: Source,
    unexpected: list[str],
    label: str,
) -> None:
    """Raise `CheckpointError` listing every missing, unexpected and mis-shaped tensor (names,
    shapes, fp8 scale shapes and block boundaries, coverage of every target); reads no data."""
    unexpected = list(unexpected)
    mismatched: list[str] = []
    covered: dict[str, int] = {}
    experts: dict[str, set[int]] = {}  # stacked-expert targets: which experts arrived
    seen: set[tuple[str, str]] = set()
    used_scales = set()
    for p in pieces:
        if p.dst not in targets:
            if math.prod(src.shape(p.src)) == 0:
                continue  # HF keeps zero-size shared experts when there are none
            unexpected.append(p.src)
            continue
        if p.scale is not None:
            used_scales.add(p.scale)
        key = (p.dst, repr(p.dst_index))
        if key in seen:
            mismatched.append(f"{p.src}: a second tensor for {p.dst}{list(p.dst_index)}")
            continue
        seen.add(key)
        want = index_shape(tuple(targets[p.dst].shape), p.dst_index)
        got = index_shape(src.shape(p.src), p.src_index)
        if got != want:
            mismatched.append(f"{p.src}: checkpoint {list(got)} vs model {list(want)}")
            continue
        if p.scale is not None:
            s_want = (*got[:-2], *(-(-d // BLOCK_SIZE) for d in got[-2:]))
            try:  # the scale blocks of the source slice
                s_got = index_shape(
                    src.shape(p.scale), scale_index(p.src_index, len(got), read=True)
                )
            except CheckpointError as e:
                mismatched.append(f"{p.src}: {e}")
                continue
            if s_got != s_want:
                mismatched.append(f"{p.scale}: checkpoint {list(s_got)} vs expected {list(s_want)}")
                continue
            if p.rows is not None:
                mismatched.append(f"{p.src}: fp8 rows cannot be re-ordered (rope_interleave false)")
                continue
        elif is_fp8(src.dtype(p.src)):
            mismatched.append(f"{p.src}: fp8 tensor without a block scale")
            continue
        if targets[p.dst].dtype == FP8 and scale_name(p.dst) in targets:
            try:  # a shard of an fp8 weight must start on a block boundary to carry its scale
                scale_index(p.dst_index, targets[p.dst].dim())
            except CheckpointError as e:
                mismatched.append(f"{p.src}: {e}")
                continue
        covered[p.dst] = covered.get(p.dst, 0) + math.prod(want)
        if p.dst_index and isinstance(p.dst_index[0], int):
            experts.setdefault(p.dst, set()).add(p.dst_index[0])
    own_names = sorted(set(unexpected) & set(targets))
    if own_names and not covered:
        # Every tensor is unexpected and some carry the model's own names: a file saved by
        # dsv3 read as another format. Say that, rather than list one name as both missing
        # and unexpected.
        raise CheckpointError(
            f"{label} holds tensors under dsv3's own names ({', '.join(own_names[:3])}, ...), "
            "not this format's: it is a file saved by dsv3 (the app's export); load it with "
            "dsv3.load, or upload it alone in the app",
            unexpected=sorted(unexpected),
        )
    missing = []
    for name, t in targets.items():
        if name.endswith("scale") and name[: -len("_scale")] in targets:
            continue  # stacked experts' scales come with their weights
        if name.endswith(".scale") and name[: -len("scale")] + "weight" in targets:
            continue  # so do Linear scales
        done = covered.get(name, 0)
        if done == 0:
            missing.append(name)
        elif done < t.numel() and name in experts:
            absent = sorted(set(range(t.shape[0])) - experts[name])
            shown = ", ".join(map(str, absent[:8])) + (", ..." if len(absent) > 8 else "")
            missing.append(f"{name} (expert {shown} of {t.shape[0]})")
        elif done < t.numel():
            missing.append(f"{name} ({done} of {t.numel()} values)")
    # Scales that went with no weight are unexpected too.
    scale_like = {p.scale for p in pieces if p.scale}
    unexpected += [s for s in scale_like if s not in used_scales and s not in unexpected]
    if missing or unexpected or mismatched:
        parts = [
            _summary(kind, names)
            for kind, names in (
                ("missing", missing),
                ("unexpected", sorted(unexpected)),
                ("mis-shaped", mismatched),
            )
            if names
        ]
        raise CheckpointError(
            f"{label} does not fit the model: " + "; ".join(parts),
            missing=missing,
            unexpected=sorted(unexpected),
            mismatched=mismatched,
        )


def copy(
    targets: dict[str, torch.Tensor],
    pieces: list[Piece],
    src: Source,
    scale_fmt: str | None = None,
) -> None:
    """Copy validated `pieces` into `targets`, one source tensor (slice) at a time.
    Conversions: float -> float casts; fp8 -> fp8 copies weight and scale; fp8 -> float
    dequantises; float -> fp8 quantises (per piece)."""
    with torch.no_grad():
        for p in pieces:
            if p.dst not in targets:
                continue
            dst = targets[p.dst]
            t = src.get(p.src, p.src_index)
            s_src = scale_index(p.src_index, t.dim(), read=True) if p.scale is not None else ()
            if p.rows is not None:
                t = t[p.rows]
            scale_dst = targets.get(scale_name(p.dst))
            if dst.dtype == FP8 and scale_dst is not None:
                s_index = scale_index(p.dst_index, dst.dim())
                if t.dtype == FP8 and p.scale is not None:
                    dst[p.dst_index].copy_(t)
                    scale_dst[s_index].copy_(src.get(p.scale, s_src))
                else:
                    if p.scale is not None:  # fp8 without our scale layout: go through float
                        t = dequantize(t, src.get(p.scale, s_src), torch.float32)
                    q, s = quantize(t, scale_fmt)
                    dst[p.dst_index].copy_(q)
                    scale_dst[s_index].copy_(s)
            elif p.scale is not None:
                dst[p.dst_index].copy_(dequantize(t, src.get(p.scale, s_src), dst.dtype))
            else:
                dst[p.dst_index].copy_(t)


def quantize(t: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8 over a (..., out, in) tensor, one matrix at a time to bound temp memory."""
    if t.dim() == 2:
        return quantize_fp8(t, scale_fmt)
    qs, ss = zip(*(quantize(m, scale_fmt) for m in t))
    return torch.stack(qs), torch.stack(ss)


def empty_model(args: ModelArgs, device: Any, dtype: Any) -> Transformer:
    """A model with allocated but unset weights: every value gets written by `fill`, so
    random init (seconds to minutes for big models) is skipped."""
    # One full (unsharded) model even inside a process group: sharded loads go through
    # dsv3.parallel.load_sharded.
    model = Transformer(args, device="meta", dtype=dtype, world_size=1, rank=0)
    model.to_empty(device=device if device is not None else torch.get_default_device())
    model.reset_cache()
    return model


def targets_of(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors by name; writing into them writes the model (shared storage)."""
    return dict(model.state_dict(keep_vars=True))
