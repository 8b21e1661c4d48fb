"""How much memory there is, and whether an estimate fits: the guard before any allocation;
recovery from allocation failures; and the process's allocator settings. Imports no model
(building under the guard: `dsv3.build.build_model`).

The budget is `DSV3_MEMORY_LIMIT` when set (e.g. "8GiB", "512MB", "1e9"), else a safe fraction
of what is free now: 90% of free CUDA memory, 80% of available RAM. The meta device is free.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from .params import human_bytes

if TYPE_CHECKING:  # torch loads on first use: the app's page does not wait for it
    import torch

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'8GiB' -> 8589934592. Raises ValueError naming the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 8GiB, 512MB or 1e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_bytes(device: str | torch.device) -> tuple[int, str]:
    """(bytes free now on `device`, a phrase saying what was measured)."""
    import torch

    dev = torch.device(device)
    if dev.type == "meta":
        return 2**62, "meta device (nothing is allocated)"
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return (
            free,
            f"free CUDA memory on {torch.cuda.get_device_name(dev)} ({human_bytes(total)} total)",
        )
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    return 2**62, "unknown (no psutil, no /proc/meminfo)"


FREED_NOTE = "that freeing idle models would return"


def memory_limit(
    device: str | torch.device, freed: int = 0, freed_note: str = FREED_NOTE
) -> tuple[int, str]:
    """The budget one build may use on `device`: DSV3_MEMORY_LIMIT or a fraction of free memory.
    `freed`: bytes that would be free in addition (models a server could drop first), so a
    caller can ask whether dropping them would help before dropping anything; `freed_note`
    says where they come from."""
    import torch

    env = os.environ.get("DSV3_MEMORY_LIMIT")
    dev = torch.device(device)
    if env and dev.type != "meta":
        return parse_bytes(env), f"DSV3_MEMORY_LIMIT={env}"
    free, what = available_bytes(dev)
    frac = 0.9 if dev.type == "cuda" else 0.8
    if freed:
        what += f" + {human_bytes(freed)} {freed_note}"
    return int((free + freed) * frac), f"{int(frac * 100)}% of {what}"


# what a refusal suggests: the dtypes smaller than the build's (None, unknown: both)
SMALLER_DTYPES = {"fp32": ("bf16", "fp8"), "bf16": ("fp8",), "fp8": (), None: ("bf16", "fp8")}


def check_fits(
    nbytes: float,
    device: str | torch.device,
    freed: int = 0,
    dtype: str | None = None,
    freed_note: str = FREED_NOTE,
    fp8_smaller: bool = True,
) -> tuple[bool, str]:
    """(fits, reason) for an allocation of `nbytes` on `device` (with `freed` more bytes free,
    from where `freed_note` says: see memory_limit). `dtype`, the build's ("fp32"/"bf16"/
    "fp8"), keeps the suggestion to dtypes smaller than it (none is, for fp8); None suggests
    both. `fp8_smaller` False: fp8 is not smaller here (a GPU without an fp8 path keeps bf16
    copies as well, `params.dense_copy_bytes`), so it is not suggested."""
    limit, what = memory_limit(device, freed, freed_note)
    if nbytes <= limit:
        return True, f"needs {human_bytes(nbytes)}, budget {human_bytes(limit)} ({what})"
    dtypes = SMALLER_DTYPES.get(dtype, SMALLER_DTYPES[None])
    smaller = " or ".join(d for d in dtypes if fp8_smaller or d != "fp8")
    tries = ", ".join(t for t in ("a smaller preset", smaller) if t)
    return False, (
        f"needs {human_bytes(nbytes)} but the budget is {human_bytes(limit)} ({what}); "
        f"try {tries}, or the meta device"
    )


def default_device() -> str:
    """cuda when present, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class MemoryBudgetError(ValueError):
    """A build or forward was refused (over budget) or failed for lack of memory; nothing of it
    is left allocated. The message has the numbers."""


_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "alloc")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (CUDA OOM, MemoryError, allocator RuntimeError)."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def release_memory() -> None:
    """Return freed blocks to the system/driver after a failure or a dropped model."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def _glibc():
    """The C library as a ctypes handle on Linux, else None (what trim_heap and
    keep_freed_memory call into; on musl and others their glibc calls are missing)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand glibc's freed heap pages back to the OS. Without it a server that built and dropped
    models on several threads keeps their memory in per-thread malloc arenas; with
    `keep_freed_memory` the last forward's activations stay resident until this runs."""
    libc = _glibc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:  # not glibc (musl, ...): nothing to trim
        pass


_KEEP_BELOW = 64 * 2**20  # blocks smaller than this come from (and return to) the heap
_TRIM_ABOVE = 128 * 2**20  # free heap top kept up to this size
_kept = False


def keep_freed_memory() -> bool:
    """Stop glibc from handing every freed activation back to the OS, once per process.

    By default glibc maps blocks over its (adaptive) threshold with mmap and unmaps them on
    free, and trims the heap top: each CPU forward then page-faults all its activations in
    again (thousands of page faults per forward: see benchmarks/run.py and the README's
    Performance section). With blocks under 64 MiB served from the heap and 128 MiB of
    free heap top kept, a repeat forward faults nothing. The price: the last forward's
    activations stay resident until `trim_heap` (the app calls it after every run) or
    `release_memory` (when a model is dropped) hands them back. Process-wide, like any allocator
    setting: other libraries in the process get the same behaviour. Linux/glibc only;
    `DSV3_KEEP_FREED_MEMORY=0` turns it off. Returns whether it is in effect."""
    global _kept
    if _kept:
        return True
    libc = _glibc()
    if libc is None or os.environ.get("DSV3_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        _kept = bool(libc.mallopt(m_mmap_threshold, _KEEP_BELOW)) and bool(
            libc.mallopt(m_trim_threshold, _TRIM_ABOVE)
        )
    except AttributeError:  # not glibc (musl, ...)
        return False
    return _kept


def run_guarded(fn, *a, **kw):
    """Call fn; turn an allocation failure into MemoryBudgetError after freeing what it can."""
    failure = ""
    try:
        return fn(*a, **kw)
    except Exception as e:
        if not is_oom(e):
            raise
        failure = f"{type(e).__name__}: {str(e)[:200]}"
        e.__traceback__ = None
    release_memory()
    raise MemoryBudgetError(f"ran out of memory ({failure}); what it held was freed")


def __getattr__(name: str):
    # Transitional: `build_model` lived here, which made memory -> model -> memory a cycle. It is
    # now dsv3.build.build_model; this forwards old callers until they import it from there.
    if name == "build_model":
        from importlib import import_module

        return import_module("dsv3.build").build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
