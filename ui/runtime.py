"""Running models for the UI: device choice, build with timing, forward + decode with timing and
statistics, and the optional ZeroGPU wrapper. Returns plain data; no gradio imports.

On a Hugging Face ZeroGPU Space a GPU exists only inside a `@spaces.GPU` call, so a CUDA model
cannot outlive one request: there `build_and_run` builds, runs and collects statistics in one
call and returns plain CPU data. Elsewhere `gpu` is a no-op and models live in the session.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from dsv3 import ModelArgs, Transformer, fused, memory, tuning

try:  # optional: only present on Hugging Face Spaces
    import spaces  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the host
    spaces = None

ZERO_GPU = spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU(fn)` on a ZeroGPU Space, `fn` unchanged anywhere else."""
    return spaces.GPU(fn) if ZERO_GPU else fn


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible (or ZeroGPU will attach one), else 'cpu'."""
    if device == "auto":
        return "cuda" if ZERO_GPU or torch.cuda.is_available() else "cpu"
    return device


def cuda_ok() -> bool:
    return torch.cuda.is_available()


def fp8_path() -> bool:
    """Does this server's GPU multiply fp8 weights as they are (else an fp8 build keeps bf16
    copies, `params.dense_copy_bytes`)? True without a visible GPU: ZeroGPU's cards have one."""
    from dsv3.fp8 import keeps_dense_copies

    return not torch.cuda.is_available() or not keeps_dense_copies(torch.device("cuda"))


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights occupy, wherever they are)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _status_kib(key: str) -> int | None:
    """A 'VmRSS:'/'VmHWM:' figure of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RunMemory:
    """This run's own peak memory, nothing of other sessions': on CUDA the peak allocated
    during the run (the model's weights included), on CPU the peak resident memory above what
    the process held when the run started. Linux lets the peak be reset (clear_refs "5");
    elsewhere the figure falls back to the resident memory at the end of the run."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> RunMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _status_kib("VmRSS:") or 0
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident size (VmHWM) to the current one
                self.hwm = True
            except OSError:
                self.hwm = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
            self.kind = "CUDA peak allocated during this run, weights included"
        else:
            end = _status_kib("VmHWM:" if self.hwm else "VmRSS:") or self.start
            self.peak = max(0, end - self.start)
            self.kind = "this run's peak resident memory above its start"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(
    args: ModelArgs,
    device: str,
    dtype: str,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Transformer, dict[str, Any]]:
    """Build and initialise a model; -> (model, {"seconds", "model_bytes", "cuda_peak_bytes"})."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(int(seed))
    t0 = time.perf_counter()
    # Guarded: refused over budget; an allocation failure frees the partial model (MemoryBudgetError).
    model, est = memory.build_model(args, device, dtype, progress=progress)
    _sync(device)
    info = {"seconds": time.perf_counter() - t0, "model_bytes": tensor_bytes(model)}
    if est.get("dense_kept_bytes"):  # fp8 on a GPU without an fp8 path: bf16 copies too
        info["dense_kept_bytes"] = est["dense_kept_bytes"]
    if device == "cuda":
        info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return model, info


def make_tokens(
    vocab_size: int, batch: int, seq_len: int, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """Random token ids (batch, seq_len), reproducible from `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    return tokens.to("meta") if device == "meta" else tokens


def parse_token_ids(text: str, vocab_size: int | None = None) -> torch.Tensor | None:
    """'1 2 3; 4 5 6' -> tensor [[1,2,3],[4,5,6]] (rows by ';' or newline); '' -> None.
    Every id must lie in 0..vocab_size-1 (when given): the message names the first that does
    not."""
    if not isinstance(text, str):
        raise ValueError(f"token ids must be text like '1 2 3; 4 5 6', got {type(text).__name__}")
    text = text.strip()
    if not text:
        return None
    rows = [r for r in text.replace("\n", ";").split(";") if r.strip()]
    if not rows:  # only separators: no row at all, not rows of unequal length
        raise ValueError(f"token ids {text[:60]!r} hold no ids; write e.g. '1 2 3; 4 5 6'")
    ids: list[list[int]] = []
    for r in rows:
        try:
            ids.append([int(t) for t in r.replace(",", " ").split()])
        except ValueError:
            shown = r if len(r) <= 60 else r[:60] + "..."
            raise ValueError(
                f"token ids must be whole numbers separated by spaces or commas, rows by ';': "
                f"{shown!r}"
            ) from None
    if len({len(r) for r in ids}) != 1:
        raise ValueError(
            f"every row of token ids needs the same length, got {[len(r) for r in ids][:8]}"
        )
    hi = vocab_size if vocab_size is not None else 2**63
    for row in ids:
        for t in row:
            if not 0 <= t < hi:
                shown = str(t) if len(str(t)) <= 30 else str(t)[:30] + "..."
                raise ValueError(
                    f"token id {shown} is outside the vocabulary; allowed: 0..{hi - 1}"
                )
    return torch.tensor(ids, dtype=torch.long)


def run(model: Transformer, tokens: torch.Tensor, decode_steps: int = 0) -> dict[str, Any]:
    """Prefill `tokens`, then greedy-decode `decode_steps` tokens with the KV cache.

    -> plain data: shapes, prefill/decode latency, tokens/s, memory, generated ids.
    On a meta model only shapes come back (nothing is computed).
    """
    device = model.device.type
    meta = device == "meta"
    B, S = tokens.shape
    model.reset_cache()
    from dsv3 import stats

    # The prefill keeps what the views need: router scores (their distribution, the bias's
    # effect) and the DSA indexer's choices; decoding does not overwrite them.
    stats.record_router_scores(model, not meta)
    stats.record_indexer(model, not meta)
    mem = RunMemory(device)
    g = model.graphs
    with mem:
        before = (g.captures, g.replays, tuning.count())
        t0 = time.perf_counter()
        # full: the last layer routes every position too (the expert-load plot shows them all)
        logits = model(tokens.to(model.device), start_pos=0, full=True)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        prefill_how = _how(g, before)
        out = _decode(model, logits, tokens, decode_steps, prefill_s) if not meta else {}
    if meta:
        return {
            "device": device,
            "dtype": model.dtype_name,
            "input_shape": [B, S],
            "output_shape": list(logits.shape),
            "meta": True,
            "decode_steps_asked": int(decode_steps),  # not run: no values to pick tokens from
            "mtp_layers": len(model.mtp),
        }
    out.update(peak_bytes=mem.peak, peak_kind=mem.kind, prefill_how=prefill_how)
    out["mtp_layers"] = len(model.mtp)
    return out


def _how(graphs, before: tuple[int, int, int]) -> str:
    """How the forwards since `before` (graphs' (captures, replays), `tuning.count()`) ran:
    eager, from CUDA graphs captured during them (their time includes the capture), or
    replayed; and whether their time includes first-use kernel measurements (`dsv3.tuning`:
    a first run of a shape can take several times as long as the next)."""
    caps, reps = graphs.captures - before[0], graphs.replays - before[1]
    notes = ""
    if fused.FAILED:  # fused kernels that failed to run on this GPU (their twins ran instead)
        notes += f"; fused kernels not used here: {', '.join(fused.FAILED)}"
    if probed := tuning.probe_note(before[2]):
        notes += f"; {probed}"
    if not reps:
        return "eager" + (f" ({graphs.note})" if graphs.note else "") + notes
    if caps:
        return (
            f"CUDA graphs, {caps} captured in this run (the time includes the capture; the "
            "next run of this shape replays)" + notes
        )
    return "replayed CUDA graphs" + notes


def _decode(model, logits, tokens, decode_steps: int, prefill_s: float) -> dict[str, Any]:
    """After the prefill: routing statistics, then greedy decoding with the KV cache."""
    device = model.device.type
    B, S = tokens.shape
    out: dict[str, Any] = {
        "device": device,
        "dtype": model.dtype_name,
        "input_shape": [B, S],
        "output_shape": list(logits.shape),
        "meta": False,
    }
    from dsv3 import stats

    out["routing"] = stats.routing_stats(model)  # of the prefill, before decoding overwrites them
    out["router"] = stats.router_stats(model)
    stats.record_router_scores(model, False)  # the decode steps need none of it
    stats.record_indexer(model, False, drop=False)  # the views read the prefill's choices
    # A fingerprint of the prefill logits: tells runs (and sessions) apart at a glance.
    out["logits_head"] = [round(v, 6) for v in logits[0, :4].float().tolist()]
    picked: list[torch.Tensor] = []  # (B, 1) each, on the model's device
    before = (model.graphs.captures, model.graphs.replays, tuning.count())
    t1 = time.perf_counter()
    for step in range(int(decode_steps)):
        nxt = logits.float().argmax(dim=-1, keepdim=True)  # (B, 1)
        picked.append(nxt)  # read back once at the end: a read per step would wait for it
        logits = model(nxt, start_pos=S + step)
    _sync(device)
    decode_s = time.perf_counter() - t1
    generated = torch.cat(picked, 1).tolist() if picked else []  # (B, steps)
    out.update(
        prefill_seconds=prefill_s,
        prefill_tokens_per_s=B * S / max(prefill_s, 1e-9),
        decode_steps=int(decode_steps),
        decode_how=_how(model.graphs, before),
        decode_seconds=decode_s,
        decode_tokens_per_s=(B * decode_steps / decode_s)
        if decode_steps and decode_s > 0
        else None,
        generated=generated,
        logits_finite=bool(torch.isfinite(logits.float()).all()),
        kv_cache_bytes=model.cache_bytes(),
        kv_cache_used_bytes=model.cache_bytes(B, S + int(decode_steps)),
    )
    return out


def trace(model: Transformer, tokens: torch.Tensor) -> list[dict[str, Any]]:
    """Every module's output shape for a forward of `tokens` (works on meta)."""
    from dsv3 import stats

    model.reset_cache()
    return stats.trace_shapes(model, tokens.to(model.device))


@gpu
def build_and_run(
    config: dict[str, Any],
    device: str,
    dtype: str,
    seed: int,
    tokens: torch.Tensor,
    decode_steps: int,
) -> dict[str, Any]:
    """Build, run and inspect in one call, returning only plain CPU data (the ZeroGPU path)."""
    model, info = build(ModelArgs.from_dict(config), device, dtype, seed)
    result = {"build": info, "run": run(model, tokens, decode_steps), "trace": trace(model, tokens)}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result
