"""Tensor and expert parallelism across torch.distributed ranks, split as the reference does.

With `world_size` N ranks, rank r of `Transformer(args, world_size=N, rank=r)` holds:

| tensors                                         | on rank r                                |
|-------------------------------------------------|------------------------------------------|
| embed.weight, head.weight (vocab, dim)          | vocab rows [r*V/N, (r+1)*V/N)            |
| wq, wq_b, wkv_b (column parallel)               | its n_heads/N heads' output rows         |
| wo (row parallel)                               | the input columns of its heads           |
| dense and shared-expert w1, w3 / w2             | width/N output rows / input columns      |
| routed experts (stacked, E first)               | experts [r*E/N, (r+1)*E/N)               |
| wq_a, wkv_a, q_norm, kv_norm, gate, norms       | everything (replicated)                  |

Forward: the embedding looks up the ids of its vocab slice and zeros the rest, then all-reduces;
attention runs on the local heads; every layer's attention output and feed-forward output is a
partial sum (row-parallel wo/w2, local experts only: tokens routed elsewhere add zero here) and is
all-reduced once; the head computes its vocab slice of the logits and all-gathers them. The
router is replicated, so every rank picks the same experts. The reference all-reduces the routed
and the shared experts separately; one all-reduce of their sum is the same number.

Fp8 block scales are split with their weights; a shard must start on a 128 block boundary or sit
inside one block, so that its scales are a slice of the full model's (`check_shardable`).

`SPLIT_DIM` (module name -> dimension split) is the one table of how tensors are split; it equals
the mapping of the reference's `convert.py`. `shard_state_dict` applies it to a full state dict,
`load_sharded` reads only a rank's slices of safetensors files (full files, dsv3's own files, or
the reference's per-rank `model{rank}-mp{N}.safetensors` for any N), and a sharded model's random
init equals the matching slices of the single-process model built from the same seed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import BLOCK_SIZE, ConfigError, LayerArgs, ModelArgs
from .layers import FP8, Linear
from .sharding import _PER_EXPERT, SPLIT_DIM, _placement, reference_files

__all__ = [
    "SPLIT_DIM",
    "ParallelEmbedding",
    "ParallelHead",
    "all_reduce",
    "check_shardable",
    "init_process_group_from_env",
    "load_sharded",
    "local_index",
    "param_bytes",
    "resolve_world",
    "shard_state_dict",
]


# ---------------------------------------------------------------------- world and checks
def resolve_world(world_size: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world_size, rank): the arguments when given, else the initialised process group's,
    else (1, 0). A world_size different from the process group's (a meta build of another
    layout) defaults rank to 0."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        same = initialised and dist.get_world_size() == world_size
        rank = dist.get_rank() if same else 0
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be an integer >= 1", field="world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank={rank!r} is out of range; allowed: 0..{world_size - 1}", field="rank"
        )
    return world_size, rank


def _fp8_splits(local: int, world_size: int) -> bool:
    """Whether each rank's `local` rows map onto the full tensor's 128-row scale blocks: a shard
    starts on a block boundary or lies inside one block."""
    return all(
        r * local % BLOCK_SIZE == 0
        or r * local // BLOCK_SIZE == (r * local + local - 1) // BLOCK_SIZE
        for r in range(world_size)
    )


def check_shardable(args: ModelArgs, world_size: int, dtype: Any = None) -> None:
    """Raise `ConfigError` naming the field and layer when `args` cannot be split over
    `world_size` ranks: vocab_size, every layer's n_heads, a dense layer's inter_dim, an MoE
    layer's n_routed_experts and shared width (n_shared_experts * moe_inter_dim) must divide.
    With dtype "fp8", each split width must also keep its 128-blocks whole (see `_fp8_splits`)."""
    n = world_size
    if n == 1:
        return
    fp8 = dtype in ("fp8", FP8)

    def field_and_layer(la: LayerArgs | None, names: tuple[str, ...]) -> tuple[str, int | None]:
        """The field to name: the first of `names` this layer overrides (with the layer), else
        the first, global (layer None)."""
        explicit = set(args.layer_config.get(la.layer_id, {})) if la is not None else set()
        for f in names:
            if f in explicit:
                return f, la.layer_id
        return names[0], None

    def fail(names: tuple[str, ...], what: str, la: LayerArgs | None) -> None:
        name, layer = field_and_layer(la, names)
        where = "" if la is None else f" in layer {la.layer_id}"
        raise ConfigError(
            f"{what}{where} does not split over world_size={n} ranks; allowed: a multiple of {n}",
            field=name,
            layer=layer,
        )

    def fail_fp8(names: tuple[str, ...], what: str, local: int, la: LayerArgs) -> None:
        name, layer = field_and_layer(la, names)
        raise ConfigError(
            f"fp8 over world_size={n}: {what} gives {local} rows per rank in layer "
            f"{la.layer_id}, and some rank's rows cross a {BLOCK_SIZE}-row scale block; each "
            f"shard must start on a block boundary or lie inside one block so that its fp8 "
            f"scales are the full model's (a multiple of {BLOCK_SIZE} rows per rank works)",
            field=name,
            layer=layer,
        )

    if args.vocab_size % n:
        fail(("vocab_size",), f"vocab_size={args.vocab_size}", None)
    heads = ("n_heads", "qk_nope_head_dim", "v_head_dim")
    for la in args.layers():
        if la.n_heads % n:
            fail(("n_heads",), f"n_heads={la.n_heads}", la)
        h = la.n_heads // n
        if fp8:
            for local, what in (
                (h * la.qk_head_dim, "wq/wq_b (n_heads * qk_head_dim)"),
                (h * (la.qk_nope_head_dim + la.v_head_dim), "wkv_b"),
                (h * la.v_head_dim, "wo (n_heads * v_head_dim)"),
            ):
                if not _fp8_splits(local, n):
                    fail_fp8(heads, what, local, la)
        if la.ffn == "dense":
            if la.inter_dim % n:
                fail(("inter_dim",), f"inter_dim={la.inter_dim}", la)
            if fp8 and not _fp8_splits(la.inter_dim // n, n):
                fail_fp8(("inter_dim",), f"inter_dim={la.inter_dim}", la.inter_dim // n, la)
            continue
        if la.n_routed_experts % n:
            fail(("n_routed_experts",), f"n_routed_experts={la.n_routed_experts}", la)
        width = la.n_shared_experts * la.moe_inter_dim
        shared = ("moe_inter_dim", "n_shared_experts")
        what = f"the shared-expert width n_shared_experts * moe_inter_dim = {width}"
        if width % n:
            fail(shared, what, la)
        if fp8 and width and not _fp8_splits(width // n, n):
            fail_fp8(shared, what, width // n, la)


# ---------------------------------------------------------------------- communication
def _require_group(world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"this model is sharded over {world_size} ranks: its forward needs "
            f"torch.distributed initialised with {world_size} processes (e.g. torchrun "
            f"--nproc-per-node {world_size}); build with world_size=1 for one process"
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"model sharded over {world_size} ranks, process group has {dist.get_world_size()}"
        )


def all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum `x` over the ranks, in place (a no-op for one rank and on the meta device)."""
    if world_size == 1 or x.device.type == "meta":
        return x
    _require_group(world_size)
    dist.all_reduce(x)
    return x


class ParallelEmbedding(nn.Module):
    """Rank r's vocab rows [r*V/N, (r+1)*V/N) of the embedding; ids elsewhere look up zero here
    and get their row from the rank holding it through the all-reduce."""

    def __init__(
        self, vocab_size: int, dim: int, world_size: int, rank: int, dtype=None, device=None
    ):
        super().__init__()
        self.vocab_size, self.dim, self.world_size = vocab_size, dim, world_size
        self.part = vocab_size // world_size
        self.start = rank * self.part
        self.weight = nn.Parameter(
            torch.empty(self.part, dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.part)  # (B, S)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, S, D)
        y = y.masked_fill(outside[..., None], 0)
        return all_reduce(y, self.world_size)

    def extra_repr(self) -> str:
        return f"{self.start}..{self.start + self.part - 1} of {self.vocab_size}, {self.dim}"


class ParallelHead(Linear):
    """The output head's vocab slice on this rank; the forward all-gathers full logits."""

    def __init__(self, dim: int, vocab_size: int, world_size: int, dtype=None, device=None):
        super().__init__(dim, vocab_size // world_size, dtype=dtype, device=device)
        self.vocab_size, self.world_size = vocab_size, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (..., V/N)
        if x.device.type == "meta":
            return y.new_empty(*y.shape[:-1], self.vocab_size)
        _require_group(self.world_size)
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts, dim=-1)  # (..., V)


def init_process_group_from_env(device_type: str = "auto") -> tuple[int, int, int]:
    """Under torchrun (env WORLD_SIZE > 1, RANK, LOCAL_RANK, MASTER_ADDR/PORT) initialise the
    default process group, nccl for CUDA and gloo for CPU. Returns (world_size, rank, local_rank);
    (1, 0, 0) without such an environment. Already initialised groups are reused."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return dist.get_world_size(), dist.get_rank(), local
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, 0
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    cuda = device_type == "cuda" or (device_type == "auto" and torch.cuda.is_available())
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} needs its own GPU but {torch.cuda.device_count()} are "
                f"visible: start at most that many processes per node, or use --device cpu"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank(), local


# ---------------------------------------------------------------------- which slice
def _block_slice(start: int, length: int, name: str) -> slice:
    """Scale blocks of weight rows [start, start+length): local block k starts at row
    start + 128k and must lie inside one full-model block."""
    first, last = start // BLOCK_SIZE, (start + length - 1) // BLOCK_SIZE
    n_local = -(-length // BLOCK_SIZE)
    if start % BLOCK_SIZE == 0 or first == last:
        return slice(first, first + n_local)
    raise ValueError(
        f"{name}: fp8 shard rows {start}..{start + length - 1} straddle 128-row scale blocks"
    )


def _layer_of(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def local_index(
    name: str,
    shape: tuple[int, ...],
    args: ModelArgs,
    world_size: int,
    rank: int,
    full_widths: dict[str, int] | None = None,
) -> tuple | None:
    """Index of rank `rank`'s part in the full tensor `name` of `shape` (dsv3/reference names):
    () for all of it, a tuple of slices, or None when it belongs to another rank (a per-expert
    key of another rank's expert). An fp8 `.scale` is sliced in 128-blocks of its weight's
    split dimension, whose full size `full_widths[weight name]` gives (default: from args)."""
    kind, dim = _placement(name)
    if world_size == 1 or kind == "replicated":
        return ()
    if kind == "expert":
        m = _PER_EXPERT.fullmatch(name)
        n_local = args.for_layer(int(m.group(2))).n_routed_experts // world_size
        return () if int(m.group(3)) // n_local == rank else None
    if kind == "experts":
        n_local = shape[0] // world_size
        return (slice(rank * n_local, (rank + 1) * n_local),)
    pre = (slice(None),) * dim
    if name.endswith(".weight"):
        n = shape[dim] // world_size
        return (*pre, slice(rank * n, (rank + 1) * n))
    weight = name[: -len("scale")] + "weight"
    widths = full_widths if full_widths is not None else _split_widths(args)
    if weight not in widths:
        raise ValueError(f"{name}: no weight {weight} in the model to size its scale blocks")
    n = widths[weight] // world_size
    return (*pre, _block_slice(rank * n, n, name))


def _split_widths(args: ModelArgs) -> dict[str, int]:
    """Full size along the split dimension of every SPLIT_DIM weight, from the analytic specs."""
    from .params import tensor_specs

    out = {}
    for t in tensor_specs(args):
        kind, dim = _placement(t.name)
        if kind == "split":
            out[t.name] = t.shape[dim]
    return out


# ---------------------------------------------------------------------- state dicts
def _stack_experts(sd: dict[str, torch.Tensor], args: ModelArgs, world_size: int, rank: int):
    """Per-expert keys of this rank's experts -> stacked `experts.w1` / `experts.w1_scale`
    (local expert order). Incomplete sets are left as they are for load_state_dict to report."""
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for key in sd:
        m = _PER_EXPERT.fullmatch(key)
        if m:
            groups.setdefault((m.group(1), m.group(4), m.group(5)), {})[int(m.group(3))] = key
    for (prefix, w, suffix), keys in groups.items():
        E = args.for_layer(int(prefix.split(".")[1])).n_routed_experts
        first = rank * (E // world_size)
        want = range(first, first + E // world_size)
        if sorted(keys) != list(want):
            continue
        dst = f"{prefix}.{w}" if suffix == "weight" else f"{prefix}.{w}_scale"
        sd[dst] = torch.stack([sd.pop(keys[e]) for e in want])
    return sd


def shard_state_dict(
    full_sd: dict[str, torch.Tensor], args: ModelArgs, world_size: int, rank: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s part of a full (single-process) state dict with dsv3/reference names: the
    keys and shapes of `Transformer(args, world_size=..., rank=...).state_dict()`. Reference
    per-expert keys are kept for this rank's experts and stacked. Split tensors are copies (the
    full ones can be freed); replicated ones are the same tensors."""
    world_size, rank = resolve_world(world_size, rank)
    fp8 = any(t.dtype == FP8 for t in full_sd.values())
    check_shardable(args, world_size, "fp8" if fp8 else None)
    widths = _split_widths(args)
    out = {}
    for name, t in full_sd.items():
        index = local_index(name, tuple(t.shape), args, world_size, rank, widths)
        if index is None:
            continue
        out[name] = t[index].clone() if index else t
    return _stack_experts(out, args, world_size, rank)


def _safetensors_files(path: Path) -> tuple[list[Path], int | None]:
    """(files, mp): the reference's per-rank files in rank order with their mp, or every
    *.safetensors file of a directory (or the one file) with mp None (full tensors)."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    found = reference_files(path)
    if found is not None:
        return found
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    return files, None


def load_sharded(
    path: str | os.PathLike,
    args: ModelArgs,
    world_size: int | None = None,
    rank: int | None = None,
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict read from safetensors, touching only its slices (`get_slice`):

    - a file, or a directory of files, holding full tensors (dsv3's own files, a plain
      state_dict; with `rename`, a checkpoint whose names map one to one onto dsv3's, e.g. an
      HF checkpoint through checkpoint.py's name table; `rename` returns None to skip a key);
    - a directory of the reference's `model{rank}-mp{M}.safetensors` (convert.py output): for
      M == world_size each rank reads its own file; for another M the rank's range is read from
      the shards that cover it.
    Returns the keys and shapes of the sharded model's state_dict (experts stacked); load it
    with `model.load_state_dict(sd)`. Layers >= args.n_layers (HF's MTP layer) are skipped."""
    from safetensors import safe_open

    world_size, rank = resolve_world(world_size, rank)
    files, mp = _safetensors_files(Path(path))
    widths = _split_widths(args)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    # name -> [(handle, key)] in rank order (several only for split tensors of per-rank files)
    pieces: dict[str, list[tuple[Any, str]]] = {}
    for h in handles:
        for key in h.keys():
            name = rename(key) if rename is not None else key
            if name is None:
                continue
            layer = _layer_of(name)
            if layer is not None and layer >= args.n_layers:
                continue
            pieces.setdefault(name, []).append((h, key))
    fp8 = any(_dtype_of(h, k) == "F8_E4M3" for ps in pieces.values() for h, k in ps)
    check_shardable(args, world_size, "fp8" if fp8 else None)
    out: dict[str, torch.Tensor] = {}
    for name, ps in pieces.items():
        kind, dim = _placement(name)
        if mp is None or kind != "split":
            h, key = ps[0]  # replicated tensors repeat on every per-rank file: take the first
            sl = h.get_slice(key)
            index = local_index(name, tuple(sl.get_shape()), args, world_size, rank, widths)
            if index is None:
                continue
            out[name] = sl[index] if index else h.get_tensor(key)
            continue
        if mp == world_size:
            h, key = ps[rank]
            out[name] = h.get_tensor(key)
            continue
        # Another layout: the full tensor is the per-rank pieces concatenated along `dim`.
        sizes = [h.get_slice(k).get_shape()[dim] for h, k in ps]
        full = list(ps[0][0].get_slice(ps[0][1]).get_shape())
        full[dim] = sum(sizes)
        index = local_index(name, tuple(full), args, world_size, rank, widths)
        want = index[dim] if index else slice(0, full[dim])
        parts, offset = [], 0
        for (h, key), size in zip(ps, sizes):
            lo, hi = max(want.start, offset), min(want.stop, offset + size)
            if lo < hi:
                sub = (slice(None),) * dim + (slice(lo - offset, hi - offset),)
                parts.append(h.get_slice(key)[sub])
            offset += size
        out[name] = torch.cat(parts, dim=dim)
    return _stack_experts(out, args, world_size, rank)


def _dtype_of(handle: Any, key: str) -> str:
    return handle.get_slice(key).get_dtype()


# ---------------------------------------------------------------------- init and sizes
@torch.no_grad()
def init_sharded(model: nn.Module, resid: float, progress=None) -> None:
    """Give a sharded model the values of the single-process model built from the same seed:
    each full-size module (embedding/norm/head, then one block at a time) is built and
    initialised exactly as `Transformer.init_weights` does it, and this rank keeps its slices.
    Peak extra memory is one full block."""
    from . import model as M

    args, device = model.args, model.device
    full = M.Transformer(args, device="meta", dtype=model.dtype_name, world_size=1)
    targets = model.state_dict()

    def take(prefix: str, module: nn.Module) -> None:
        sd = {prefix + k: v for k, v in module.state_dict().items()}
        local = shard_state_dict(sd, args, model.world_size, model.rank)
        for name, t in local.items():
            if targets[name].shape != t.shape:
                raise RuntimeError(
                    f"{name}: shard {list(t.shape)} vs model {list(targets[name].shape)}"
                )
            targets[name].copy_(t)
        module.to_empty(device="meta")  # free the full-size copy

    tops = (full.embed, full.norm, full.head)
    for m in tops:
        m.to_empty(device=device)
    M._init_globals(full)
    for prefix, m in zip(("embed.", "norm.", "head."), tops):
        take(prefix, m)
    n = len(full.layers)
    for i, block in enumerate(full.layers):
        block.to_empty(device=device)
        M._init_block(block, resid)
        take(f"layers.{i}.", block)
        if progress is not None:
            progress(i + 1, n)


def param_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds in parameters and fp8 scales: {"total", "sharded", "replicated"}
    (works on meta builds)."""
    out = {"total": 0, "sharded": 0, "replicated": 0}
    for name, t in model.state_dict().items():
        b = t.numel() * t.element_size()
        out["total"] += b
        out["replicated" if _placement(name)[0] == "replicated" else "sharded"] += b
    return out


def local_sizes(la: LayerArgs, world_size: int) -> LayerArgs:
    """The layer's args as one rank's attention sees them: n_heads // world_size heads."""
    return dataclasses.replace(la, n_heads=la.n_heads // world_size)
