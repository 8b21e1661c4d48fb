"""The memory guard: refuse before allocating, recover from allocation failures."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from dsv3 import ModelArgs, Transformer
from dsv3.build import build_model
from dsv3.memory import (
    MemoryBudgetError,
    check_fits,
    memory_limit,
    parse_bytes,
    run_guarded,
)

from ..conftest import TINY


@pytest.mark.parametrize(
    "text, n", [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1e9", 10**9), ("1.5 kib", 1536)]
)
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(ValueError, match="8GiB"):
        parse_bytes("eight gigs")


def test_limit_from_environment_refuses_before_allocating(monkeypatch):
    monkeypatch.setenv("DSV3_MEMORY_LIMIT", "1MiB")
    assert memory_limit("cpu")[0] == 2**20
    built = []
    monkeypatch.setattr(Transformer, "init_weights", lambda self, p=None: built.append(self))
    with pytest.raises(MemoryBudgetError) as e:
        build_model(ModelArgs(n_layers=2), "cpu", "bf16")
    assert "1.00 MiB" in str(e.value) and "GiB" in str(e.value) and "meta" in str(e.value)
    assert not built  # refused before any module was allocated
    ok, why = check_fits(10, "cpu")
    assert ok and "DSV3_MEMORY_LIMIT" in why
    # meta is always allowed: it allocates nothing
    model, _ = build_model(ModelArgs(n_layers=2), "meta", "bf16")
    assert model.embed.weight.is_meta


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_allocation_failure_frees_the_partial_model(monkeypatch, exc):
    refs = []

    def failing_init(self, progress=None):
        refs.append(weakref.ref(self))
        raise exc

    monkeypatch.setattr(Transformer, "init_weights", failing_init)
    args = ModelArgs(**TINY)
    with pytest.raises(MemoryBudgetError, match="freed"):
        build_model(args, "cpu", "fp32")
    gc.collect()
    assert refs and refs[0]() is None  # nothing keeps the half-built model alive
    monkeypatch.undo()
    model, _ = build_model(args, "cpu", "fp32")  # and the next request works
    assert model(torch.zeros(1, 4, dtype=torch.long)).isfinite().all()


def test_other_errors_pass_through(monkeypatch):
    def broken(self, progress=None):
        raise KeyError("not a memory problem")

    monkeypatch.setattr(Transformer, "init_weights", broken)
    with pytest.raises(KeyError):
        build_model(ModelArgs(**TINY), "cpu")


def test_run_guarded_turns_oom_into_a_message():
    def forward():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(MemoryBudgetError, match="out of memory"):
        run_guarded(forward)
    assert run_guarded(lambda x: x + 1, 1) == 2


def test_dropped_model_is_freed_without_a_gc_pass(tiny_args):
    """No reference cycles: dropping the last reference frees the weights at once (the app
    replaces models per session; waiting for the cyclic GC would hold two models)."""
    gc.disable()
    try:
        model = Transformer(tiny_args)
        model(torch.zeros(1, 4, dtype=torch.long))
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "dtype, hint", [(None, "bf16 or fp8"), ("fp32", "bf16 or fp8"), ("bf16", "fp8"), ("fp8", "")]
)
def test_a_refusal_suggests_only_smaller_dtypes(monkeypatch, dtype, hint):
    monkeypatch.setenv("DSV3_MEMORY_LIMIT", "1MiB")
    fits, why = check_fits(2 << 20, "cpu", dtype=dtype)
    assert not fits and "a smaller preset" in why and "meta device" in why
    assert (f"try a smaller preset, {hint}, or" in why) if hint else "bf16" not in why


@pytest.mark.parametrize("world", [1, 2])
def test_fp8_dense_copies_are_what_the_estimate_counts(world):
    """A GPU without an fp8 path multiplies by bf16 copies of the fp8 weights, made at build
    (`dequantize_once`): their bytes are the estimate's `dense_copy_bytes` (per rank when split),
    and `run_bytes` adds them on such a GPU only."""
    from dsv3 import estimate
    from dsv3.params import run_bytes

    from .test_parallel import BLOCKS

    args = ModelArgs(**BLOCKS)
    model = Transformer(args, dtype="fp8", world_size=world, rank=0)
    e = estimate(args, "fp8", n_gpus=world)
    key = "dense_copy_bytes" if world == 1 else "per_gpu_dense_copy_bytes"
    assert model.dequantize_once() == e[key] > 0
    per_gpu = world > 1
    base = run_bytes(e, "cuda", per_gpu=per_gpu)
    work = e["per_gpu_dense_work_bytes" if per_gpu else "dense_work_bytes"]
    assert 0 < work < e[key]  # one matrix in float32 while it is made
    assert run_bytes(e, "cuda", per_gpu=per_gpu, fp8_path=False) == base + e[key] + work
    assert run_bytes(e, "cpu", per_gpu=per_gpu, fp8_path=False) == base + e["dequant_bytes"]
    assert estimate(args, "bf16")["dense_copy_bytes"] == 0
    assert Transformer(args, dtype="bf16").dequantize_once() == 0


def test_build_makes_the_dense_copies_and_frees_a_model_they_do_not_fit(monkeypatch):
    """Where fp8 keeps bf16 copies, the build makes them (a build, not a later run, is refused
    or fails), reports their bytes, and frees the whole model when they run out of memory."""
    from dsv3 import fp8

    monkeypatch.setattr(fp8, "keeps_dense_copies", lambda device: True)  # as on an A100
    args = ModelArgs(**TINY)
    model, est = build_model(args, "cpu", "fp8")
    assert est["dense_kept_bytes"] == est["dense_copy_bytes"] > 0
    refs = []

    def no_room(self):
        refs.append(weakref.ref(self))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Transformer, "dequantize_once", no_room)
    with pytest.raises(MemoryBudgetError, match="freed") as raised:
        build_model(args, "cpu", "fp8")
    gc.collect()
    assert refs and refs[0]() is None  # the error (kept here, as a caller may) holds no model
    assert raised.value.__traceback__ is not None


def test_a_cuda_fp8_build_without_an_fp8_path_checks_the_copies_first(monkeypatch):
    """On such a GPU (an A100) the check before allocating counts the bf16 copies and their
    working memory; a refusal there needs no GPU, so this runs anywhere."""
    from dsv3 import build, estimate, fp8
    from dsv3.params import run_bytes

    asked = []

    def refuse(nbytes, device, dtype=None, fp8_smaller=True):
        asked.append((nbytes, torch.device(device).type, fp8_smaller))
        return False, "too big"

    monkeypatch.setattr(build, "check_fits", refuse)
    args = ModelArgs(**TINY)
    e = estimate(args, "fp8", 1, 1)  # build_model's default batch x length
    for dense in (True, False):
        monkeypatch.setattr(fp8, "keeps_dense_copies", lambda device, d=dense: d)
        with pytest.raises(MemoryBudgetError, match="refused before allocating"):
            build_model(args, "cuda", "fp8")
        extra = e["dense_copy_bytes"] + e["dense_work_bytes"] if dense else 0
        # and, fp8 being no smaller there, it is not what the refusal suggests
        assert asked[-1] == (run_bytes(e, "cuda") + extra, "cuda", not dense)
    assert "fp8" not in check_fits(1 << 60, "cpu", dtype="fp32", fp8_smaller=False)[1]
