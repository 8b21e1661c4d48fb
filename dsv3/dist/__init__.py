"""Tensor + expert parallelism in three layers: `plan` (torch-free: what each rank holds),
`comm` (the collectives the model runs) and `shard` (state dicts, sharded init, process groups).
The model imports `plan` and `comm`; `shard` is applied to a model from above."""
