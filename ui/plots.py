"""Pure plot functions: plain data (lists, dicts, floats) in, a plotly figure out.

Nothing here imports torch, gradio or dsv3, so every figure can be tested with synthetic data in
the shapes of docs/API_CONTRACT.md. Every figure sets an explicit height: a gr.Plot without one
collapses or jumps while the page lays out.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DENSE_COLOR = "#4C78A8"
MOE_COLOR = "#F58518"
BASE_COLOR = "#4C78A8"
YARN_COLOR = "#E45756"
# Parameter groups in a fixed order and colour, per layer and for the whole model.
LAYER_GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "gate", "norms")
MODEL_GROUPS = ("embedding",) + LAYER_GROUPS + ("head",)
GROUP_COLORS = dict(zip(MODEL_GROUPS, px.colors.qualitative.Safe))


def _layout(fig: go.Figure, title: str, height: int, **kw: Any) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=14)),
        height=height,
        margin=dict(l=60, r=20, t=90, b=40),
        # above the subplot titles, right-aligned (the figure title is left-aligned)
        legend=dict(orientation="h", yanchor="bottom", y=1.07, x=1, xanchor="right"),
        template="plotly_white",
        **kw,
    )
    return fig


def empty(message: str, height: int = 300) -> go.Figure:
    """A blank figure carrying a message, for 'nothing to show yet'."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes with unit='B' use binary prefixes (GiB)."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if abs(n) < 1024 or u == "PiB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ("", "K", "M", "B", "T", "P"):
        if abs(n) < 1000 or u == "P":
            return f"{n:.0f}{u}" if u == "" else f"{n:.2f}{u}{unit}"
        n /= 1000
    return str(n)


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
    fig.update_xaxes(dtick=max(1, len(layers) // 16))
    fig.update_xaxes(title_text="layer", row=3, col=1)
    return _layout(fig, f"Layer map ({len(layers)} layers)", 460, bargap=0.15)


def params_by_group(counts: dict[str, Any]) -> go.Figure:
    """Parameters per layer stacked by group, and the model total by group.

    `counts`: dsv3.params.count_params output: {"total", "active", "groups": {...},
    "layers": [{layer, attention, routed_experts, ...}]}.
    """
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.68, 0.32],
        horizontal_spacing=0.12,
        subplot_titles=("per layer", "whole model"),
    )
    layers = counts.get("layers", [])
    x = [r["layer"] for r in layers]
    for g in LAYER_GROUPS:
        y = [r.get(g, 0) for r in layers]
        if any(y):
            fig.add_trace(
                go.Bar(
                    x=x,
                    y=y,
                    name=g,
                    marker_color=GROUP_COLORS[g],
                    legendgroup=g,
                    hovertemplate=f"layer %{{x}}<br>{g}: %{{y:,}}<extra></extra>",
                ),
                1,
                1,
            )
    groups = counts.get("groups", {})
    names = [g for g in MODEL_GROUPS if groups.get(g)] + sorted(set(groups) - set(MODEL_GROUPS))
    fig.add_trace(
        go.Bar(
            x=[groups[g] for g in names],
            y=names,
            orientation="h",
            marker_color=[GROUP_COLORS.get(g, "#999") for g in names],
            text=[human(groups[g]) for g in names],
            textposition="auto",
            showlegend=False,
            hovertemplate="%{y}: %{x:,}<extra></extra>",
        ),
        1,
        2,
    )
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="parameters", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    title = (
        f"Parameters by group: total {human(counts.get('total', 0))}, "
        f"active per token {human(counts.get('active', 0))}"
    )
    return _layout(fig, title, 420, barmode="stack")


# ---------------------------------------------------------------------- inspect
def shape_trace(trace: list[dict[str, Any]]) -> go.Figure:
    """Output elements of each traced module in call order (log scale), hover shows the shape.

    `trace`: dsv3.stats.trace_shapes output, [{"name", "type", "layer", "shape"}].
    """
    fig = go.Figure()
    types = list(dict.fromkeys(str(t.get("type")) for t in trace))
    palette = px.colors.qualitative.Plotly
    for k, typ in enumerate(types):
        rows = [(i, t) for i, t in enumerate(trace) if str(t.get("type")) == typ]
        fig.add_trace(
            go.Bar(
                x=[i for i, _ in rows],
                y=[max(math.prod(t.get("shape") or [1]), 1) for _, t in rows],
                name=typ,
                marker_color=palette[k % len(palette)],
                customdata=[[t.get("name"), str(list(t.get("shape") or []))] for _, t in rows],
                hovertemplate="%{customdata[0]}<br>shape %{customdata[1]}"
                "<br>%{y:,} elements<extra>" + typ + "</extra>",
            )
        )
    fig.update_yaxes(type="log", title_text="elements in output")
    fig.update_xaxes(title_text="call order")
    return _layout(fig, f"Shape trace ({len(trace)} modules)", 380, bargap=0.1)


def _pad(rows: list[list[float]]) -> list[list[float | None]]:
    width = max((len(r) for r in rows), default=0)
    return [list(r) + [None] * (width - len(r)) for r in rows]


def expert_heatmap(stats: list[dict[str, Any]]) -> go.Figure:
    """Tokens routed to each expert (columns) in each MoE layer (rows).

    `stats`: dsv3.stats.routing_stats output. Layers with fewer experts are padded with blanks.
    """
    if not stats:
        return empty("No MoE layer ran: build a model with MoE layers and run a forward.")
    z = _pad([list(s["counts"]) for s in stats])
    share = [
        [None if c is None else c / max(s["n_tokens"] * s["topk"], 1) for c in row]
        for row, s in zip(z, stats)
    ]
    fig = px.imshow(
        z,
        x=list(range(len(z[0]))),
        y=[f"layer {s['layer']}" for s in stats],
        color_continuous_scale="Viridis",
        aspect="auto",
        labels=dict(x="expert", y="", color="tokens"),
    )
    fig.update_traces(
        customdata=share,
        hovertemplate="%{y}, expert %{x}<br>%{z} tokens (%{customdata:.1%} of picks)<extra></extra>",
    )
    n_tok = stats[0].get("n_tokens", 0)
    height = min(max(260, 60 + 22 * len(stats)), 900)
    return _layout(fig, f"Expert load: tokens per expert per layer ({n_tok} tokens)", height)


def routing_balance(stats: list[dict[str, Any]]) -> go.Figure:
    """Per-layer imbalance (max/mean, CV, normalised entropy) and tokens per expert group."""
    if not stats:
        return empty("No routing statistics yet.")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.12,
        subplot_titles=("imbalance per layer", "tokens per expert group"),
    )
    x = [s["layer"] for s in stats]
    for key, name in (
        ("max_over_mean", "max/mean"),
        ("cv", "CV"),
        ("entropy_norm", "entropy / log E"),
    ):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[s.get(key) for s in stats],
                mode="lines+markers",
                name=name,
                hovertemplate=f"layer %{{x}}<br>{name}: %{{y:.3f}}<extra></extra>",
            ),
            1,
            1,
        )
    groups = _pad([list(s.get("group_counts") or []) for s in stats])
    fig.add_trace(
        go.Heatmap(
            z=groups,
            x=list(range(len(groups[0]) if groups else 0)),
            y=[f"layer {s['layer']}" for s in stats],
            colorscale="Blues",
            showscale=False,
            name="group load",
            hovertemplate="%{y}, group %{x}: %{z} tokens<extra></extra>",
        ),
        1,
        2,
    )
    fig.update_xaxes(title_text="layer", dtick=max(1, len(stats) // 16), row=1, col=1)
    fig.update_xaxes(title_text="group", dtick=1, row=1, col=2)
    height = min(max(320, 80 + 18 * len(stats)), 700)
    fig = _layout(fig, "Routing balance", height)
    fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0, xanchor="left", yanchor="top"))
    fig.update_layout(margin=dict(b=90))
    return fig


def rotary_freqs(info: dict[str, Any]) -> go.Figure:
    """Frequency and wavelength per rotary pair, plain and YaRN on one figure, the correction
    range [low, high] shaded and the YaRN ramp drawn; the original context as a line.

    `info`: dsv3.rotary.rotary_info output.
    """
    fb, fy = info["freqs_base"], info["freqs_yarn"]
    pairs = list(range(len(fb)))
    wb = info.get("wavelength_base") or [2 * math.pi / f for f in fb]
    wy = info.get("wavelength_yarn") or [2 * math.pi / f for f in fy]
    active = "active" if info.get("use_yarn") else "not active: max_seq_len <= original_seq_len"
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.07,
        row_heights=[0.4, 0.4, 0.2],
        subplot_titles=(
            "frequency (radians per position)",
            "wavelength (positions per turn)",
            "YaRN ramp (0 = keep, 1 = divide by factor)",
        ),
    )
    for row, (base, yarn) in ((1, (fb, fy)), (2, (wb, wy))):
        fig.add_trace(
            go.Scatter(
                x=pairs,
                y=base,
                name="plain rotary",
                mode="lines+markers",
                line_color=BASE_COLOR,
                legendgroup="base",
                showlegend=row == 1,
                hovertemplate="pair %{x}: %{y:.4g}<extra>plain</extra>",
            ),
            row,
            1,
        )
        fig.add_trace(
            go.Scatter(
                x=pairs,
                y=yarn,
                name=f"YaRN (factor {info.get('rope_factor', '?'):g})",
                mode="lines+markers",
                line=dict(color=YARN_COLOR, dash="dash"),
                legendgroup="yarn",
                showlegend=row == 1,
                hovertemplate="pair %{x}: %{y:.4g}<extra>YaRN</extra>",
            ),
            row,
            1,
        )
        fig.update_yaxes(type="log", row=row, col=1)
    fig.add_trace(
        go.Scatter(
            x=pairs,
            y=info.get("ramp", []),
            name="ramp",
            mode="lines",
            line_color="#54A24B",
            showlegend=False,
            hovertemplate="pair %{x}: ramp %{y:.2f}<extra></extra>",
        ),
        3,
        1,
    )
    low, high = info.get("low"), info.get("high")
    if low is not None and high is not None:
        for row in (1, 2, 3):
            fig.add_vrect(
                x0=low,
                x1=high,
                fillcolor="#B279A2",
                opacity=0.15,
                line_width=0,
                row=row,
                col=1,
            )
        fig.add_annotation(
            text=f"correction range {low}..{high}",
            x=(low + high) / 2,
            y=1.0,
            xref="x3",
            yref="y3",
            showarrow=False,
            yanchor="bottom",
        )
    if info.get("original_seq_len"):
        # On a log axis plotly places shapes by value but annotations by log10(value).
        orig = info["original_seq_len"]
        fig.add_hline(y=orig, line_dash="dot", line_color="#888", row=2, col=1)
        fig.add_annotation(
            text=f"original_seq_len {orig}",
            x=0,
            xref="x2 domain",
            y=math.log10(orig),
            yref="y2",
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            font=dict(size=11, color="#666"),
        )
    fig.update_xaxes(dtick=max(1, len(pairs) // 16))
    fig.update_xaxes(title_text="rotary pair index", row=3, col=1)
    title = (
        f"Rotary frequencies, YaRN {active}; mscale {info.get('mscale', 1):.4f}, "
        f"softmax scale {info.get('softmax_scale', 0):.5f}"
    )
    return _layout(fig, title, 620)


def rotary_tables(info: dict[str, Any]) -> go.Figure:
    """cos and sin of the rotary angles (positions x pairs) side by side, as the model uses them."""
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.08, subplot_titles=("cos", "sin"), shared_yaxes=True
    )
    x = list(info.get("dims") or range(len(info["cos"][0]) if info["cos"] else 0))
    y = list(info.get("positions") or range(len(info["cos"])))
    for col, key in ((1, "cos"), (2, "sin")):
        fig.add_trace(
            go.Heatmap(
                z=info[key],
                x=x,
                y=y,
                zmin=-1,
                zmax=1,
                colorscale="RdBu",
                showscale=col == 2,
                name=key,
                hovertemplate=f"position %{{y}}, pair %{{x}}<br>{key} %{{z:.4f}}<extra></extra>",
            ),
            1,
            col,
        )
        fig.update_xaxes(title_text="pair", row=1, col=col)
    fig.update_yaxes(title_text="position", autorange="reversed", row=1, col=1)
    kind = "YaRN" if info.get("use_yarn") else "plain"
    return _layout(fig, f"cos / sin tables ({kind}, {len(y)} positions)", 420)
