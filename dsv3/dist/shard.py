"""Sharding applied from outside a model: a full state dict cut into a rank's part, and
process-group setup under torchrun. (Reading a rank's slices from files:
`dsv3.checkpoint.load_sharded`; a sharded model's seeded init: `Transformer.init_weights`.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import ModelArgs
from ..layers import FP8
from ..moe import stack_experts
from .comm import resolve_world
from .plan import check_shardable, local_index, split_widths

__all__ = ["init_process_group_from_env", "shard_state_dict", "stack_rank_experts"]


def stack_rank_experts(sd: dict[str, torch.Tensor], args: ModelArgs, world_size: int, rank: int):
    """Per-expert keys of this rank's experts -> stacked `experts.w1` / `experts.w1_scale`
    (local expert order), in place. Incomplete sets are left for load_state_dict to report."""
    for la in (*args.layers(), *args.mtp_layers()):
        if la.ffn == "moe":
            n = la.n_routed_experts // world_size
            where = "mtp" if la.layer_id >= args.n_layers else "layers"
            prefix = f"{where}.{la.layer_id}.ffn.experts."
            stack_experts(sd, prefix, range(rank * n, rank * n + n))
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
    widths = split_widths(args)
    out = {}
    for name, t in full_sd.items():
        index = local_index(name, tuple(t.shape), args, world_size, rank, widths)
        if index is None:
            continue
        out[name] = t[index].clone() if index else t
    return stack_rank_experts(out, args, world_size, rank)


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


# ---------------------------------------------------------------------- init and sizes
