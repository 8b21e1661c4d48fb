"""Building a model under the memory guard (dsv3.memory): refused before allocating when the
estimate does not fit, and freed again when an allocation fails anyway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .memory import MemoryBudgetError, check_fits, is_oom, release_memory
from .params import estimate, human_bytes, run_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["build_model"]


def build_model(
    args,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    batch: int = 1,
    seq_len: int = 1,
    progress=None,
):
    """Build `Transformer(args)` only if its estimate (weights + KV cache + activations for
    `batch` x `seq_len`, `params.run_bytes`) fits the budget; if allocation fails anyway, free
    the partial model and raise MemoryBudgetError. fp8 on a GPU without an fp8 path also makes
    its bf16 weight copies here (`Transformer.dequantize_once`). Returns (model, estimate
    dict, with `dense_kept_bytes`: the bytes of those copies, else 0)."""
    import torch

    from .model import Transformer, resolve_dtype

    dtype_name = resolve_dtype(dtype)[0]
    est = estimate(args, dtype_name, batch, seq_len)
    dev = torch.device(device)
    # fp8 on a GPU without an fp8 path keeps bf16 copies of its weights: made here, counted here
    dense_gpu = False
    if dev.type == "cuda" or (dtype_name == "fp8" and dev.type != "meta"):
        from .fp8 import keeps_dense_copies  # imports Triton: only where it matters

        dense_gpu = keeps_dense_copies(dev)
    dense = dense_gpu and dtype_name == "fp8"
    if dev.type != "meta":
        need = run_bytes(est, dev.type, fp8_path=not dense)
        fits, why = check_fits(need, dev, dtype=dtype_name, fp8_smaller=not dense_gpu)
        if not fits:
            raise MemoryBudgetError(f"build refused before allocating: {why}")
    failure, model = "", None
    try:
        model = Transformer(args, device=dev, dtype=dtype, progress=progress)
        est["dense_kept_bytes"] = model.dequantize_once() if dense else 0
        return model, est
    except Exception as e:
        if not is_oom(e):
            raise
        failure = type(e).__name__
        e.__traceback__ = None  # its frames hold the half-built model
    # Raised outside the except block so no traceback keeps the partial model's frames alive.
    model = None  # a model whose bf16 copies did not fit goes too
    release_memory()
    raise MemoryBudgetError(
        f"the build ran out of memory on {dev} ({failure}); what it had allocated was freed. "
        f"Estimated need: {human_bytes(est['total_bytes'])}. Try a smaller preset, bf16/fp8, "
        "or the meta device"
    )
