"""The collectives a sharded model runs (dsv3.dist.plan says what each rank holds).

Forward: the embedding looks up the ids of its vocab slice and zeros the rest, then all-reduces;
attention runs on the local heads; every layer's attention output and feed-forward output is a
partial sum (row-parallel wo/w2, local experts only: tokens routed elsewhere add zero here) and is
all-reduced once; the head computes its vocab slice of the logits and all-gathers them. The
router is replicated, so every rank picks the same experts. The reference all-reduces the routed
and the shared experts separately; one all-reduce of their sum is the same number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..layers import Linear

__all__ = ["ParallelEmbedding", "ParallelHead", "all_reduce", "resolve_world"]


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


