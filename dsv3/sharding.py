"""Which tensors tensor/expert parallelism splits, and along which dimension: a torch-free table
shared by `dsv3.parallel` (building and loading shards) and `dsv3.params` (per-GPU estimates)."""

from __future__ import annotations

import re
from pathlib import Path

# Module name -> the dimension of its weight (and fp8 scale) split across ranks; modules not
# listed are replicated. The same table as the reference's convert.py.
SPLIT_DIM = {
    "embed": 0,
    "head": 0,
    "wq": 0,
    "wq_b": 0,
    "wkv_b": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
}
# DeepSeek's convert.py output: one file per model-parallel rank.
REF_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
# Stacked routed experts (dsv3): split along the expert axis.
_STACKED = re.compile(r"layers\.(\d+)\.ffn\.experts\.(w[123])(_scale)?")
# Per-expert keys (the reference's files): expert e lives on one rank.
_PER_EXPERT = re.compile(r"(layers\.(\d+)\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)")


def _placement(name: str) -> tuple[str, int | None]:
    """("experts", 0) stacked routed experts, ("expert", None) one expert of the reference's
    per-expert keys, ("split", dim) a SPLIT_DIM module, ("replicated", None) the rest."""
    if _STACKED.fullmatch(name):
        return "experts", 0
    if _PER_EXPERT.fullmatch(name):
        return "expert", None
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "scale") and parts[-2] in SPLIT_DIM:
        return "split", SPLIT_DIM[parts[-2]]
    return "replicated", None


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
