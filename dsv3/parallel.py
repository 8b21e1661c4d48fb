"""Tensor and expert parallelism across torch.distributed ranks, split as the reference does:
the public names in one place. The code lives in three layers (imports run one way):

- `dsv3.dist.plan` (torch-free): which slice of which tensor each rank holds (`SPLIT_DIM`,
  `local_index`), whether a config splits (`check_shardable`), per-rank bytes (`param_bytes`);
- `dsv3.dist.comm`: the collectives the model runs (`all_reduce`, `ParallelEmbedding`,
  `ParallelHead`) and `resolve_world`;
- `dsv3.dist.shard`: a full state dict cut into a rank's part (`shard_state_dict`) and
  `init_process_group_from_env`; `dsv3.checkpoint.load_sharded` reads a rank's slices of files.

`Transformer(args, world_size=N, rank=r)` builds rank r's shard; its seeded random init equals
the matching slices of the single-process model.
"""

from .checkpoint import load_sharded
from .dist.comm import ParallelEmbedding, ParallelHead, all_reduce, resolve_world
from .dist.plan import SPLIT_DIM, check_shardable, local_index, local_sizes, param_bytes
from .dist.shard import init_process_group_from_env, shard_state_dict

__all__ = [
    "SPLIT_DIM",
    "ParallelEmbedding",
    "ParallelHead",
    "all_reduce",
    "check_shardable",
    "init_process_group_from_env",
    "load_sharded",
    "local_index",
    "local_sizes",
    "param_bytes",
    "resolve_world",
    "shard_state_dict",
]
