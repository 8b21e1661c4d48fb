"""ui.plots: pure figures from plain data carry exactly that data, and an explicit height."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3 import ModelArgs, count_params
from dsv3.rotary import rotary_info
from ui import plots

STATS = [
    {
        "layer": 1,
        "n_experts": 4,
        "n_groups": 2,
        "topk": 2,
        "counts": [5, 1, 0, 2],
        "group_counts": [6, 2],
        "n_tokens": 4,
        "max_over_mean": 2.5,
        "cv": 0.9,
        "entropy": 0.9,
        "entropy_norm": 0.65,
    },
    {
        "layer": 3,
        "n_experts": 6,
        "n_groups": 3,
        "topk": 2,
        "counts": [1, 1, 2, 2, 1, 1],
        "group_counts": [2, 4, 2],
        "n_tokens": 4,
        "max_over_mean": 1.5,
        "cv": 0.35,
        "entropy": 1.7,
        "entropy_norm": 0.95,
    },
]


def small_args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=256,
        dim=32,
        inter_dim=64,
        moe_inter_dim=16,
        n_layers=4,
        n_dense_layers=1,
        n_heads=2,
        n_routed_experts=4,
        n_activated_experts=2,
        q_lora_rank=0,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_seq_len=256,
        original_seq_len=64,
        rope_factor=4,
        layer_config={2: {"n_heads": 4, "ffn": "dense"}},
    )
    base.update(kw)
    return ModelArgs(**base)


def test_layer_map_shows_each_layer_kind_and_widths():
    args = small_args()
    layers = [la.to_dict() for la in args.layers()]
    fig = plots.layer_map(layers)
    heads, experts, width = fig.data[:3]
    assert list(heads.y) == [1 * 2, 2, 4, 2]
    assert list(heads.x) == [0, 1, 2, 3]
    # dense layers (0 and the override 2) have no routed experts and their inter_dim as width
    assert list(experts.y) == [0, 4, 0, 4]
    assert list(width.y) == [64, (2 + 2) * 16, 64, (2 + 2) * 16]
    assert heads.marker.color[0] == plots.DENSE_COLOR and heads.marker.color[1] == plots.MOE_COLOR
    assert "layer 2" in heads.hovertext[2] and "n_heads: 4" in heads.hovertext[2]
    assert fig.layout.height


def test_params_by_group_matches_count_params():
    counts = count_params(small_args())
    fig = plots.params_by_group(counts)
    per_layer = [t for t in fig.data if t.orientation != "h"]
    totals = [t for t in fig.data if t.orientation == "h"]  # one bar per group, in the legend
    # The stacked per-layer bars add up to each layer's total.
    sums = np.sum([list(t.y) for t in per_layer], axis=0)
    assert sums.tolist() == [row["total"] for row in counts["layers"]]
    assert {t.legendgroup: t.x[0] for t in totals} == {
        g: n for g, n in counts["groups"].items() if n
    }
    assert sum(t.x[0] for t in totals) == counts["total"]
    # every group is in the legend once: embedding and head through their total bars
    shown = [t.legendgroup for t in fig.data if t.showlegend is not False]
    assert sorted(shown) == sorted(g for g, n in counts["groups"].items() if n)
    assert all(t.marker.color == plots.COLORS[t.legendgroup] for t in fig.data)
    assert fig.layout.height


def test_shape_trace_has_one_bar_per_module_with_shapes():
    trace = [
        {"name": "embed", "type": "Embedding", "layer": None, "shape": [2, 8, 32]},
        {"name": "layers.0.attn", "type": "MLA", "layer": 0, "shape": [2, 8, 32]},
        {"name": "layers.0.ffn", "type": "MLP", "layer": 0, "shape": [2, 8, 32]},
        {"name": "output", "type": "Transformer", "layer": None, "shape": [2, 256]},
    ]
    fig = plots.shape_trace(trace)
    assert sum(len(t.x) for t in fig.data) == len(trace)
    out = next(t for t in fig.data if t.name == "Transformer")
    assert list(out.y) == [512] and out.customdata[0][1] == "[2, 256]"
    assert fig.layout.yaxis.type == "log" and fig.layout.height


def test_expert_heatmap_z_is_the_routing_counts_padded():
    fig = plots.expert_heatmap(STATS)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2, 6)
    assert z[0, :4].tolist() == [5, 1, 0, 2] and np.isnan(z[0, 4:]).all()
    assert z[1].tolist() == [1, 1, 2, 2, 1, 1]
    assert list(fig.data[0].y) == ["layer 1", "layer 3"]
    assert "tokens" in fig.data[0].hovertemplate
    assert fig.layout.height


def test_expert_heatmap_without_stats_says_so():
    fig = plots.expert_heatmap([])
    assert fig.layout.annotations and "No MoE" in fig.layout.annotations[0].text


def test_routing_balance_one_metric_per_axis_with_gaps():
    fig = plots.routing_balance(STATS)
    lines = {t.name: t for t in fig.data if t.type == "scatter"}
    # layers 0..3: 0 and 2 have no MoE and are gaps, not joined
    assert list(lines["max / mean"].y) == [None, 2.5, None, 1.5]
    assert list(lines["CV"].y) == [None, 0.9, None, 0.35]
    assert len({t.yaxis for t in lines.values()}) == 3
    assert all(t.connectgaps is False for t in lines.values())
    # group loads on the right, relative to uniform (tokens x top-k / groups), values printed
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert [r[:2] for r in heat.z[1::2]] == [[6 / 4, 2 / 4], [2 / (8 / 3), 4 / (8 / 3)]]
    assert heat.texttemplate and heat.colorbar.title.text
    assert not any(t.type == "heatmap" for t in plots.routing_balance(STATS, groups=False).data)
    assert fig.layout.height


@pytest.mark.parametrize("max_seq_len", [64, 256])  # YaRN off, on
def test_rotary_freqs_has_both_curves_and_the_correction_range(max_seq_len):
    info = rotary_info(small_args(max_seq_len=max_seq_len), n_positions=16)
    fig = plots.rotary_freqs(info)
    plain = [t for t in fig.data if t.name == "plain rotary"]
    yarn = [t for t in fig.data if t.name and t.name.startswith("YaRN")]
    assert len(plain) == 2 and len(yarn) == 2  # frequency and wavelength rows
    assert list(plain[0].y) == pytest.approx(info["freqs_base"])
    assert list(yarn[0].y) == pytest.approx(info["freqs_yarn"])
    assert list(plain[1].y) == pytest.approx(info["wavelength_base"])
    ramp = next(t for t in fig.data if t.name == "ramp")
    assert list(ramp.y) == pytest.approx(info["ramp"])
    line = next(s for s in fig.layout.shapes if s.type == "line")
    assert line.y0 == line.y1 == info["original_seq_len"]
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert rects and rects[0].x0 == info["low"] and rects[0].x1 == info["high"]
    assert f"{info['softmax_scale']:.5f}" in fig.layout.title.text
    assert ("active" if info["use_yarn"] else "not active") in fig.layout.title.text
    assert fig.layout.height


def test_rotary_tables_cos_sin_side_by_side():
    info = rotary_info(small_args(), n_positions=8)
    fig = plots.rotary_tables(info)
    cos, sin = fig.data
    assert (cos.name, sin.name) == ("cos", "sin")
    assert np.allclose(cos.z, info["cos"]) and np.allclose(sin.z, info["sin"])
    assert cos.xaxis != sin.xaxis and fig.layout.height


def test_human():
    assert plots.human(671_026_419_200) == "671.03B"
    assert plots.human(999) == "999"
    assert plots.human(3 * 2**30, "B") == "3.00 GiB"
