"""The roofline's physics: which bytes and FLOPs a prefill and a decode step cost, per GPU."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3 import ModelArgs, estimate, presets
from dsv3.params import count_params, tensor_specs, weight_bytes, weight_bytes_per_gpu
from dsv3.roofline import GPU, GPUS, _tensor_bytes, fits, measure_gpu, roofline, speed_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def seed() -> ModelArgs:
    return presets.load("seed-demo")


@pytest.fixture(scope="module")
def v3() -> ModelArgs:
    return presets.load("deepseek-v3-671b")


def group_bytes(args: ModelArgs, dtype: str, group: str) -> int:
    return sum(_tensor_bytes(t, dtype, 1) for t in tensor_specs(args) if t.group == group)


def test_gpu_table_is_sourced():
    assert {"H100 SXM", "H200", "B200", "A100 80GB", "MI300X", "L40S"} <= set(GPUS)
    for g in GPUS.values():
        assert g.source and g.bf16_flops > 0 and g.bandwidth > 0 and g.link_bandwidth > 0
        assert g.fp32_flops is not None and g.fp32_flops < g.bf16_flops
    assert GPUS["A100 80GB"].fp8_flops is None
    assert GPUS["H200"].bandwidth == 4.8e12 and GPUS["H100 SXM"].fp8_flops == 1979e12
    with pytest.raises(ValueError, match="unknown GPU"):
        roofline(ModelArgs(n_layers=2), "TPU")


def test_prefill_of_seed_demo_is_weight_bytes_over_bandwidth(seed):
    """Small-batch prefill reads every weight once (the tokens touch all experts): its floor is
    the weight bytes over the bandwidth, up to the KV cache and the embedding rows not read."""
    h200 = GPUS["H200"]
    r = roofline(seed, h200, "bf16", batch=2, prompt_len=128)["prefill"]
    assert r["bound"] == "memory" and r["seconds"] == r["memory_seconds"]
    assert r["memory_seconds"] == pytest.approx(r["bytes"] / h200.bandwidth)
    assert r["experts_touched"] == pytest.approx(64)
    wb = weight_bytes(seed, "bf16")
    slack = group_bytes(seed, "bf16", "embedding") + r["kv_bytes"]
    assert abs(r["bytes"] - wb) <= slack
    assert r["seconds"] == pytest.approx(wb / h200.bandwidth, rel=0.02)
    assert r["compute_seconds"] < r["memory_seconds"] / 3


def test_decode_reads_between_non_expert_and_all_weights(seed):
    wb = weight_bytes(seed, "bf16")
    routed = group_bytes(seed, "bf16", "routed_experts")
    embed = group_bytes(seed, "bf16", "embedding")
    non_expert = wb - routed - embed
    d = roofline(seed, "H200", "bf16", batch=1, prompt_len=128)["decode"]
    assert non_expert < d["weight_bytes"] < wb
    # batch 1: exactly k of E experts per layer (6 of 64 in every MoE layer) and one embedding row
    expected = non_expert + routed * 6 / 64 + embed / seed.vocab_size
    assert d["weight_bytes"] == pytest.approx(expected, rel=1e-12)
    assert d["experts_touched"] == pytest.approx(6)
    assert d["bytes"] == pytest.approx(d["weight_bytes"] + d["kv_bytes"])
    # the KV cache read is the prompt plus the new token, written once: absorb latent + rope
    kv_tok = sum(la.kv_lora_rank + la.qk_rope_head_dim for la in seed.layers()) * 2
    assert d["kv_bytes"] == kv_tok * (128 + 1 + 1)


def test_more_batch_touches_more_experts_up_to_all(seed):
    touched, read = [], []
    for b in (1, 2, 4, 8, 16, 64, 256, 4096):
        d = roofline(seed, "H200", "bf16", batch=b, prompt_len=16)["decode"]
        touched.append(d["experts_touched"])
        read.append(d["weight_bytes"])
    assert touched == sorted(touched) and read == sorted(read)
    assert len(set(touched)) == len(touched)
    assert touched[1] == pytest.approx(64 * (1 - (1 - 6 / 64) ** 2))
    assert touched[-1] == pytest.approx(64) and touched[-1] <= 64
    all_but_embedding = weight_bytes(seed, "bf16") - group_bytes(seed, "bf16", "embedding")
    assert read[-1] == pytest.approx(all_but_embedding, rel=1e-3)


def test_large_prefill_is_compute_bound(seed):
    h200 = GPUS["H200"]
    r = roofline(seed, h200, "bf16", batch=8, prompt_len=4096)["prefill"]
    assert r["bound"] == "compute" and r["seconds"] == r["compute_seconds"]
    assert r["compute_seconds"] == pytest.approx(r["flops"] / h200.bf16_flops)
    # the FLOPs are params.estimate's, the head run on the last position only
    from dsv3.params import estimate

    est = estimate(seed, "bf16", 8, 4096)["flops_forward"]
    head = 2 * seed.vocab_size * seed.dim * 8 * 4095
    assert r["flops"] == pytest.approx(est - head)
    # attention grows with the context: a decode step after a longer prompt costs more
    short = roofline(seed, h200, "bf16", batch=8, prompt_len=128)["decode"]
    long = roofline(seed, h200, "bf16", batch=8, prompt_len=4096)["decode"]
    assert long["flops"] > short["flops"] and long["kv_bytes"] > short["kv_bytes"]


def test_fp8_halves_weight_bytes_and_uses_the_fp8_peak(seed):
    bf = roofline(seed, "H200", "bf16", batch=1, prompt_len=128)
    f8 = roofline(seed, "H200", "fp8", batch=1, prompt_len=128)
    for phase in ("prefill", "decode"):
        ratio = f8[phase]["weight_bytes"] / bf[phase]["weight_bytes"]
        assert 0.5 < ratio < 0.56, (phase, ratio)  # + block scales, bf16 head and norms
        assert f8[phase]["flops"] == bf[phase]["flops"]
        assert f8[phase]["compute_seconds"] == pytest.approx(f8[phase]["flops"] / 1979e12)
    assert f8["decode"]["kv_bytes"] == bf["decode"]["kv_bytes"]  # the cache stays bf16
    a100 = roofline(seed, "A100 80GB", "fp8", batch=1, prompt_len=128)
    assert "no fp8" in a100["note"]
    assert a100["prefill"]["compute_seconds"] == pytest.approx(
        a100["prefill"]["flops"] / GPUS["A100 80GB"].bf16_flops
    )
    # There dsv3 multiplies by bf16 copies of the fp8 weights: it reads bf16's bytes and holds
    # both (`params.dense_copy_bytes`, what `Transformer.dequantize_once` keeps)
    a100_bf = roofline(seed, "A100 80GB", "bf16", batch=1, prompt_len=128)
    for phase in ("prefill", "decode"):
        assert a100[phase]["weight_bytes"] == a100_bf[phase]["weight_bytes"]
    mem, h200 = a100["memory"], f8["memory"]
    dense = estimate(seed, "fp8", 1, 129)["dense_copy_bytes"]
    assert mem["dense_copies_per_gpu"] == dense > 0 and h200["dense_copies_per_gpu"] == 0
    assert mem["bytes_per_gpu"] == h200["bytes_per_gpu"] + dense
    f32 = roofline(seed, "H200", "fp32", batch=1, prompt_len=128)
    assert f32["prefill"]["compute_seconds"] == pytest.approx(f32["prefill"]["flops"] / 67e12)
    assert f32["decode"]["weight_bytes"] == pytest.approx(2 * bf["decode"]["weight_bytes"])


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_per_gpu_split_matches_params(seed, v3, n, dtype):
    for args in (seed, v3):
        mine = sum(_tensor_bytes(t, dtype, n) for t in tensor_specs(args))
        assert mine == weight_bytes_per_gpu(args, dtype, n)


def test_eight_gpus_divide_bytes_and_add_communication(seed):
    one = roofline(seed, "H200", "bf16", batch=2, prompt_len=128, n_gpus=1)
    eight = roofline(seed, "H200", "bf16", batch=2, prompt_len=128, n_gpus=8)
    assert one["prefill"]["comm_seconds"] == 0 and eight["note"] == ""
    for phase in ("prefill", "decode"):
        p1, p8 = one[phase], eight[phase]
        # one GPU's share: an eighth of what is split plus the replicated parts
        assert p1["weight_bytes"] / 8 < p8["weight_bytes"]
        assert p8["weight_bytes"] < p1["weight_bytes"] / 4
        assert p1["flops"] / 8 < p8["flops"] < p1["flops"] / 4
        assert p8["comm_seconds"] > 0 and p8["comm_bytes"] > 0
        assert p8["seconds"] == pytest.approx(
            max(p8["compute_seconds"], p8["memory_seconds"]) + p8["comm_seconds"]
        )
        assert p8["comm_seconds"] == pytest.approx(p8["comm_bytes"] / GPUS["H200"].link_bandwidth)
    # 2(L) + 1 ring all-reduces of (tokens, dim) bf16 activations + the logits all-gather
    tokens, L = 2 * 128, seed.n_layers
    comm = (2 * L + 1) * 2 * 7 / 8 * tokens * seed.dim * 2 + 7 / 8 * 2 * seed.vocab_size * 2
    assert eight["prefill"]["comm_bytes"] == pytest.approx(comm)
    assert eight["memory"]["weights_per_gpu"] == weight_bytes_per_gpu(seed, "bf16", 8)
    # a split dsv3.parallel refuses is named, as the build names it, and does not fit
    three = roofline(seed, "H200", "bf16", n_gpus=3)
    assert "does not split over world_size=3" in three["memory"]["split"]
    assert not three["memory"]["fits"] and eight["memory"]["split"] == ""
    row = speed_table(seed, "bf16", 1, 128, gpus=("H200",), n_gpus=(3,))[0]
    assert not row["fits"] and row["split"] == three["memory"]["split"]


def test_override_layer_changes_the_numbers():
    base = dict(n_layers=4, dim=512, vocab_size=4096, inter_dim=1024, moe_inter_dim=256)
    a = ModelArgs(**base)
    b = ModelArgs(**base, layer_config={2: {"n_heads": 32}})
    assert count_params(b)["total"] > count_params(a)["total"]
    ra, rb = (roofline(x, "H100 SXM", "bf16", batch=4, prompt_len=256) for x in (a, b))
    for phase in ("prefill", "decode"):
        assert rb[phase]["flops"] > ra[phase]["flops"]
        assert rb[phase]["weight_bytes"] > ra[phase]["weight_bytes"]
    assert rb["decode"]["kv_bytes"] == ra["decode"]["kv_bytes"]  # absorb: latent, not per head
    na, nb = (
        roofline(x.replace(attn_impl="naive"), "H100 SXM", "bf16", batch=4, prompt_len=256)
        for x in (a, b)
    )
    assert nb["decode"]["kv_bytes"] > na["decode"]["kv_bytes"] > ra["decode"]["kv_bytes"]
    # an override of one layer's expert count changes only that layer's experts touched
    c = ModelArgs(**base, layer_config={3: {"n_routed_experts": 16, "n_activated_experts": 2}})
    rc = roofline(c, "H100 SXM", "bf16", batch=1, prompt_len=8)
    assert rc["decode"]["experts_touched"] == pytest.approx((6 * 2 + 2) / 3)


def test_fits_per_gpu_and_n(v3):
    assert not fits(v3, "H200", "bf16", 1, 4096, 1)["fits"]
    assert fits(v3, "H200", "fp8", 1, 4096, 8)["fits"]
    assert not fits(v3, "H100 SXM", "bf16", 1, 4096, 8)["fits"]  # 1.34 TB over 640 GB
    r = roofline(v3, "H200", "fp8", batch=1, prompt_len=1024, n_gpus=8)
    assert r["memory"]["fits"] and r["decode"]["bound"] == "memory"
    assert r["decode"]["experts_touched"] == pytest.approx(8)
    rows = speed_table(v3, "fp8", 1, 1024, gpus=("H200", "A100 80GB"), n_gpus=(1, 8))
    assert [(x["gpu"], x["n_gpus"]) for x in rows] == [
        ("H200", 1),
        ("H200", 8),
        ("A100 80GB", 1),
        ("A100 80GB", 8),
    ]
    assert [x["fits"] for x in rows] == [False, True, False, False]
    assert all(x["decode_tokens_per_s"] > 0 and x["prefill_seconds"] > 0 for x in rows)


def test_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import dsv3.roofline as r, dsv3.compare as c\n"
        "from dsv3 import presets\n"
        "a = presets.load('seed-demo')\n"
        "assert r.roofline(a, 'H200')['prefill']['seconds'] > 0\n"
        "assert r.measure_gpu() is None\n"
        "assert c.to_markdown(c.compare(a, a))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_measure_gpu():
    import torch

    g = measure_gpu(seconds=0.2)
    if not torch.cuda.is_available():
        assert g is None
        return
    assert isinstance(g, GPU) and g.name == "this GPU"
    assert g.bf16_flops > 1e12 and g.bandwidth > 1e11 and math.isfinite(g.memory_bytes)
    r = roofline(presets.load("small"), g, "bf16")
    assert r["prefill"]["seconds"] > 0


@pytest.mark.parametrize("n", [1, 8])
def test_mtp_modules_are_held_but_not_read(v3, n):
    """A plain forward does not run the MTP modules: their weights count in memory, not in the
    bytes a step reads or the FLOPs it does (V3's MTP layer holds 11.6B parameters, 256 experts
    of them: counted as read, they took 1-GPU H200 decode from 64.5 to 49.2 tokens/s)."""
    assert v3.n_mtp_layers > 0
    bare = v3.replace(n_mtp_layers=0)
    with_mtp, without = (roofline(a, "H200", "bf16", 1, 1024, n) for a in (v3, bare))
    for phase in ("prefill", "decode"):
        for k in ("weight_bytes", "flops", "seconds"):
            assert with_mtp[phase][k] == pytest.approx(without[phase][k]), (phase, k)
    assert with_mtp["memory"]["weights_per_gpu"] > without["memory"]["weights_per_gpu"]
