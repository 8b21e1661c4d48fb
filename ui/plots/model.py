"""Figures of the config: layer map, parameters by group, architecture, shape trace."""

from __future__ import annotations

import math
from typing import Any

import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import (
    CHANGED_COLOR,
    COLORS,
    DENSE_COLOR,
    GROUP_NAMES,
    LAYER_GROUPS,
    MODEL_GROUPS,
    MOE_COLOR,
    OVERRIDE_FILL,
    _layout,
    empty,
    human,
)


# ---------------------------------------------------------------------- configure / estimate
def layer_map(layers: list[dict[str, Any]]) -> go.Figure:
    """Layers along depth, dense/MoE coloured: heads, routed (activated) experts and FFN widths.

    `layers`: one dict per layer with LayerArgs fields (`layer_id`, `ffn`, `n_heads`,
    `n_routed_experts`, `n_activated_experts`, `n_shared_experts`, `inter_dim`, `moe_inter_dim`,
    `q_lora_rank`, `kv_lora_rank`, ...).
    """
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("attention heads", "routed experts (activated)", "FFN width per token"),
    )
    x = [la["layer_id"] for la in layers]
    colors = [MOE_COLOR if la["ffn"] == "moe" else DENSE_COLOR for la in layers]
    hover = [
        "<br>".join(
            [f"<b>layer {la['layer_id']}</b> ({la['ffn']})"]
            + [
                f"{k}: {la[k]}"
                for k in (
                    "n_heads",
                    "q_lora_rank",
                    "kv_lora_rank",
                    "qk_nope_head_dim",
                    "v_head_dim",
                    "inter_dim",
                    "moe_inter_dim",
                    "n_routed_experts",
                    "n_activated_experts",
                    "n_shared_experts",
                    "n_expert_groups",
                    "n_limited_groups",
                    "score_func",
                )
                if k in la
            ]
        )
        for la in layers
    ]
    moe = [la["ffn"] == "moe" for la in layers]
    experts = [la["n_routed_experts"] if m else 0 for la, m in zip(layers, moe)]
    active = [la["n_activated_experts"] if m else 0 for la, m in zip(layers, moe)]
    # Width a token actually passes through: the dense MLP, or activated + shared experts.
    width = [
        (la["n_activated_experts"] + la["n_shared_experts"]) * la["moe_inter_dim"]
        if m
        else la["inter_dim"]
        for la, m in zip(layers, moe)
    ]
    common = dict(x=x, hovertext=hover, hoverinfo="text", marker_color=colors, showlegend=False)
    fig.add_trace(go.Bar(y=[la["n_heads"] for la in layers], name="heads", **common), 1, 1)
    fig.add_trace(go.Bar(y=experts, name="routed experts", text=active, **common), 2, 1)
    fig.add_trace(go.Bar(y=width, name="FFN width", **common), 3, 1)
    # Legend entries for the two colours.
    for name, color in (("dense", DENSE_COLOR), ("MoE", MOE_COLOR)):
        fig.add_trace(go.Bar(x=[None], y=[None], name=name, marker_color=color), 1, 1)
    # Layers as categories: Plotly thins their labels to the plot's width (a fixed step
    # overlapped them at 400 px for 30-61 layers) and never shows a half layer.
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="layer", row=3, col=1)
    for row, unit in ((1, "heads"), (2, "experts"), (3, "width (units)")):
        fig.update_yaxes(title_text=unit, row=row, col=1)
    return _layout(fig, f"Layer map ({len(layers)} layers)", 460, bargap=0.15)


def params_by_group(counts: dict[str, Any], log: bool = False) -> go.Figure:
    """Parameters per layer by group, and the model total by group (embedding and head too).

    `counts`: dsv3.params.count_params output: {"total", "active", "groups": {...},
    "layers": [{layer, attention, routed_experts, ...}]}. Linear scale: per-layer bars stacked.
    `log=True`: one line per group across layers on a log axis (attention and dense parts stay
    visible next to V3's routed experts), a layer without a group is a gap; totals on a log axis.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.64, 0.36],
        horizontal_spacing=0.16,
        subplot_titles=("per layer", "whole model"),
    )
    layers = counts.get("layers", [])
    x = [r["layer"] for r in layers]
    in_layers = set()
    for g in LAYER_GROUPS:
        y = [r.get(g, 0) for r in layers]
        if not any(y):
            continue
        in_layers.add(g)
        common = dict(
            x=x,
            name=GROUP_NAMES[g],
            legendgroup=g,
            marker_color=COLORS[g],
            hovertemplate=f"layer %{{x}}<br>{GROUP_NAMES[g]}: %{{y:,}} parameters<extra></extra>",
        )
        if log:
            fig.add_trace(
                go.Scatter(
                    y=[v or None for v in y],
                    mode="lines+markers",
                    line_color=COLORS[g],
                    connectgaps=False,
                    **common,
                ),
                1,
                1,
            )
        else:
            fig.add_trace(go.Bar(y=y, **common), 1, 1)
    groups = counts.get("groups", {})
    names = [g for g in MODEL_GROUPS if groups.get(g)]
    names += sorted(g for g in set(groups) - set(MODEL_GROUPS) if groups[g])
    total = counts.get("total") or sum(groups.values()) or 1
    for g in names:
        n = groups[g]
        fig.add_trace(
            go.Bar(
                x=[n],
                y=[GROUP_NAMES.get(g, g)],
                orientation="h",
                name=GROUP_NAMES.get(g, g),
                legendgroup=g,
                showlegend=g not in in_layers,  # embedding, head: only here
                marker_color=COLORS.get(g, "#999"),
                text=[f"{human(n)} ({n / total:.1%})"],
                textposition="auto",
                cliponaxis=False,
                hovertemplate=f"{GROUP_NAMES.get(g, g)}: %{{x:,}} parameters<extra></extra>",
            ),
            1,
            2,
        )
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="parameters" + (" (log scale)" if log else ""), row=1, col=2)
    fig.update_yaxes(
        title_text="parameters per layer" + (" (log scale)" if log else ""), row=1, col=1
    )
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    if log:
        fig.update_yaxes(type="log", dtick=1, tickformat="~s", row=1, col=1)
        fig.update_xaxes(type="log", dtick=1, tickformat="~s", row=1, col=2)
    title = (
        f"Parameters by group: total {human(counts.get('total', 0))}, "
        f"active per token {human(counts.get('active', 0))}"
    )
    return _layout(fig, title, 440, barmode="stack")


# ---------------------------------------------------------------------- inspect
# Module types of the shape trace in the model's colours; other types take the palette.
TYPE_COLORS = {
    "Embedding": COLORS["embedding"],
    "ParallelEmbedding": COLORS["embedding"],
    "MLA": COLORS["attention"],
    "MLP": COLORS["dense_mlp"],
    "MoE": COLORS["routed_experts"],
    "GroupedExperts": COLORS["routed_experts"],
    "Gate": COLORS["gate"],
    "RMSNorm": COLORS["norms"],
    "ParallelHead": COLORS["head"],
    "Transformer": COLORS["head"],  # the logits
    "Linear": "#5B6770",  # every projection: neutral, the owning module is in the hover
}


def shape_trace(trace: list[dict[str, Any]]) -> go.Figure:
    """Output elements of each traced module in call order (log scale, one tick per decade),
    hover shows the module and its shape.

    `trace`: dsv3.stats.trace_shapes output, [{"name", "type", "layer", "shape"}] (or a part
    of it: dsv3.architecture.filter_trace).
    """
    if not trace:
        return empty("No modules to show (nothing traced, or the filter matched nothing).")
    fig = go.Figure()
    types = list(dict.fromkeys(str(t.get("type")) for t in trace))
    palette = [c for c in px.colors.qualitative.Plotly if c not in TYPE_COLORS.values()]
    others = iter(palette * (len(types) // len(palette) + 1))
    for typ in types:
        rows = [(i, t) for i, t in enumerate(trace) if str(t.get("type")) == typ]
        fig.add_trace(
            go.Bar(
                x=[i for i, _ in rows],
                y=[max(math.prod(t.get("shape") or [1]), 1) for _, t in rows],
                name=typ,
                marker_color=TYPE_COLORS.get(typ) or next(others),
                customdata=[[t.get("name"), str(list(t.get("shape") or []))] for _, t in rows],
                hovertemplate="%{customdata[0]}<br>shape %{customdata[1]}"
                "<br>%{y:,} elements<extra>" + typ + "</extra>",
            )
        )
    fig.update_yaxes(
        type="log", dtick=1, tickformat="~s", title_text="output elements (count, log scale)"
    )
    fig.update_xaxes(title_text="module, in call order (index)")
    n_layers = len({t.get("layer") for t in trace if t.get("layer") is not None})
    title = f"Shape trace: {len(trace)} module{'s' if len(trace) != 1 else ''}" + (
        f" in {n_layers} layer{'s' if n_layers != 1 else ''}" if n_layers else ""
    )
    return _layout(fig, title, 420, bargap=0.1)


def architecture(rows: list[dict[str, Any]], minor: bool = False) -> go.Figure:
    """The architecture view as a table: one row per group of identical consecutive layers
    (plus embedding and head), each module's output shape with named axes, one step of the
    path per line. Batch and seq lead every shape and are named once in the title. Override
    layers have a tinted row, what differs from the base config, and the axes an override
    changed in red.

    `rows`: dsv3.architecture.architecture output. `minor=True` also lists norms.
    """
    if not rows:
        return empty("No architecture to show.")
    first = rows[0]["modules"][0]["axes"]
    lead = {a: n for a, n in first[:2]}  # batch, seq
    lead["tokens"] = math.prod(lead.values())  # batch x seq, flattened for routing

    def axes_text(m: dict[str, Any]) -> str:
        changed = set(m["changed_axes"])
        parts = []
        for a, n in m["axes"]:
            if a in lead and lead[a] == n:
                continue
            t = f"{a} {n}"
            parts.append(
                f"<span style='color:{CHANGED_COLOR}'><b>{t}</b></span>" if a in changed else t
            )
        return " x ".join(parts)

    def path_text(modules: list[dict[str, Any]]) -> tuple[str, int]:
        lines, steps = [], {}
        for m in modules:
            if m["minor"] and not minor:
                continue
            steps.setdefault(m["step"], []).append(f"{m['name']} <i>{axes_text(m)}</i>")
        lines = [" -> ".join(v) for v in steps.values()]
        return "<br>".join(lines), max(1, len(lines))

    cols: list[list[str]] = [[], [], [], []]
    fills, n_lines = [], []
    for r in rows:
        attn = [m for m in r["modules"] if m["stage"] in ("attention", "embed", "head")]
        ffn = [m for m in r["modules"] if m["stage"] == "ffn"]
        if r["kind"] == "layers":
            color = MOE_COLOR if r["ffn"] == "moe" else DENSE_COLOR
            what = "MoE" if r["ffn"] == "moe" else "dense"
            head = (
                f"<b>{r['label']}</b><br><span style='color:{color}'><b>{what}</b></span>, "
                f"{r['attn_path']}"
            )
        else:
            head = f"<b>{r['label']}</b>"
        a_text, a_n = path_text(attn)
        f_text, f_n = path_text(ffn)
        notes = []
        if r["override"]:
            notes.append("<b>override</b>")
            notes += [f"{k}: {a} -> <b>{b}</b>" for k, (a, b) in r["diff"].items()]
        if r.get("same_as"):
            notes.append(f"same shapes as {r['same_as']}")
        cols[0].append(head)
        cols[1].append(a_text)
        cols[2].append(f_text)
        cols[3].append("<br>".join(notes))
        fills.append(OVERRIDE_FILL if r["override"] else "white")
        n_lines.append(max(a_n, f_n, len(notes), 2))
    line_px = 16
    fig = go.Figure(
        go.Table(
            columnwidth=[1.0, 4.0, 3.8, 1.9],
            header=dict(
                values=[
                    "<b>layers</b>",
                    "<b>attention (MLA) / embedding, head</b>",
                    "<b>feed-forward</b>",
                    "<b>differs from the base config</b>",
                ],
                align="left",
                fill_color="#EEF1F6",
                height=26,
            ),
            cells=dict(
                values=cols,
                align="left",
                fill_color=[fills] * 4,
                font=dict(size=11),
                height=line_px,
            ),
        )
    )
    n_layer_rows = sum(r["kind"] == "layers" for r in rows)
    n_layers = sum(r["count"] for r in rows if r["kind"] == "layers")
    height = 110 + 26 + sum(line_px * n + 8 for n in n_lines)
    title = (
        f"Architecture: {n_layers} layers in {n_layer_rows} groups; output shapes after "
        f"(batch {lead.get('batch', '?')}, seq {lead.get('seq', '?')}), "
        f"routed as tokens = batch x seq = {lead['tokens']}; "
        f"<span style='color:{CHANGED_COLOR}'>red</span>: changed by an override"
    )
    fig = _layout(fig, title, min(height, 2400))
    fig.update_layout(margin=dict(l=10, r=10, t=60, b=10))
    return fig
