"""The fused decode kernels' contract on CPU (dsv3.fused; the kernels themselves run on CUDA,
checked by benchmarks/gpu_check.py against these same torch twins): where a kernel cannot run,
its twin gives the result and the failure is remembered, and the router's counts are the same
either way."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ModelArgs, Transformer, fused, layers
from dsv3.routing import Gate


@pytest.fixture
def broken_kernels(monkeypatch):
    """Pretend the kernels are available here but every launch fails (a GPU or Triton that
    cannot compile them): the modules must fall back to their torch twins."""

    def fail(*args, **kwargs):
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(fused, "FAILED", {})
    monkeypatch.setattr(fused, "available", lambda device, kind=None: kind not in fused.FAILED)
    monkeypatch.setattr(layers, "_KERNELS_ON_CPU", True)  # RMSNorm asks `available` on CPU too
    for name in ("gate_logits", "route", "moe_small", "mla_step", "mla_attend", "rms_norm"):
        monkeypatch.setattr(fused, name, fail)
    monkeypatch.setattr(fused, "moe_small_ok", lambda *a: fused.available(None, "moe_small"))
    return fused.FAILED


def test_kernels_are_cuda_only_without_the_interpreter():
    assert not fused.available(torch.device("cpu"))
    assert not fused.available(torch.device("meta"))


def test_gate_counts_match_bincount():
    a = ModelArgs(dim=32, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                  n_limited_groups=2, score_func="sigmoid", gate_bias=True)  # fmt: skip
    gate = Gate(a.for_layer(a.n_layers - 1), dtype=torch.float32)
    torch.nn.init.normal_(gate.weight)
    torch.nn.init.normal_(gate.bias)
    counts = torch.zeros(16, dtype=torch.long)
    w, idx = gate(torch.randn(9, 32), counts)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=16))
    assert counts.sum() == 9 * 4 and w.shape == idx.shape == (9, 4)


def test_a_failing_kernel_falls_back_to_its_twin_and_is_remembered(broken_kernels, tiny_args):
    """A decode with kernels that fail gives exactly the plain model's logits; each kernel is
    tried once, then skipped (FAILED names it and why)."""
    args = tiny_args
    torch.manual_seed(0)
    model = Transformer(args)
    tok = torch.randint(0, args.vocab_size, (2, 9))
    with pytest.MonkeyPatch.context() as mp:  # the plain model: kernels unavailable
        mp.setattr(fused, "available", lambda device, kind=None: False)
        mp.setattr(fused, "moe_small_ok", lambda *a: False)
        model.reset_cache()
        want = [model(tok[:, :8]), model(tok[:, 8:], start_pos=8)]
    model.reset_cache()
    got = [model(tok[:, :8]), model(tok[:, 8:], start_pos=8)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    kinds = {"gate_logits", "route", "moe_small", "mla_step", "mla_attend", "rms_norm"}
    assert set(broken_kernels) == kinds
    assert all("no such kernel here" in why for why in broken_kernels.values())
