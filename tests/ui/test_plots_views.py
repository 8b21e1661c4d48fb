"""ui.plots views for real-model scale: architecture table, expert load relative to uniform,
per-rank load, group loads, balance with gaps, router scores, bias effect, parameters on a log
scale, shape trace axes. Synthetic data in the shapes dsv3 returns."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3 import count_params, presets
from dsv3.architecture import architecture
from ui import plots


def moe_stats(layer, counts, n_tokens, topk, groups):
    E = len(counts)
    per = E // groups
    return {
        "layer": layer,
        "n_experts": E,
        "n_groups": groups,
        "topk": topk,
        "n_tokens": n_tokens,
        "counts": counts,
        "group_counts": [sum(counts[g * per : (g + 1) * per]) for g in range(groups)],
        "max_over_mean": max(counts) / (n_tokens * topk / E),
        "cv": 0.5,
        "entropy_norm": 0.9,
    }


# layers 0 and 2 dense; layer 1: 8 experts (expert 5 dead), layer 3: 4 experts; 6 tokens
STATS = [
    moe_stats(1, [4, 1, 2, 1, 2, 0, 1, 1], n_tokens=6, topk=2, groups=2),
    moe_stats(3, [3, 3, 3, 3], n_tokens=6, topk=2, groups=1),
]


def heat(fig):
    return next(t for t in fig.data if t.type == "heatmap")


def rows_of(z):
    return [[v for v in row if v is not None] for row in z]


def test_expert_load_is_relative_to_uniform_with_gaps_and_dead_experts():
    fig = plots.expert_load(STATS)
    h = heat(fig)
    assert list(h.y) == ["layer 0 (no MoE)", "layer 1", "layer 2 (no MoE)", "layer 3"]
    z = rows_of(h.z)
    assert z[0] == [] and z[2] == []  # dense layers: empty rows
    assert np.mean(z[1]) == pytest.approx(1.0) and np.mean(z[3]) == pytest.approx(1.0)
    assert z[1][0] == pytest.approx(4 / (6 * 2 / 8)) and z[3] == [1.0] * 4
    assert h.colorbar.title.text == "load / uniform" and h.zmin == 0 and h.zmax == 2
    dead = next(t for t in fig.data if t.type == "scatter")
    assert list(dead.x) == [5] and list(dead.y) == ["layer 1"] and "dead" in dead.name
    assert "uniform" in fig.layout.title.text and fig.layout.height
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_expert_load_with_n_layers_shows_trailing_dense_layers():
    fig = plots.expert_load(STATS, n_layers=6)
    assert len(heat(fig).y) == 6 and heat(fig).y[5] == "layer 5 (no MoE)"


def test_expert_load_per_expert_parallel_rank():
    fig = plots.expert_load(STATS, n_gpus=2)
    h = heat(fig)
    z = rows_of(h.z)
    # layer 1: rank 0 holds experts 0-3 (8 tokens), rank 1 experts 4-7 (4); uniform 12 / 2
    assert z[1] == pytest.approx([8 / 6, 4 / 6]) and z[3] == pytest.approx([1.0, 1.0])
    assert np.mean(z[1]) == pytest.approx(1.0)
    assert "experts 4-7: 4 tokens, 1 dead" in h.customdata[1][1]
    assert h.texttemplate  # values printed
    assert "rank" in fig.layout.xaxis.title.text
    # experts that do not split evenly: the layer is an empty row
    fig3 = plots.expert_load(STATS, n_gpus=3)
    assert rows_of(heat(fig3).z)[1] == [] and "not split" in heat(fig3).y[1]


def test_group_loads_have_a_colour_scale_and_values():
    fig = plots.group_loads(STATS)
    h = heat(fig)
    z = rows_of(h.z)
    assert z[1] == pytest.approx([8 / 6, 4 / 6]) and z[3] == [1.0]
    assert z[0] == [] and z[2] == []
    assert h.colorbar.title.text and h.texttemplate == "%{z:.2f}"
    assert h.customdata[1][:2] == (8, 4) or list(h.customdata[1][:2]) == [8, 4]
    assert fig.layout.height


def test_routing_balance_has_gaps_and_one_metric_per_axis():
    fig = plots.routing_balance(STATS, n_layers=5, groups=False)
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 3 and len({t.yaxis for t in lines}) == 3
    for t in lines:
        assert list(t.x) == [0, 1, 2, 3, 4]
        assert t.y[0] is None and t.y[2] is None and t.y[4] is None and t.connectgaps is False
    assert all(fig.layout["yaxis" + t.yaxis[1:]].title.text for t in lines)
    heat_fig = plots.routing_balance(STATS, n_layers=5)  # group loads beside them by default
    assert any(t.type == "heatmap" for t in heat_fig.data)
    assert fig.layout.height


def router_stats(layer, bias=True, func="sigmoid"):
    edges = list(np.logspace(-4, 0, 5))
    return {
        "layer": layer,
        "n_experts": 8,
        "topk": 2,
        "n_tokens": 10,
        "score_func": func,
        "gate_bias": bias,
        "bin_edges": edges,
        "hist": [10, 20, 30, 20],
        "chosen_hist": [0, 0, 5, 15],
        "bias_changed": 0.25 if bias else 0.0,
        "bias_changed_tokens": 0.5 if bias else 0.0,
    }


def test_router_scores_share_per_bin():
    rs = [router_stats(1), router_stats(3, bias=False, func="softmax")]
    fig = plots.router_scores(rs)
    all_, chosen = [t for t in fig.data if t.type == "heatmap"]
    assert list(all_.y) == [
        "layer 0 (no MoE)",
        "layer 1 (sigmoid, bias)",
        "layer 2 (no MoE)",
        "layer 3 (softmax)",
    ]
    assert list(all_.z[1]) == pytest.approx([12.5, 25, 37.5, 25])
    assert list(chosen.z[1]) == pytest.approx([0, 0, 25, 75])
    assert all(v is None for v in all_.z[0])
    assert len(all_.x) == 5  # bin edges
    assert fig.layout.xaxis.type == "log" and fig.layout.coloraxis.colorbar.title.text
    assert fig.layout.height


def test_bias_effect_bars_with_gaps_and_unbiased_layers_marked():
    rs = [router_stats(1), router_stats(3, bias=False, func="softmax")]
    fig = plots.bias_effect(rs)
    bars = [t for t in fig.data if t.type == "bar"]
    assert list(bars[0].y) == [None, 25.0, None, None]
    assert list(bars[1].y) == [None, 50.0, None, None]
    marked = next(t for t in fig.data if t.type == "scatter")
    assert list(marked.x) == [3]
    assert fig.layout.yaxis.title.text and fig.layout.height
    assert "zero in every layer" not in fig.layout.title.text
    # a random build's bias is all zeros: its 0% bars are no finding, and the title says why
    zero = [{**router_stats(1), "bias_min": 0.0, "bias_max": 0.0, "bias_changed": 0.0}]
    assert "the bias is zero in every layer" in plots.bias_effect(zero).layout.title.text


def test_empty_inputs_say_so():
    for f in (plots.expert_load, plots.group_loads, plots.router_scores, plots.bias_effect):
        fig = f([])
        assert fig.layout.annotations and fig.layout.height


def test_params_log_scale_keeps_small_groups_visible():
    counts = count_params(presets.load("deepseek-v3-671b"))
    fig = plots.params_by_group(counts, log=True)
    lines = {t.legendgroup: t for t in fig.data if t.type == "scatter"}
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis2.type == "log"
    # dense MLP only in layers 0-2, routed experts only from 3: gaps, not zeros
    assert lines["dense_mlp"].y[3] is None and lines["routed_experts"].y[0] is None
    assert lines["attention"].line.color == plots.COLORS["attention"]
    legend = {t.legendgroup for t in fig.data if t.showlegend is not False}
    assert {"embedding", "head", "attention", "routed_experts"} <= legend
    totals = [t for t in fig.data if t.orientation == "h"]
    assert all(t.text[0] for t in totals)  # values on the bars


def test_one_colour_per_model_part_across_views():
    assert plots.DENSE_COLOR == plots.COLORS["dense_mlp"]
    assert plots.MOE_COLOR == plots.COLORS["routed_experts"]
    assert plots.TYPE_COLORS["MLA"] == plots.COLORS["attention"]
    assert len(set(plots.COLORS.values())) == len(plots.COLORS)


def test_shape_trace_log_axis_has_decade_ticks_and_units():
    trace = [
        {"name": "embed", "type": "Embedding", "layer": None, "shape": [5, 2, 1000]},
        {"name": "layers.0.attn", "type": "MLA", "layer": 0, "shape": [5, 2, 1000]},
    ]
    fig = plots.shape_trace(trace)
    y = fig.layout.yaxis
    assert y.type == "log" and y.dtick == 1 and y.tickformat == "~s"
    assert "log" in y.title.text and fig.layout.xaxis.title.text
    assert fig.data[1].marker.color == plots.COLORS["attention"]
    assert plots.shape_trace([]).layout.annotations  # a filter that matched nothing


def test_architecture_table_for_671b_is_short_and_names_axes():
    rows = architecture(presets.load("deepseek-v3-671b"), batch=1, seq=64)
    fig = plots.architecture(rows)
    table = fig.data[0]
    assert table.type == "table"
    labels = list(table.cells.values[0])
    assert len(labels) == 5 and "layers 3-60, x58" in labels[2]
    assert labels[4] == "<b>MTP 61 (not run)</b>"
    attn = table.cells.values[1][2]
    assert "heads 128" in attn and "head_dim 192" in attn and "latent 512" in attn
    assert "experts 256" in table.cells.values[2][2] and "topk 8" in table.cells.values[2][2]
    assert fig.layout.height <= 800  # readable without scrolling far
    assert "61 layers in 2 groups" in fig.layout.title.text


def test_architecture_table_highlights_overrides():
    rows = architecture(presets.load("seed-demo"))
    fig = plots.architecture(rows)
    table = fig.data[0]
    labels = list(table.cells.values[0])
    i = next(k for k, v in enumerate(labels) if "layer 5<" in v)
    assert table.cells.fill.color[0][i] == plots.OVERRIDE_FILL
    assert table.cells.fill.color[0][i - 1] == "white"
    assert (
        "heads 32" in table.cells.values[1][i] and plots.CHANGED_COLOR in table.cells.values[1][i]
    )
    assert "n_heads: 16 -> <b>32</b>" in table.cells.values[3][i]
    assert fig.layout.height
