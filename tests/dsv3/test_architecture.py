"""dsv3.architecture: the named-shape view from ModelArgs alone, and the trace filter; and
dsv3.stats.router_stats, the router statistics the expert-load views plot."""

from __future__ import annotations

import time

import pytest
import torch

from dsv3 import ModelArgs, Transformer, presets
from dsv3 import stats as dstats
from dsv3.architecture import (
    architecture,
    architecture_markdown,
    architecture_table,
    filter_trace,
)
from dsv3.moe import MoE
from tests.conftest import TINY


def layer_groups(rows):
    return [r for r in rows if r["kind"] == "layers"]


def module(row, name):
    return next(m for m in row["modules"] if m["name"] == name)


def axes(m):
    return dict((a, n) for a, n in m["axes"])


def test_671b_collapses_into_few_groups_fast():
    args = presets.load("deepseek-v3-671b")
    start = time.perf_counter()
    rows = architecture(args, batch=2, seq=128)
    assert time.perf_counter() - start < 0.5  # no torch, no allocation
    # V3's MTP module closes the view: built and counted, marked as not run
    assert [r["kind"] for r in rows] == ["embed", "layers", "layers", "head", "mtp"]
    assert rows[-1]["label"] == "MTP 61 (not run)"
    dense, moe = layer_groups(rows)
    assert dense["label"] == "layers 0-2, x3" and dense["ffn"] == "dense"
    assert moe["label"] == "layers 3-60, x58" and moe["count"] == 58 and moe["ffn"] == "moe"
    assert not dense["override"] and not moe["override"] and moe["diff"] == {}
    # named axes of the MLA path (absorb) and the MoE path
    assert axes(module(moe, "wq_a")) == {"batch": 2, "seq": 128, "q_latent": 1536}
    assert axes(module(moe, "wq_b")) == {"batch": 2, "seq": 128, "heads": 128, "head_dim": 192}
    assert axes(module(moe, "q_nope"))["nope"] == 128 and axes(module(moe, "q_rope"))["rope"] == 64
    assert axes(module(moe, "wkv_a"))["latent+rope"] == 512 + 64
    assert axes(module(moe, "kv_norm"))["latent"] == 512
    assert axes(module(moe, "q absorbed")) == {"batch": 2, "seq": 128, "heads": 128, "latent": 512}
    assert axes(module(moe, "scores"))["ctx"] == 128
    assert axes(module(moe, "gate")) == {"tokens": 256, "experts": 256}
    assert axes(module(moe, "group scores"))["groups"] == 8
    assert axes(module(moe, "kept groups"))["kept_groups"] == 4
    assert axes(module(moe, "top-k")) == {"tokens": 256, "topk": 8}
    assert axes(module(moe, "experts w1, w3")) == {"pairs": 256 * 8, "expert_inter": 2048}
    assert axes(module(moe, "shared experts"))["shared_inter"] == 2048
    assert axes(module(dense, "w1, w3"))["inter"] == 18432
    assert axes(rows[-1]["modules"][-1]) == {"batch": 2, "vocab": 129280}
    assert module(moe, "wq_b")["text"] == "(batch 2, seq 128, heads 128, head_dim 192)"


@pytest.mark.parametrize("seq", [16, 4096])
def test_dsa_rows_say_when_the_indexer_skips_its_scores(seq):
    """While a prefill is no longer than index_topk every key is kept: the indexer makes its
    keys but no queries, weights or scores (the shape trace has no rows for them)."""
    args = presets.load("deepseek-v3.2-exp")
    row = next(r for r in layer_groups(architecture(args, 1, seq)) if "index q" in
               [m["name"] for m in r["modules"]])  # fmt: skip
    skipped = {m["name"] for m in row["modules"] if "skips this while ctx <= index_topk" in m["op"]}
    want = {"index q", "index weights", "index scores", "kept"} if seq <= 2048 else set()
    assert skipped == want


def test_naive_path_expands_per_head():
    rows = architecture(presets.load("deepseek-v3-671b"), seq=16, attn_path="naive")
    moe = layer_groups(rows)[1]
    assert moe["attn_path"] == "naive" and not moe["note"]
    assert axes(module(moe, "wkv_b"))["nope+v_dim"] == 128 + 128
    assert axes(module(moe, "k cache")) == {"batch": 1, "ctx": 16, "heads": 128, "head_dim": 192}
    assert axes(module(moe, "v cache"))["v_dim"] == 128
    assert "q absorbed" not in {m["name"] for m in moe["modules"]}
    with pytest.raises(ValueError):
        architecture(presets.load("tiny"), attn_path="flash")


def test_seed_demo_shows_the_head_override_as_heads():
    rows = architecture(presets.load("seed-demo"))
    labels = [r["label"] for r in layer_groups(rows)]
    assert labels == [
        "layer 0",
        "layers 1-4, x4",
        "layer 5",
        "layers 6-9, x4",
        "layer 10",
        "layers 11-31, x21",
    ]
    by = {r["label"]: r for r in rows}
    five = by["layer 5"]
    assert five["override"] and five["diff"] == {"n_heads": [16, 32]}
    assert "n_heads 16 -> 32" in five["diff_text"]
    # the head count is a named axis of every per-head module, and only it changed
    for name in ("wq", "q_nope", "q_rope", "q absorbed", "scores", "attention", "v absorbed"):
        m = module(five, name)
        assert axes(m)["heads"] == 32 and m["changed_axes"] == ["heads"]
        assert axes(module(by["layers 1-4, x4"], name))["heads"] == 16
    assert module(five, "wkv_a")["changed_axes"] == []
    ten = by["layer 10"]
    assert ten["diff"] == {"moe_inter_dim": [1408, 4096]}
    assert module(ten, "experts w1, w3")["changed_axes"] == ["expert_inter"]
    # groups of identical shapes point at the first one
    assert by["layers 6-9, x4"]["same_as"] == "layers 1-4, x4"
    assert by["layers 11-31, x21"]["same_as"] == "layers 1-4, x4"


def test_mixed_layers_overrides():
    rows = architecture(presets.load("mixed-layers"))
    by = {r["first"]: r for r in layer_groups(rows)}
    assert len(by) == 8  # every layer differs from its neighbours
    assert by[2]["ffn"] == "dense" and by[2]["diff"] == {
        "inter_dim": [1024, 512],
        "ffn": ["moe", "dense"],
    }
    assert module(by[2], "w1, w3")["changed_axes"] == ["inter"]
    assert by[4]["diff"] == {"n_heads": [8, 4], "q_lora_rank": [96, 0]}
    names4 = {m["name"] for m in by[4]["modules"]}
    assert "wq" in names4 and "wq_a" not in names4  # no q LoRA
    assert axes(module(by[5], "scores"))["heads"] == 16 and by[5]["ffn"] == "dense"
    assert "shared experts" not in {m["name"] for m in by[7]["modules"]}
    assert "group scores" not in {m["name"] for m in by[7]["modules"]}  # one group
    assert not by[0]["override"] and not by[1]["override"]


def test_markdown_and_table_forms():
    rows = architecture(presets.load("seed-demo"))
    md = architecture_markdown(rows)
    assert "### layers 11-31, x21" in md and "**override**" in md and "**heads 32**" in md
    table = architecture_table(rows, minor=False)
    assert {"layers", "stage", "module", "op", "shape", "changed", "override"} <= set(table[0])
    assert not any(r["module"] in ("attn_norm", "ffn_norm") for r in table)
    five = [r for r in table if r["layers"] == "layer 5" and r["module"] == "scores"]
    assert five[0]["changed"] == "heads" and "heads 32" in five[0]["shape"]


TRACE = [
    {"name": "embed", "type": "Embedding", "layer": None, "shape": [2, 8, 32]},
    {"name": "layers.0.attn", "type": "MLA", "layer": 0, "shape": [2, 8, 32]},
    {"name": "layers.0.attn.wq", "type": "Linear", "layer": 0, "shape": [2, 8, 64]},
    {"name": "layers.1.attn", "type": "MLA", "layer": 1, "shape": [2, 8, 32]},
    {"name": "head", "type": "Linear", "layer": None, "shape": [2, 256]},
]


def test_filter_trace():
    assert filter_trace(TRACE) == TRACE
    assert [r["name"] for r in filter_trace(TRACE, layer=0)] == [
        "layers.0.attn",
        "layers.0.attn.wq",
    ]
    assert [r["name"] for r in filter_trace(TRACE, module_type="mla")] == [
        "layers.0.attn",
        "layers.1.attn",
    ]
    assert [r["name"] for r in filter_trace(TRACE, layer="1", module_type="MLA")] == [
        "layers.1.attn"
    ]
    assert [r["name"] for r in filter_trace(TRACE, layer="none")] == ["embed", "head"]
    assert filter_trace(TRACE, layer=5) == []


# ---------------------------------------------------------------------- dsv3.stats.router_stats
@pytest.fixture(scope="module")
def routed():
    """The tiny model (sigmoid, 4 groups keep 2, gate bias) after a full forward with router
    scores kept and a random bias (init sets it to zero)."""
    args = ModelArgs(**TINY)
    torch.manual_seed(0)
    model = Transformer(args, device="cpu", dtype=torch.float32)
    model.init_weights()
    assert dstats.record_router_scores(model) == 3
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, MoE):
            mod.gate.bias.copy_(torch.randn(mod.gate.bias.shape, generator=gen) * 0.1)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=gen)
    model(tokens, full=True)
    return model


def test_router_scores_kept_only_when_asked(tiny_model):
    tiny_model(torch.zeros(1, 4, dtype=torch.long), full=True)
    assert dstats.router_stats(tiny_model) == []  # off by default: nothing kept
    dstats.record_router_scores(tiny_model)
    tiny_model(torch.zeros(1, 4, dtype=torch.long), full=True)
    assert len(dstats.router_stats(tiny_model)) == 3
    dstats.record_router_scores(tiny_model, on=False)
    assert dstats.router_stats(tiny_model) == []


def test_select_experts_is_the_gates_choice(routed):
    for mod in routed.modules():
        if isinstance(mod, MoE):
            g = mod.gate
            sel = dstats.select_experts(g.last_scores, g.bias, g.n_groups, g.topk_groups, g.topk)
            ref = torch.zeros_like(sel).scatter_(1, mod.last_indices, True)
            assert torch.equal(sel, ref)


def test_router_stats_histograms_and_bias_changes(routed):
    rs = dstats.router_stats(routed, bins=12)
    assert [r["layer"] for r in rs] == [1, 2, 3]
    for r in rs:
        T, E, K = r["n_tokens"], r["n_experts"], r["topk"]
        assert (T, E, K) == (32, 8, 2) and r["gate_bias"] and r["score_func"] == "sigmoid"
        assert len(r["bin_edges"]) == 13 and len(r["hist"]) == 12
        assert sum(r["hist"]) == T * E and sum(r["chosen_hist"]) == T * K
        assert 0 < r["bias_changed"] <= r["bias_changed_tokens"] <= 1
        assert r["bias_min"] < 0 < r["bias_max"]
    # by hand for one layer: the choices without the bias
    mod = next(m for m in routed.modules() if isinstance(m, MoE))
    g = mod.gate
    with_b = dstats.select_experts(g.last_scores, g.bias, g.n_groups, g.topk_groups, g.topk)
    zero = torch.zeros_like(g.bias)  # the same rule (groups by their top two), bias at zero
    without = dstats.select_experts(g.last_scores, zero, g.n_groups, g.topk_groups, g.topk)
    changed = (with_b & ~without).sum().item() / (32 * 2)
    assert rs[0]["bias_changed"] == pytest.approx(changed)


def test_router_stats_without_bias_change_nothing(routed):
    for mod in routed.modules():
        if isinstance(mod, MoE):
            mod.gate.bias.zero_()
    routed(torch.randint(0, 512, (1, 8)), full=True)
    assert all(r["bias_changed"] == 0.0 for r in dstats.router_stats(routed))
