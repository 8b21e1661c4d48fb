"""The fast paths agree with the plain ones (their speed is measured by benchmarks/run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelArgs, Transformer, count_params, estimate
from dsv3.attention import _rotate_
from dsv3.layers import FP8, SKINNY_ROWS, linear, quantize_fp8
from dsv3.moe import (
    GroupedExperts,
    dispatch,
    dispatch_grouped,
    dispatch_loop,
    grouped_mm_supported,
)
from tests.conftest import clone_model


@pytest.mark.parametrize("rows", [1, 2, 5, SKINNY_ROWS, SKINNY_ROWS + 1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_f_linear(rows, dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(rows, 1, 48, dtype=dtype)  # (B, S, D) as in a decode step
    w = torch.randn(80, 48, dtype=dtype)
    b = torch.randn(80, dtype=dtype) if bias else None
    got = linear(x, w, b)
    assert got.shape == (rows, 1, 80) and got.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got, F.linear(x, w, b), **tol)


@pytest.mark.parametrize("n_pairs", [3, 12, 200])
def test_auto_dispatch_equals_loop(n_pairs):
    """Few pairs (decoding) take the loop, many the grouped matmuls: same numbers either way."""
    torch.manual_seed(0)
    E, D, I = 16, 32, 16
    idx = torch.randint(0, E, (n_pairs,))
    counts = torch.bincount(idx, minlength=E).tolist()
    x = torch.randn(n_pairs, D)
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    want = dispatch_loop(x, counts, w1, w2, w3)
    torch.testing.assert_close(dispatch(x, counts, w1, w2, w3), want, rtol=1e-5, atol=1e-4)
    counts_t = torch.tensor(counts)  # counts as a tensor (how the GPU path passes them)
    torch.testing.assert_close(dispatch_loop(x, counts_t, w1, w2, w3), want, rtol=0, atol=0)
    if grouped_mm_supported(x, w1, w2, w3):
        for c in (counts, counts_t):
            got = dispatch_grouped(x, c, w1, w2, w3)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_few_pairs_on_host_equal_the_sorted_dispatch(dtype, tokens):
    """A decode step's few pairs, planned on the host (`_few_pairs`, CPU), against the sorted
    dispatch written out by hand: tokens sharing an expert, a rank holding experts 4..11 of 16
    (expert parallel), fp8 experts dequantised one at a time."""
    torch.manual_seed(tokens)
    E, D, I, K = 16, 64, 32, 3
    wdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8}[dtype]
    xdtype = torch.float32 if dtype == "fp8" else wdtype
    for first, n_local in ((0, E), (4, 8)):
        ex = GroupedExperts(n_local, D, I, dtype=wdtype, first=first)
        for name in ("w1", "w2", "w3"):
            w = torch.randn_like(getattr(ex, name), dtype=torch.float32) * 0.1
            if dtype == "fp8":
                q, scale = quantize_fp8(w)
                getattr(ex, name).data, getattr(ex, f"{name}_scale").data = q, scale
            else:
                getattr(ex, name).data = w.to(wdtype)
        x = torch.randn(tokens, D, dtype=xdtype)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
        idx[:, 0] = 5  # every token shares expert 5 (several rows for one expert)
        weights = torch.rand(tokens, K).to(xdtype)
        counts = torch.bincount(idx.flatten(), minlength=E).tolist()
        got = ex(x, weights, idx, counts, impl="loop")
        want = torch.zeros(tokens, D, dtype=torch.float32)
        w1, w2, w3 = (ex.effective(n, xdtype).float() for n in ("w1", "w2", "w3"))
        for t in range(tokens):
            for k in range(K):
                e = int(idx[t, k]) - first
                if 0 <= e < n_local:
                    h = x[t].float()
                    y = (F.silu(w1[e] @ h) * (w3[e] @ h)) @ w2[e].T
                    want[t] += float(weights[t, k]) * y
        tol = dict(rtol=1e-5, atol=1e-5) if dtype != "bf16" else dict(rtol=2e-2, atol=2e-2)
        assert got.dtype == xdtype
        torch.testing.assert_close(got.float(), want, **tol)
        if ex._gather_ok(counts):  # the batched variant: all experts here, not fp8
            gathered = ex._few_pairs_gathered(x, weights, idx)
            assert gathered.dtype == xdtype
            torch.testing.assert_close(gathered.float(), want, **tol)
        else:
            assert dtype == "fp8" or n_local < E


def test_grouped_mm_support_checks_alignment():
    w = torch.randn(4, 8, 8)
    assert grouped_mm_supported(torch.randn(10, 8), w, w, w)
    odd = torch.randn(10, 9)[:, :8]  # row stride 9 floats = 36 bytes: not 16-byte aligned
    assert not grouped_mm_supported(odd, w, w, w)
    assert not grouped_mm_supported(torch.randn(10, 8, device="meta"), w, w, w)
    narrow = torch.randn(4, 8, 1)  # w2 (E, D, I) with I = 1: a 4-byte stride inside the kernel
    assert not grouped_mm_supported(torch.randn(10, 8), torch.randn(4, 1, 8), narrow, narrow)


def test_first_build_does_not_import_sympy():
    """to_empty from meta without torch.empty_like: a cold build stays milliseconds."""
    import subprocess
    import sys

    code = (
        "import sys; from dsv3 import ModelArgs, Transformer; "
        "Transformer(ModelArgs(vocab_size=64, dim=32, inter_dim=32, moe_inter_dim=16, n_layers=2,"
        " n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16,"
        " qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8), device='cpu');"
        " print('sympy' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False", out


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's formula: rotate interleaved pairs of x's last dim. x: (B, S, H, R);
    cos/sin: (S, R/2)."""
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]  # (1, S, 1, R/2)
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, S, H, R/2, 2)
    return out.flatten(-2).to(dtype)


@pytest.mark.parametrize("case", ["fast", "odd_offset", "odd_offset_one_row", "bf16"])
def test_inplace_rotary_equals_reference_formula(case):
    torch.manual_seed(0)
    B, S, H, R = 2, 5, 3, 8
    if case == "odd_offset_one_row":  # one token's shared rope key after an odd latent width:
        B, S, H = 1, 1, 1  # contiguous already, at an odd offset (kv_lora_rank 1)
    freqs = torch.rand(S, R // 2) * 3
    cos, sin = freqs.cos(), freqs.sin()
    if case.startswith("odd_offset"):  # the rope dims start at an odd element offset: fallback path
        x = torch.randn(B, S, H, R + 1)[..., 1:]
    elif case == "bf16":
        x = torch.randn(B, S, H, R).to(torch.bfloat16)
    else:
        x = torch.randn(B, S, H, 16 + R)[..., 16:]
    want = apply_rotary_emb(x.clone(), cos, sin)
    _rotate_(x, torch.complex(cos, sin))
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6 if case != "bf16" else 1e-2)


@pytest.mark.parametrize("v_head_dim", [8, 40])  # v narrower / wider than qk_head_dim = 24
def test_padded_flash_attention_equals_plain_softmax(tiny_args, v_head_dim):
    """Prefill pads the smaller head dim for the flash kernel; the absorbed path computes the
    softmax by hand and the naive path caches full k/v. All three give the same logits."""
    args = tiny_args.replace(v_head_dim=v_head_dim)
    torch.manual_seed(0)
    model = Transformer(args, device="cpu", dtype=torch.float32)
    naive = clone_model(model, args.replace(attn_impl="naive"))
    tok = torch.randint(0, args.vocab_size, (2, 19))
    flash = model(tok, all_logits=True)
    absorbed = clone_model(model, args, absorbed_prefill=True)(tok, all_logits=True)
    torch.testing.assert_close(flash, absorbed, rtol=0, atol=2e-5)
    torch.testing.assert_close(naive(tok, all_logits=True), absorbed, rtol=0, atol=2e-5)


def test_latent_cache_is_one_buffer(tiny_model, tiny_args):
    tok = torch.randint(0, tiny_args.vocab_size, (2, 12))
    tiny_model(tok[:, :10])
    for i in (10, 11):  # decoding grows the cache geometrically; views follow the new buffer
        tiny_model(tok[:, i : i + 1], start_pos=i)
    cache = tiny_model.layers[1].attn.cache
    buf, kv, pe = cache.packed, cache.tensors["kv"], cache.tensors["pe"]
    assert kv.data_ptr() == buf.data_ptr()
    assert pe.data_ptr() == buf.data_ptr() + kv.shape[-1] * buf.element_size()
    assert cache.nbytes() == buf.numel() * buf.element_size()


def test_estimate_cache_follows_changes(tiny_args):
    """count_params/estimate remember resolved configs by value: a changed ModelArgs (even
    mutated in place) is counted afresh."""
    a = ModelArgs.from_dict(tiny_args.to_dict())
    before = count_params(a)["total"]
    assert count_params(a)["total"] == before
    a.n_heads = 8
    assert count_params(a)["total"] > before
    assert estimate(a)["params"]["total"] == count_params(a)["total"]
    assert count_params(a.replace(n_heads=4))["total"] == before


@pytest.mark.parametrize(
    "S, T, start_pos", [(1 + 2 * 128, 1 + 2 * 128, 0), (40, 100, 60), (7, 7, 0)]
)
def test_blocked_causal_attention_equals_sdpa(S, T, start_pos):
    """The CPU float32 attention path (blocks of queries, no head-dim padding) against torch's
    scaled_dot_product_attention with an explicit causal mask, Dqk != Dv."""
    from dsv3.attention import _blocked_causal, _causal_bias

    torch.manual_seed(0)
    B, H, Dqk, Dv = 2, 3, 24, 16
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, T, H, Dqk), torch.randn(B, T, H, Dv)
    got = _blocked_causal(q, k, v, 0.2, start_pos)
    mask = _causal_bias(S, T, start_pos, "cpu") == 0
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=0.2
    ).transpose(1, 2)
    assert got.shape == (B, S, H, Dv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padded_dispatch_runs_and_skew():
    """Padded dispatch agrees with the loop for any run length, idle experts and one expert
    taking most pairs; its row count is what padded_rows says."""
    from dsv3.moe import dispatch_padded, padded_rows

    torch.manual_seed(0)
    E, D, I = 12, 32, 16
    counts = [0, 40, 1, 0, 3, 0, 0, 7, 2, 0, 0, 5]
    x = torch.randn(sum(counts), D)
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    want = dispatch_loop(x, counts, w1, w2, w3)
    for run in (1, 3, 5, 8, 12, 100):
        got = dispatch_padded(x, counts, w1, w2, w3, run=run)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert padded_rows(counts, 1) == sum(counts)  # one expert per run: no padding at all
    assert padded_rows(counts, E) == E * 40  # one run: every expert padded to 40
    # Weights in any memory layout (here transposed in memory) give the same numbers.
    t = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w1, w2, w3)]
    torch.testing.assert_close(dispatch_padded(x, counts, *t), want, rtol=1e-5, atol=1e-4)


def test_cpu_forward_under_another_default_dtype():
    """The float32 CPU attention path builds its mask in the activations' dtype, whatever
    torch's default dtype is."""
    args = ModelArgs(
        vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_heads=2,
        n_routed_experts=8, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(args, device="cpu", dtype=torch.float32)
    tok = torch.randint(0, 64, (1, 6))
    want = model(tok)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model.reset_cache()
        got = model(tok)
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(256, 384), (3, 256, 128), (200, 256), (3, 128, 300)])
@pytest.mark.parametrize("in_major", [False, True])
def test_dequantize_broadcasts_its_scales_bit_equal_to_expanding_them(shape, in_major):
    """Whole 128x128 blocks take the scales broadcast and multiplied in place (no expanded
    float32 copy of them); the numbers are those of the expanded product, bit for bit, for
    stacks and in-major (CPU expert) layouts too, and the input is never changed."""
    from dsv3.layers import _expand_scale, dequantize

    torch.manual_seed(0)
    q, scale = quantize_fp8(torch.randn(shape))
    if in_major and len(shape) == 3:  # (E, out, in) stored with `in` slowest, as on CPU
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    want = q.to(torch.float32) * _expand_scale(scale, *shape[-2:])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(q, scale, dtype), want.to(dtype))
    w = torch.randn(256, 256)
    before = w.clone()
    dequantize(w, torch.full((2, 2), 2.0), torch.float32)  # a float32 "weight" is not scaled
    assert torch.equal(w, before)
