"""How tensor + expert parallelism splits a model over N ranks: which slice of which tensor
each rank holds, and whether a config can be split at all. Torch-free (the app checks a layout
without loading torch).

With `world_size` N ranks, rank r holds:

| tensors                                         | on rank r                                |
|-------------------------------------------------|------------------------------------------|
| embed.weight, head.weight (vocab, dim)          | vocab rows [r*V/N, (r+1)*V/N)            |
| wq, wq_b, wkv_b (column parallel)               | its n_heads/N heads' output rows         |
| wo (row parallel)                               | the input columns of its heads           |
| dense and shared-expert w1, w3 / w2             | width/N output rows / input columns      |
| routed experts (stacked, E first)               | experts [r*E/N, (r+1)*E/N)               |
| wq_a, wkv_a, q_norm, kv_norm, gate, norms       | everything (replicated)                  |

The split dimensions come from the one name table (`dsv3.names.SPLIT_DIM`, as the reference's
`convert.py`). Fp8 block scales are split with their weights; a shard must start on a 128 block
boundary or sit inside one block, so that its scales are a slice of the full model's
(`check_shardable`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import BLOCK_SIZE, ConfigError, LayerArgs, ModelArgs
from ..names import PER_EXPERT, REF_FILE, SPLIT_DIM, placement
from ..params import tensor_specs

__all__ = [
    "SPLIT_DIM",
    "check_shardable",
    "local_index",
    "local_sizes",
    "param_bytes",
    "reference_files",
    "split_widths",
]


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
    fp8 = str(dtype) in ("fp8", "torch.float8_e4m3fn")

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
    kind, dim = placement(name)
    if world_size == 1 or kind == "replicated":
        return ()
    if kind == "expert":
        layer, expert = (int(g) for g in PER_EXPERT.fullmatch(name).groups()[:2])
        n_local = args.for_layer(layer).n_routed_experts // world_size
        return () if expert // n_local == rank else None
    if kind == "experts":
        n_local = shape[0] // world_size
        return (slice(rank * n_local, (rank + 1) * n_local),)
    pre = (slice(None),) * dim
    if name.endswith(".weight"):
        n = shape[dim] // world_size
        return (*pre, slice(rank * n, (rank + 1) * n))
    weight = name[: -len("scale")] + "weight"
    widths = full_widths if full_widths is not None else split_widths(args)
    if weight not in widths:
        raise ValueError(f"{name}: no weight {weight} in the model to size its scale blocks")
    n = widths[weight] // world_size
    return (*pre, _block_slice(rank * n, n, name))


def split_widths(args: ModelArgs) -> dict[str, int]:
    """Full size along the split dimension of every SPLIT_DIM weight, from the analytic specs."""
    out = {}
    for t in tensor_specs(args):
        kind, dim = placement(t.name)
        if kind == "split":
            out[t.name] = t.shape[dim]
    return out


def param_bytes(model: Any) -> dict[str, int]:
    """Bytes this rank holds in parameters and fp8 scales: {"total", "sharded", "replicated"}
    (works on meta builds)."""
    out = {"total": 0, "sharded": 0, "replicated": 0}
    for name, t in model.state_dict().items():
        b = t.numel() * t.element_size()
        out["total"] += b
        out["replicated" if placement(name)[0] == "replicated" else "sharded"] += b
    return out


def local_sizes(la: LayerArgs, world_size: int) -> LayerArgs:
    """The layer's args as one rank's attention sees them: n_heads // world_size heads."""
    return dataclasses.replace(la, n_heads=la.n_heads // world_size)


def reference_files(directory: Path) -> tuple[list[Path], int] | None:
    """DeepSeek convert.py's per-rank files in `directory` (model{rank}-mp{N}.safetensors) in
    rank order, with N; None when there are none. Mixed N or missing ranks raise ValueError."""
    found: dict[int, Path] = {}
    sizes = set()
    for f in directory.glob("model*-mp*.safetensors"):
        m = REF_FILE.fullmatch(f.name)
        if m:
            found[int(m.group(1))] = f
            sizes.add(int(m.group(2)))
    if not found:
        return None
    if len(sizes) != 1:
        raise ValueError(f"{directory}: shards of different model-parallel sizes {sorted(sizes)}")
    mp = sizes.pop()
    if sorted(found) != list(range(mp)):
        missing = sorted(set(range(mp)) - set(found))
        raise ValueError(f"{directory}: mp={mp} but shard(s) {missing} are missing")
    return [found[r] for r in range(mp)], mp
