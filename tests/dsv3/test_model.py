"""The model: overrides build what they say, implementations agree, caches, dtypes, devices."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dsv3 import ConfigError, ModelArgs, Transformer, count_params
from dsv3.layers import FP8, dequantize, quantize_fp8
from dsv3.moe import MoE, dispatch_grouped, dispatch_loop, grouped_mm_supported
from dsv3.params import tensor_specs
from dsv3.stats import routing_stats, trace_shapes

from ..conftest import TINY, clone_model

# One value per overridable field, applied to layer 2 (MoE) or layer 0 (dense) of TINY.
OVERRIDES = [
    (2, "n_heads", 8),
    (2, "q_lora_rank", 0),
    (2, "kv_lora_rank", 16),
    (2, "qk_nope_head_dim", 8),
    (2, "v_head_dim", 8),
    (0, "inter_dim", 40),
    (2, "moe_inter_dim", 48),
    (2, "n_routed_experts", 16),
    (2, "n_shared_experts", 0),
    (2, "n_activated_experts", 4),
    (2, "n_expert_groups", 2),
    (2, "n_limited_groups", 1),
    (2, "score_func", "softmax"),
    (2, "route_scale", 1.0),
    (2, "gate_bias", False),
    (2, "attn_impl", "naive"),
    (2, "ffn", "dense"),
    (0, "ffn", "moe"),
]


def _layer_signature(block) -> tuple:
    shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in block.state_dict().items())
    attn = block.attn
    sig = (shapes, attn.attn_impl, attn.softmax_scale, tuple(attn.cache.shapes.items()))
    if isinstance(block.ffn, MoE):
        g = block.ffn.gate
        sig += (g.topk, g.n_groups, g.topk_groups, g.score_func, g.route_scale, g.bias is None)
    return sig


@pytest.mark.parametrize(
    "layer, field, value", OVERRIDES, ids=[f"{f}@{l}" for l, f, _ in OVERRIDES]
)
def test_override_changes_exactly_its_layer(layer, field, value):
    base = ModelArgs(**TINY)
    over = ModelArgs(**TINY, layer_config={layer: {field: value}})
    assert getattr(over.for_layer(layer), field) == value
    mb, mo = Transformer(base, device="meta"), Transformer(over, device="meta")
    changed = [
        i for i in range(base.n_layers)
        if _layer_signature(mb.layers[i]) != _layer_signature(mo.layers[i])
    ]  # fmt: skip
    assert changed == [layer]
    assert count_params(over)["total"] == sum(p.numel() for p in mo.parameters())
    # the overridden model runs
    torch.manual_seed(0)
    model = Transformer(over, device="cpu")
    out = model(torch.randint(0, over.vocab_size, (2, 12)))
    assert out.shape == (2, over.vocab_size) and out.isfinite().all()


def test_seed_demo_layers_really_differ():
    a = ModelArgs(
        n_layers=32, dim=2048, layer_config={5: {"n_heads": 32}, 10: {"moe_inter_dim": 4096}}
    )
    m = Transformer(a, device="meta", dtype="bf16")
    assert m.layers[5].attn.wq.weight.shape == (32 * 192, 2048)
    assert m.layers[4].attn.wq.weight.shape == (16 * 192, 2048)
    assert isinstance(m.layers[10].ffn, MoE)  # the seed turned this layer into a dense MLP
    assert m.layers[10].ffn.experts.w1.shape == (64, 4096, 2048)
    assert count_params(a)["total"] == 19_733_301_248 == sum(p.numel() for p in m.parameters())


def test_state_dict_matches_analytic_specs(tiny_args):
    m = Transformer(tiny_args, device="meta")
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = {t.name: t.shape for t in tensor_specs(tiny_args)}
    assert got == want


def test_reference_per_expert_state_dict_loads(tiny_model, tiny_args):
    sd = {}
    for k, v in tiny_model.state_dict().items():
        if ".experts.w" in k:  # unstack into the reference's per-expert names
            prefix, name = k.rsplit(".", 1)
            for e in range(v.shape[0]):
                sd[f"{prefix}.{e}.{name}.weight"] = v[e].clone()
        else:
            sd[k] = v.clone()
    assert "layers.1.ffn.experts.7.w2.weight" in sd
    other = Transformer(tiny_args, device="meta")
    other.to_empty(device="cpu")
    other.load_state_dict(sd, strict=True)
    tok = torch.randint(0, tiny_args.vocab_size, (2, 9))
    torch.testing.assert_close(other(tok), tiny_model(tok), rtol=0, atol=0)


def test_seeded_init_is_reproducible_and_sensible(tiny_args):
    torch.manual_seed(3)
    a = Transformer(tiny_args)
    torch.manual_seed(3)
    b = Transformer(tiny_args)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    tok = torch.randint(0, tiny_args.vocab_size, (4, 64))
    logits = a(tok, all_logits=True)
    assert logits.isfinite().all()
    assert 0.3 < logits.std() < 5  # O(1) logits, not ~1e-3
    for s in routing_stats(a):
        used = sum(c > 0 for c in s["counts"])
        assert used >= 0.75 * s["n_experts"], s
        assert s["max_over_mean"] < 3


def test_prefill_then_decode_equals_full_forward(tiny_model, tiny_args):
    tok = torch.randint(0, tiny_args.vocab_size, (2, 24))
    full = tiny_model(tok, all_logits=True)
    tiny_model.reset_cache()
    steps = [tiny_model(tok[:, :16], all_logits=True)]
    for i in range(16, 24):
        steps.append(tiny_model(tok[:, i : i + 1], start_pos=i, all_logits=True))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=2e-5)
    # last-position logits are the default output
    torch.testing.assert_close(tiny_model(tok), full[:, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_chunked_prefill_has_causal_mask(tiny_args, impl):
    torch.manual_seed(0)
    m = Transformer(tiny_args.replace(attn_impl=impl))
    tok = torch.randint(0, tiny_args.vocab_size, (2, 30))
    full = m(tok, all_logits=True)
    parts = [m(tok[:, :11], all_logits=True), m(tok[:, 11:20], start_pos=11, all_logits=True)]
    parts.append(m(tok[:, 20:], start_pos=20, all_logits=True))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=2e-5)


def test_naive_equals_absorb(tiny_model, tiny_args):
    naive = clone_model(tiny_model, tiny_args.replace(attn_impl="naive"))
    tok = torch.randint(0, tiny_args.vocab_size, (3, 20))
    ref = naive(tok, all_logits=True)
    # the absorbed math for the prefill too, not only decode
    got = clone_model(tiny_model, tiny_args, absorbed_prefill=True)(tok, all_logits=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    # decode through both caches
    for m in (naive, tiny_model):
        m.reset_cache()
        m(tok[:, :10])
    for pos in range(10, 20):
        a = naive(tok[:, pos : pos + 1], start_pos=pos)
        b = tiny_model(tok[:, pos : pos + 1], start_pos=pos)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    assert set(naive.layers[1].attn.cache.tensors) == {"k", "v"}
    assert set(tiny_model.layers[1].attn.cache.tensors) == {"kv", "pe"}


def test_grouped_dispatch_equals_loop():
    torch.manual_seed(0)
    E, D, I = 8, 64, 32
    counts = [5, 0, 17, 3, 0, 9, 1, 13]
    x = torch.randn(sum(counts), D)
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    assert grouped_mm_supported(x, w1, w2, w3)
    want = dispatch_loop(x, counts, w1, w2, w3)
    # float32 rounding relative to the outputs' scale (~400 with these unscaled weights): the
    # loop's products take whichever form `linear` measured fastest (MKL or oneDNN), each
    # summing in its own order; a fixed atol of 1e-4 failed 2 runs of 3 by 1.7e-4
    scale = want.abs().max().item()
    torch.testing.assert_close(
        dispatch_grouped(x, counts, w1, w2, w3), want, rtol=1e-5, atol=2e-6 * scale
    )


def test_grouped_and_loop_models_agree(tiny_model, tiny_args):
    tok = torch.randint(0, tiny_args.vocab_size, (2, 16))
    outs = {}
    for impl in ("loop", "grouped", "padded", "gathered"):
        outs[impl] = clone_model(tiny_model, tiny_args, moe_impl=impl)(tok, all_logits=True)
    torch.testing.assert_close(outs["loop"], outs["grouped"], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["loop"], outs["padded"], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["loop"], outs["gathered"], rtol=0, atol=1e-5)


def _gate_by_hand(x, weight, bias, score_func, n_groups, topk_groups, topk, route_scale):
    """The routing rule written out per token, independently of dsv3.routing."""
    out_w, out_i = [], []
    for t in range(x.shape[0]):
        logits = [float(v) for v in weight.double() @ x[t].double()]
        if score_func == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            scores = [e / sum(ex) for e in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        E = len(scores)
        per = E // n_groups
        if n_groups > 1:
            gs = []
            for g in range(n_groups):
                members = sorted(choice[g * per : (g + 1) * per], reverse=True)
                gs.append(members[0] if bias is None else members[0] + members[1])
            keep = sorted(range(n_groups), key=lambda g: -gs[g])[:topk_groups]
            choice = [c if e // per in keep else -math.inf for e, c in enumerate(choice)]
        idx = sorted(range(E), key=lambda e: -choice[e])[:topk]
        w = [scores[e] for e in idx]
        if score_func == "sigmoid":
            w = [v / sum(w) for v in w]
        out_w.append([v * route_scale for v in w])
        out_i.append(idx)
    return torch.tensor(out_w), torch.tensor(out_i)


@pytest.mark.parametrize(
    "score_func, groups, limited, bias",
    [
        ("softmax", 1, 1, False),
        ("softmax", 4, 2, False),
        ("sigmoid", 4, 2, True),
        ("sigmoid", 1, 1, True),
    ],
)
def test_gate_matches_rule_written_out(score_func, groups, limited, bias):
    args = ModelArgs(**{**TINY, "score_func": score_func, "n_expert_groups": groups,
                        "n_limited_groups": limited, "gate_bias": bias})  # fmt: skip
    torch.manual_seed(1)
    m = Transformer(args)
    gate = m.layers[1].ffn.gate
    if gate.bias is not None:
        gate.bias.normal_(0, 0.3)
    x = torch.randn(20, args.dim)
    w, i = gate(x)
    ew, ei = _gate_by_hand(
        x, gate.weight, gate.bias, score_func, groups, limited, 2, args.route_scale
    )
    assert torch.equal(i.sort(-1)[0], ei.sort(-1)[0])
    order_w = torch.gather(w, 1, i.argsort(-1))
    order_e = torch.gather(ew, 1, ei.argsort(-1))
    torch.testing.assert_close(order_w, order_e.float(), rtol=1e-5, atol=1e-6)


def test_yarn_tables_match_formula(tiny_args):
    """YaRN written independently from the paper/reference description."""
    from dsv3.rotary import precompute_freqs_cis

    a = tiny_args
    d, base, factor, orig = a.qk_rope_head_dim, a.rope_theta, a.rope_factor, a.original_seq_len

    def dim_for(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for(a.beta_fast)), 0)
    high = min(math.ceil(dim_for(a.beta_slow)), d - 1)
    expected = []
    for j in range(d // 2):
        f = base ** (-2 * j / d)
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        expected.append(f / factor * ramp + f * (1 - ramp))
    cos, sin = precompute_freqs_cis(a, 50)
    ang = torch.tensor([[p * f for f in expected] for p in range(50)], dtype=torch.float64)
    torch.testing.assert_close(cos.double(), ang.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), ang.sin(), rtol=0, atol=1e-5)
    # and YaRN really changes the low frequencies (the seed silently dropped it)
    plain_cos, _ = precompute_freqs_cis(a.replace(rope_scaling="none"), 50)
    assert (plain_cos - cos).abs().max() > 0.1


def test_fp8_weights_scales_and_forward(tiny_args):
    torch.manual_seed(0)
    m = Transformer(tiny_args, dtype="fp8")
    assert m.layers[0].attn.wkv_a.weight.dtype == FP8
    assert m.layers[1].ffn.experts.w1.dtype == FP8
    assert (
        m.head.weight.dtype == torch.bfloat16
        and m.layers[1].ffn.gate.weight.dtype == torch.bfloat16
    )
    sd = m.state_dict()
    assert (
        "layers.0.attn.wkv_a.scale" in sd and sd["layers.0.attn.wkv_a.scale"].dtype == torch.float32
    )
    assert "layers.1.ffn.experts.w1_scale" in sd
    assert not any(n.endswith("scale") for n, _ in m.named_parameters())
    assert sum(p.numel() for p in m.parameters()) == count_params(tiny_args)["total"]
    out = m(torch.randint(0, tiny_args.vocab_size, (2, 16)), all_logits=True)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_fp8_quantisation_round_trip():
    w = torch.randn(300, 200) * 0.05
    q, s = quantize_fp8(w)
    assert q.dtype == FP8 and s.shape == (3, 2)
    back = dequantize(q, s, torch.float32)
    assert ((back - w).abs() / w.abs().amax()).max() < 0.07  # e4m3 keeps ~3 mantissa bits


def test_bf16_forward_close_to_fp32(tiny_model, tiny_args):
    m16 = clone_model(tiny_model, tiny_args, dtype="bf16")
    tok = torch.randint(0, tiny_args.vocab_size, (2, 16))
    a, b = tiny_model(tok).float(), m16(tok).float()
    assert m16(tok).dtype == torch.bfloat16
    assert (a - b).abs().max() < 0.15 * a.abs().max()


def test_rotary_survives_dtype_cast(tiny_model, tiny_args):
    tok = torch.randint(0, tiny_args.vocab_size, (1, 8))
    tiny_model.to(torch.bfloat16)
    cos, sin = tiny_model._rotary(torch.device("cpu"), 0, 8)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert tiny_model(tok).isfinite().all()


def test_kv_cache_sized_to_use(tiny_model, tiny_args):
    tiny_model(torch.randint(0, tiny_args.vocab_size, (2, 10)))
    kv = tiny_model.layers[1].attn.cache.tensors["kv"]
    assert kv.shape == (2, 10, tiny_args.kv_lora_rank)  # not max_batch_size x max_seq_len
    tiny_model(torch.randint(0, tiny_args.vocab_size, (2, 1)), start_pos=10)
    assert 11 <= tiny_model.layers[1].attn.cache.capacity[1] <= 16
    tiny_model.reserve_cache(2, 40)
    assert tiny_model.layers[1].attn.cache.capacity == (2, 40)


@pytest.mark.parametrize(
    "tokens, start_pos, field",
    [
        (torch.full((1, 4), 512), 0, "tokens"),
        (torch.full((1, 4), -1), 0, "tokens"),
        (torch.zeros(1, 257, dtype=torch.long), 0, "max_seq_len"),
        (torch.zeros(5, 4, dtype=torch.long), 0, "max_batch_size"),
        (torch.zeros(0, 4, dtype=torch.long), 0, "tokens"),
        (torch.zeros(1, 0, dtype=torch.long), 0, "tokens"),
        (torch.zeros(1, 4), 0, "tokens"),
        (torch.zeros(1, 1, dtype=torch.long), 5, "start_pos"),
    ],
)
def test_bad_inputs_are_clear_errors(tiny_model, tokens, start_pos, field):
    with pytest.raises(ConfigError) as e:
        tiny_model(tokens, start_pos=start_pos)
    assert e.value.field == field


def test_meta_build_and_trace_shapes():
    args = ModelArgs(layer_config={5: {"n_heads": 32}})
    m = Transformer(args, device="meta", dtype="bf16")
    rows = trace_shapes(m, torch.zeros(2, 16, dtype=torch.long, device="meta"))
    assert rows[-1]["shape"] == [2, args.vocab_size]
    by_name = {r["name"]: r["shape"] for r in rows}
    assert by_name["layers.5.attn.wq"] == [2, 16, 32 * 192]
    assert by_name["layers.4.attn.wq"] == [2, 16, 16 * 192]
    assert by_name["layers.26.ffn"] == [2, 16, 2048]
    assert {r["layer"] for r in rows if r["layer"] is not None} == set(range(27))


def test_routing_stats_counts_every_assignment(tiny_model, tiny_args):
    tok = torch.randint(0, tiny_args.vocab_size, (2, 32))
    tiny_model(tok, full=True)
    stats = routing_stats(tiny_model)
    assert [s["layer"] for s in stats] == [1, 2, 3]
    for s in stats:
        assert sum(s["counts"]) == 64 * tiny_args.n_activated_experts
        assert sum(s["group_counts"]) == sum(s["counts"]) and len(s["group_counts"]) == 4
        assert 0 < s["entropy_norm"] <= 1
    # A default (last-position) forward routes only the last position in the last layer.
    tiny_model(tok)
    counts = [sum(s["counts"]) for s in routing_stats(tiny_model)]
    assert counts == [64 * tiny_args.n_activated_experts] * 2 + [2 * tiny_args.n_activated_experts]


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_last_layer_pruning_is_exact(tiny_args, attn_impl):
    """Default forwards compute only the last position in the last layer: same logits as the
    full forward, and the same cache (decoding continues identically)."""
    import dataclasses

    args = dataclasses.replace(tiny_args, attn_impl=attn_impl)
    torch.manual_seed(0)
    model = Transformer(args, device="cpu")
    tok = torch.randint(0, args.vocab_size, (2, 24))
    full = model(tok[:, :20], full=True)
    cache_full = [blk.attn.cache.tensors for blk in model.layers]
    cache_full = [{k: v.clone() for k, v in c.items()} for c in cache_full]
    pruned = model(tok[:, :20])
    torch.testing.assert_close(pruned, full, rtol=0, atol=2e-5)
    for blk, want in zip(model.layers, cache_full):
        for k, v in blk.attn.cache.tensors.items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    # A chunk from start_pos > 0 prunes too, then decoding goes on from the cache.
    chunk = model(tok[:, 20:23], start_pos=20)
    step = model(tok[:, 23:], start_pos=23)
    model.reset_cache()
    ref = model(tok, all_logits=True)
    torch.testing.assert_close(chunk, ref[:, 22], rtol=0, atol=2e-5)
    torch.testing.assert_close(step, ref[:, 23], rtol=0, atol=2e-5)


def test_cli_seed_demo_prints_output_shape(capsys):
    from dsv3.__main__ import main

    assert main(["--seed-demo", "--device", "meta"]) == 0
    out = capsys.readouterr().out
    assert "torch.Size([2, 102400])" in out and "19,733,301,248" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        # a traceback from torch.cat: the steps were cut to 0 without a word
        (
            "--seq 512 --decode 4",
            "error: --seq 512 + --decode 4 = 516 exceeds max_seq_len=512; "
            "allowed: --seq + --decode <= 512",
        ),
        ("--seq 100000", "error: --seq 100000 is out of range; allowed: 1..512 (max_seq_len)"),
        ("--batch 5", "error: --batch 5 is out of range; allowed: 1..4 (max_batch_size)"),
        # a traceback from torch.manual_seed; -1 was taken
        (
            "--seed 99999999999999999999999",
            "argument --seed: 99999999999999999999999 is out of "
            "range; allowed: 0..9007199254740991",
        ),
        ("--seed -1", "argument --seed: -1 is out of range; allowed: 0..9007199254740991"),
        ("--decode -5", "argument --decode: -5 is out of range; allowed: >= 0"),
        # "invalid _positive value: 'abc'" under ~35 lines of usage
        ("--batch abc", "argument --batch: 'abc' is not a whole number; allowed: >= 1"),
        ("--dim 2.5", "argument --dim: '2.5' is not a whole number; allowed: 1..65536"),
        ("--rope-factor 1e400", "argument --rope-factor: '1e400' is not a finite number"),
        ("--rope-factor 0.5", "error: --rope-factor: rope_factor=0.5 is out of range"),
    ],
)
def test_cli_bad_values_are_one_line_naming_the_option_and_range(capsys, argv, words):
    from dsv3.__main__ import main

    with pytest.raises(SystemExit) if "argument" in words else contextlib.nullcontext() as e:
        rc = main(["--config", "tiny", "--device", "cpu", *argv.split()])
    rc = e.value.code if e is not None else rc
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_cli_takes_a_plain_model_args_file_and_says_what_it_skips(tmp_path, capsys):
    """--help says "ModelArgs JSON file"; such a file was refused as a preset with unknown keys.
    --seed-demo forced batch 2 x 128 over --batch/--seq, and meta skipped decoding silently."""
    from dsv3.__main__ import main

    f = tmp_path / "plain.json"
    f.write_text('{"n_layers": 2, "dim": 128}')
    assert main(["--config", str(f), "--device", "meta", "--decode", "3"]) == 0
    out = capsys.readouterr().out
    assert "torch.Size([2, 102400])" in out and "the 3 decode steps asked were not run" in out
    assert main(["--seed-demo", "--device", "meta", "--batch", "1", "--seq", "8"]) == 0
    assert "torch.Size([1, 102400])" in capsys.readouterr().out


def test_cli_out_of_memory_is_one_line_not_a_traceback(capsys, monkeypatch):
    """An allocation failure while building (the weights, or fp8's bf16 copies on a GPU
    without an fp8 path) ends the CLI with a message and status 2."""
    from dsv3.__main__ import main

    def no_room(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Transformer, "__init__", no_room)
    assert main(["--config", "tiny", "--device", "cpu", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: out of memory on cpu (OutOfMemoryError)") and "Traceback" not in err
    )
