"""Comparing two configs: the changes listed, the costs side by side, Markdown and CSV."""

from __future__ import annotations

import csv
import io

import pytest

from dsv3 import ModelArgs, count_params, presets
from dsv3.compare import compare, layer_map, to_csv, to_markdown
from dsv3.roofline import GPUS, roofline

BASE = dict(n_layers=8, dim=512, vocab_size=4096, inter_dim=1024, moe_inter_dim=256)


def rows(result: dict) -> dict[str, dict]:
    return {r["metric"]: r for r in result["rows"]}


def test_identical_configs_have_no_changes():
    a = ModelArgs(**BASE)
    r = compare(a, ModelArgs(**BASE))
    assert r["changes"] == []
    assert all(row["a"] == row["b"] for row in r["rows"])
    md = to_markdown(r)
    assert "No changes" in md
    assert "| total parameters |" in md


def test_head_override_on_layer_5_is_exactly_that_change():
    a = ModelArgs(**BASE)
    b = ModelArgs(**BASE, layer_config={5: {"n_heads": 32}})
    r = compare(a, b, batch=2, seq_len=128, n_gpus=1)
    assert [c["text"] for c in r["changes"]] == ["layer 5 n_heads 16 -> 32"]
    c = r["changes"][0]
    assert (c["layers"], c["field"], c["a"], c["b"]) == ((5, 5), "n_heads", 16, 32)
    m = rows(r)
    total = m["total parameters"]
    assert total["a"] == count_params(a)["total"] < total["b"] == count_params(b)["total"]
    assert m["active parameters per token"]["b"] > m["active parameters per token"]["a"]
    assert m["KV per token, naive"]["b"] > m["KV per token, naive"]["a"]
    assert m["KV per token, absorb"]["b"] == m["KV per token, absorb"]["a"]
    assert m["FLOPs per token (128 context)"]["b"] > m["FLOPs per token (128 context)"]["a"]
    assert m["layer map"]["b"] == "0: dense | 1-4: moe | 5: moe n_heads=32 | 6-7: moe"
    # the speed rows are the roofline's
    h200 = m["H200 x1: prefill 2 x 128"]
    assert h200["unit"] == "seconds"
    assert h200["b"] == roofline(b, GPUS["H200"], "bf16", 2, 128, 1)["prefill"]["seconds"]
    assert m["H100 SXM x1: decode"]["unit"] == "tokens/s"
    assert m["H100 SXM x1: memory per GPU fits"]["a"] is True


def test_inherited_changes_show_per_layer_in_ranges():
    a = ModelArgs(**BASE, layer_config={5: {"n_heads": 32}})
    b = a.replace(n_heads=8, n_layers=10)
    texts = [c["text"] for c in compare(a, b)["changes"]]
    assert texts == [
        "n_layers 8 -> 10",
        "n_heads 16 -> 8",
        "layers 0-4 n_heads 16 -> 8",
        "layers 6-7 n_heads 16 -> 8",
        "layers 8-9 only in B",
    ]


def test_a_global_change_no_layer_overrides_is_listed_once():
    a = ModelArgs(**BASE)
    texts = [c["text"] for c in compare(a, a.replace(n_heads=8))["changes"]]
    assert texts == ["n_heads 16 -> 8"]


def test_fields_a_layer_does_not_use_are_not_its_changes():
    """Experts' fields on a dense layer and inter_dim on a MoE layer change nothing there."""
    a = ModelArgs(**BASE)  # layer 0 dense
    b = ModelArgs(**BASE, layer_config={0: {"n_routed_experts": 6}, 3: {"inter_dim": 64}})
    assert compare(a, b)["changes"] == []
    c = ModelArgs(**BASE, layer_config={2: {"n_routed_experts": 32}, 0: {"inter_dim": 64}})
    assert [x["text"] for x in compare(a, c)["changes"]] == [
        "layer 0 inter_dim 1024 -> 64",
        "layer 2 n_routed_experts 64 -> 32",
    ]
    # a layer that changes kind shows the settings its new kind uses
    d = ModelArgs(**BASE, layer_config={3: {"ffn": "dense", "inter_dim": 64}})
    assert [x["text"] for x in compare(a, d)["changes"]] == [
        "layer 3 inter_dim 1024 -> 64",
        "layer 3 ffn moe -> dense",
    ]
    # an unused override does not make a global change look per-layer
    e = ModelArgs(**BASE, layer_config={0: {"n_routed_experts": 6}})
    texts = [x["text"] for x in compare(e, e.replace(n_routed_experts=32))["changes"]]
    assert texts == ["n_routed_experts 64 -> 32"]


def test_kv_cache_rows_compare_like_with_like():
    """A naive B and an absorb A: each cache row holds one path's figure for both sides."""
    a = ModelArgs(**BASE)
    b = a.replace(attn_impl="naive")
    m = rows(compare(a, b, batch=1, seq_len=512))
    for impl in ("naive", "absorb"):
        row = m[f"KV cache 1 x 512, {impl}"]
        assert row["a"] == row["b"] > 0
    assert (
        m["attention path it runs (attn_impl)"]["a"],
        m["attention path it runs (attn_impl)"]["b"],
    ) == (
        "absorb",
        "naive",
    )


def test_small_and_large_figures_stay_readable():
    a = ModelArgs(**BASE)
    b = presets.load("deepseek-v3-671b")
    md = to_markdown(compare(a, b))
    assert "0.00 GFLOP" not in md and "0.000 ms" not in md
    assert "MFLOP" in md or "kFLOP" in md
    ratio = next(
        line.split("|")[-2].strip() for line in md.splitlines() if "| total parameters" in line
    )
    assert ratio.endswith("x") and "," in ratio  # thousands separated
    assert "gate_bias auto -> " in to_markdown(
        compare(a.replace(gate_bias=None), a.replace(gate_bias=True))
    )


def test_layer_map_collapses_runs():
    args = presets.load("seed-demo")
    assert layer_map(args) == (
        "0: dense | 1-4: moe | 5: moe n_heads=32 | 6-9: moe | "
        "10: moe moe_inter_dim=4096 | 11-31: moe"
    )


def test_markdown_and_csv_hold_the_rows():
    a = ModelArgs(**BASE)
    b = ModelArgs(**BASE, layer_config={5: {"n_heads": 32}})
    r = compare(a, b, dtype="fp8", batch=1, seq_len=256, n_gpus=2, gpus=("H200", "A100 80GB"))
    md = to_markdown(r)
    assert "- layer 5 n_heads 16 -> 32" in md
    assert "fp8, batch 1 x 256 tokens, 2 GPUs" in md
    for row in r["rows"]:
        assert f"| {row['metric']} |" in md.replace("\\|", "|")
    assert "| A100 80GB x2: decode |" in md
    table = list(csv.reader(io.StringIO(to_csv(r))))
    assert table[0] == ["kind", "section", "metric", "unit", "a", "b", "delta", "ratio"]
    assert table[1] == ["change", "layer 5", "n_heads", "", "16", "32", "", ""]
    metrics = {t[2]: t for t in table[2:]}
    assert len(metrics) == len(r["rows"])
    total = metrics["total parameters"]
    assert int(total[4]) == count_params(a)["total"] and int(total[5]) == count_params(b)["total"]
    assert int(total[6]) == count_params(b)["total"] - count_params(a)["total"]
    assert float(total[7]) == pytest.approx(count_params(b)["total"] / count_params(a)["total"])
    assert metrics["per-GPU memory (2 GPUs)"][3] == "bytes"


def test_671b_compare_is_fast_and_complete():
    v3 = presets.load("deepseek-v3-671b")
    r = compare(v3, v3.replace(n_layers=40), dtype="fp8", n_gpus=8)
    m = rows(r)
    assert m["H200 x8: memory per GPU fits"]["a"] is True
    assert m["H100 SXM x8: memory per GPU fits"]["a"] is False
    assert m["H200 x8: decode"]["b"] > m["H200 x8: decode"]["a"]
    assert [c["text"] for c in r["changes"]] == ["n_layers 61 -> 40", "layers 40-60 only in A"]


def test_a_side_compared_beyond_its_allocation_is_noted():
    """B's batch and length may exceed A's limits (the page checks them against B): A's
    figures there are a what-if, and the comparison says so, by side and limit."""
    a, b = presets.load("tiny"), presets.load("mixed-layers")
    r = compare(a, b, batch=b.max_batch_size, seq_len=b.max_seq_len)
    assert len(r["notes"]) == 1 and r["notes"][0].startswith("A is compared beyond")
    assert f"max_batch_size {a.max_batch_size}" in r["notes"][0]
    assert r["notes"][0] in to_markdown(r)
    assert compare(a, b, batch=1, seq_len=a.max_seq_len)["notes"] == []


def test_a_side_that_does_not_split_over_n_gpus_says_so_and_fits_no_gpu():
    """The Estimate says tiny does not split over 3 GPUs (vocab_size 1024): Compare said
    "per-GPU memory (3 GPUs) 2.06 MiB" and "fits: yes" without a word. Now each side that
    does not split is noted with the build's reason, and fits no GPU."""
    a = presets.load("tiny")
    b = a.replace(vocab_size=1026)  # its 4 heads do not split over 3 either
    r = compare(a, b, seq_len=a.max_seq_len, n_gpus=3)
    assert [n[:2] for n in r["notes"]] == ["A ", "B "]
    assert "vocab_size=1024 does not split over world_size=3" in r["notes"][0]
    assert all(not x["a"] and not x["b"] for m, x in rows(r).items() if m.endswith("fits"))
    # no per-GPU figures for a split it cannot take, as the Estimate: "does not split"
    per_gpu = [x for m, x in rows(r).items() if "per-GPU" in m or "prefill" in m or "decode" in m]
    assert per_gpu and all(x["a"] is None and x["b"] is None for x in per_gpu)
    md = to_markdown(r)
    assert "| per-GPU memory (3 GPUs) | does not split | does not split |  |  |" in md
    assert "does not split" not in to_markdown(compare(a, a, seq_len=a.max_seq_len))
    to_csv(r)  # writes, with empty deltas
    fine = compare(a, a, seq_len=a.max_seq_len, n_gpus=2)
    assert fine["notes"] == [] and all(x["a"] for m, x in rows(fine).items() if m.endswith("fits"))
