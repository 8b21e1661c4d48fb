"""The routed experts' storage layout on CPU (`dsv3.moe.expert_layout`): in-major stacks hold
the same values, give the same logits through every dispatch, save and load bit-identically,
and are laid out again after every move."""

from __future__ import annotations

import pytest
import torch

from dsv3 import Transformer
from dsv3.checkpoint import load, save
from dsv3.model import normal_stack_
from dsv3.moe import (
    DISPATCH_IMPLS,
    GroupedExperts,
    dispatch,
    dispatch_class,
    dispatch_loop,
    gather_t,
    is_in_major,
)
from tests.conftest import clone_model


def _stacks(model: Transformer) -> list[torch.Tensor]:
    return [
        getattr(m, n)
        for m in model.modules()
        if isinstance(m, GroupedExperts)
        for n in ("w1", "w2", "w3")
    ]


def _reference_layout(args, monkeypatch, dtype="fp32", **options) -> Transformer:
    """The model of the same seed with the reference's row-major stacks."""
    monkeypatch.setenv("DSV3_EXPERT_LAYOUT", "out")
    torch.manual_seed(0)
    model = Transformer(args, dtype=dtype, **options)
    monkeypatch.delenv("DSV3_EXPERT_LAYOUT")
    return model


def test_cpu_stacks_are_in_major_with_the_same_values(tiny_args, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny_args)
    ref = _reference_layout(tiny_args, monkeypatch)
    stacks, ref_stacks = _stacks(model), _stacks(ref)
    assert stacks and all(is_in_major(w) and not w.is_contiguous() for w in stacks)
    assert all(w.is_contiguous() and not is_in_major(w) for w in ref_stacks)
    # Same shapes (the reference's (E, out, in)) and the same init values, element for element
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_bf16_and_fp8_stacks_keep_the_reference_layout(tiny_args, dtype):
    model = Transformer(tiny_args, dtype=dtype)
    assert all(w.is_contiguous() for w in _stacks(model))


def test_every_way_to_make_experts_lays_them_out():
    """Built on CPU directly, or given tensors by load_state_dict(assign=True)."""
    ex = GroupedExperts(4, 32, 16, device="cpu")
    assert all(is_in_major(getattr(ex, n)) for n in ("w1", "w2", "w3"))
    sd = {k: torch.randn(v.shape) for k, v in ex.state_dict().items()}  # row-major
    ex.load_state_dict(sd, assign=True)
    assert all(is_in_major(getattr(ex, n)) for n in ("w1", "w2", "w3"))
    assert all(torch.equal(getattr(ex, k), v) for k, v in sd.items())


@pytest.mark.parametrize("shape", [(4, 32, 64), (3, 5, 7), (5, 4, 4)])
def test_normal_stack_draws_the_contiguous_values(shape):
    """In-major stacks get the values (and leave the RNG where) a contiguous one does: one
    expert at a time where each is whole blocks of 16 numbers, else through one temporary."""
    torch.manual_seed(0)
    want, after = torch.empty(shape).normal_(0, 0.1), torch.rand(4)
    w = torch.empty(shape[0], shape[2], shape[1]).transpose(1, 2)
    torch.manual_seed(0)
    normal_stack_(w, 0.1)
    assert torch.equal(w, want) and torch.equal(torch.rand(4), after)


@pytest.mark.parametrize("impl", [i for i in DISPATCH_IMPLS if i != "triton"])
def test_every_dispatch_gives_the_reference_layouts_logits(tiny_args, monkeypatch, impl):
    ref = _reference_layout(tiny_args, monkeypatch)
    model = clone_model(ref, tiny_args, moe_impl=impl)
    assert all(is_in_major(w) for w in _stacks(model))
    tok = torch.randint(
        0, tiny_args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        want = ref(tok, all_logits=True)
        torch.testing.assert_close(model(tok, all_logits=True), want, rtol=0, atol=1e-5)
        # decode steps: the few-pairs paths (a product per pair, or the pairs' weights gathered)
        ref.reset_cache(), model.reset_cache()
        ref(tok[:, :20]), model(tok[:, :20])
        for i in range(20, 24):
            step = tok[:, i : i + 1]
            torch.testing.assert_close(
                model(step, start_pos=i), ref(step, start_pos=i), rtol=0, atol=1e-5
            )


def test_save_and_load_keep_values_and_lay_out_again(tiny_args, tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_args)
    path = save(model, tmp_path / "m.safetensors")
    back = load(path, device="cpu")
    assert all(is_in_major(w) for w in _stacks(back))
    sd, back_sd = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], back_sd[k]) for k in sd)


def test_moves_lay_the_stacks_out_for_the_device(tiny_args):
    torch.manual_seed(0)
    model = Transformer(tiny_args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.float64)  # not a layout's dtype: the reference's row-major stacks
    assert all(w.is_contiguous() for w in _stacks(model))
    model.to(torch.float32)
    assert all(is_in_major(w) for w in _stacks(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.to_empty(device="meta")
    model.to_empty(device="cpu")
    assert all(is_in_major(w) for w in _stacks(model))


@pytest.mark.parametrize("in_major", [False, True])
def test_gather_t_is_the_transposed_gather(in_major):
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3)
    if in_major:
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    ix = torch.tensor([4, 0, 4, 2])
    got = gather_t(w, ix)
    assert got.shape == (4, 3, 5) and is_in_major(w) == in_major
    assert torch.equal(got, w[ix].transpose(1, 2))


def test_dispatch_choices_are_kept_per_layout():
    """A dispatch measured on one layout is not reused for the other: their speeds differ."""
    torch.manual_seed(0)
    E, D, I = 8, 32, 16
    x = torch.randn(40, D)
    counts = [5] * E
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    t1, t2, t3 = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w1, w2, w3))
    assert dispatch_class(40, E, w1, x) != dispatch_class(40, E, t1, x)
    want = dispatch_loop(x, counts, w1, w2, w3)
    for impl in ("loop", "grouped", "padded", "padded-one", "gathered"):
        got = dispatch(x, counts, t1, t2, t3, impl)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
