"""Figures of a run's routing: expert and group loads, balance, router scores, the bias, DSA."""

from __future__ import annotations

from typing import Any

import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import (
    COLORS,
    DEAD_COLOR,
    LOAD_COLORBAR,
    LOAD_SCALE,
    MOE_COLOR,
    _heat_height,
    _layer_rows,
    _layout,
    _pad,
    empty,
)


def expert_heatmap(stats: list[dict[str, Any]]) -> go.Figure:
    """Tokens routed to each expert (columns) in each MoE layer (rows), raw counts.

    `stats`: dsv3.stats.routing_stats output. Layers with fewer experts are padded with blanks.
    `expert_load` shows the same counts relative to the uniform share.
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
        labels=dict(x="expert (index)", y="", color="tokens"),
    )
    fig.update_traces(
        customdata=share,
        hovertemplate="%{y}, expert %{x}<br>%{z} tokens (%{customdata:.1%} of picks)<extra></extra>",
    )
    fig.update_layout(coloraxis_colorbar=dict(title=dict(text="tokens routed")))
    n_tok = stats[0].get("n_tokens", 0)
    height = min(max(260, 60 + 22 * len(stats)), 900)
    return _layout(fig, f"Expert load: tokens per expert per layer ({n_tok} tokens)", height)


def expert_load(
    stats: list[dict[str, Any]], n_gpus: int = 1, n_layers: int | None = None
) -> go.Figure:
    """Each expert's load relative to the uniform share (tokens x top-k / experts) per layer;
    dead experts (no token) marked with x; layers without an MoE are empty rows.

    With `n_gpus` > 1, the load of each expert-parallel rank instead: rank r holds experts
    r*E/N .. (r+1)*E/N - 1 (dsv3's expert parallelism), its load relative to tokens x top-k / N,
    values printed; the busiest rank sets the step time. A layer whose experts do not split
    evenly over `n_gpus` is an empty row (dsv3 refuses such a split).

    `stats`: dsv3.stats.routing_stats output; `n_layers`: the model's layer count (else rows
    run to the last MoE layer).
    """
    if not stats:
        return empty("No MoE layer ran: build a model with MoE layers and run a forward.")
    by_layer = {s["layer"]: s for s in stats}
    layers = _layer_rows(stats, n_layers)
    labels, z, hover, dead_x, dead_y = [], [], [], [], []
    n_gpus = max(1, int(n_gpus))
    for i in layers:
        s = by_layer.get(i)
        if s is None:
            labels.append(f"layer {i} (no MoE)")
            z.append([])
            hover.append([])
            continue
        counts, E = list(s["counts"]), s.get("n_experts", len(s["counts"]))
        picks = s["n_tokens"] * s["topk"]
        if n_gpus == 1:
            uniform = picks / E if E else 0
            labels.append(f"layer {i}")
            z.append([c / uniform if uniform else None for c in counts])
            hover.append([f"{c} tokens" for c in counts])
            for e, c in enumerate(counts):
                if c == 0:
                    dead_x.append(e)
                    dead_y.append(labels[-1])
        elif E % n_gpus:
            labels.append(f"layer {i} ({E} experts, not split by {n_gpus})")
            z.append([])
            hover.append([])
        else:
            per = E // n_gpus
            ranks = [sum(counts[r * per : (r + 1) * per]) for r in range(n_gpus)]
            dead = [sum(c == 0 for c in counts[r * per : (r + 1) * per]) for r in range(n_gpus)]
            uniform = picks / n_gpus
            labels.append(f"layer {i}")
            z.append([c / uniform if uniform else None for c in ranks])
            hover.append(
                [
                    f"experts {r * per}-{(r + 1) * per - 1}: {c} tokens, {d} dead"
                    for r, (c, d) in enumerate(zip(ranks, dead))
                ]
            )
    z, hover = _pad(z), _pad(hover)
    width = len(z[0]) if z else 0
    what = "expert" if n_gpus == 1 else "expert-parallel rank"
    fig = go.Figure(
        _load_heat(
            z,
            labels,
            hover,
            name="load",
            hovertemplate="%{y}, " + what + " %{x}<br>%{z:.2f} x uniform, "
            "%{customdata}<extra></extra>",
            texttemplate="%{z:.2f}" if n_gpus > 1 and width <= 32 else None,
        )
    )
    if dead_x:
        fig.add_trace(
            go.Scatter(
                x=dead_x,
                y=dead_y,
                mode="markers",
                marker=dict(symbol="x-thin", size=7, line=dict(width=1.5, color=DEAD_COLOR)),
                name=f"dead expert (0 tokens): {len(dead_x)}",
                hovertemplate="%{y}, expert %{x}: no token<extra></extra>",
            )
        )
    fig.update_xaxes(title_text=f"{what} (index)", dtick=max(1, width // 16))
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    n_tok = stats[0].get("n_tokens", 0)
    if n_gpus == 1:
        title = f"Expert load relative to uniform (tokens x top-k / experts), {n_tok} tokens"
    else:
        title = (
            f"Load per expert-parallel rank over {n_gpus} GPUs, relative to uniform "
            f"(tokens x top-k / GPUs), {n_tok} tokens: the busiest rank sets the step time"
        )
    fig = _layout(fig, title, _heat_height(len(layers)))
    fig.update_layout(margin=dict(l=150))
    return fig


def _group_heat(stats: list[dict[str, Any]], n_layers: int | None) -> go.Heatmap:
    """The heatmap trace of `group_loads` (also the right panel of `routing_balance`)."""
    by_layer = {s["layer"]: s for s in stats}
    labels, z, raw = [], [], []
    for i in _layer_rows(stats, n_layers):
        s = by_layer.get(i)
        if s is None:
            labels.append(f"layer {i} (no MoE)")
            z.append([])
            raw.append([])
            continue
        g = list(s.get("group_counts") or [sum(s["counts"])])
        uniform = s["n_tokens"] * s["topk"] / len(g)
        labels.append(f"layer {i} ({len(g)} groups)")
        z.append([c / uniform if uniform else None for c in g])
        raw.append(g)
    z, raw = _pad(z), _pad(raw)
    return _load_heat(
        z,
        labels,
        raw,
        texttemplate="%{z:.2f}",
        name="group load",
        hovertemplate="%{y}, group %{x}: %{customdata} tokens, %{z:.2f} x uniform<extra></extra>",
    )


def _load_heat(z: list, labels: list[str], customdata: list, **kw: Any) -> go.Heatmap:
    """A heatmap of loads over the uniform share: 0 (dead) .. 1 (uniform) .. 2 or more, one
    colour scale for every load view; empty rows (dense layers) stay gaps."""
    return go.Heatmap(
        z=z,
        x=list(range(len(z[0]) if z else 0)),
        y=labels,
        zmin=0,
        zmax=2,
        colorscale=LOAD_SCALE,
        colorbar=LOAD_COLORBAR,
        customdata=customdata,
        hoverongaps=False,
        **kw,
    )


def group_loads(stats: list[dict[str, Any]], n_layers: int | None = None) -> go.Figure:
    """Tokens per expert group relative to uniform (tokens x top-k / groups), per layer, with
    the values printed; layers without an MoE are empty rows."""
    if not stats:
        return empty("No MoE layer ran: build a model with MoE layers and run a forward.")
    trace = _group_heat(stats, n_layers)
    fig = go.Figure(trace)
    fig.update_xaxes(title_text="expert group (index)", dtick=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    fig = _layout(
        fig,
        "Expert-group load relative to uniform (tokens x top-k / groups)",
        _heat_height(len(trace.y)),
    )
    fig.update_layout(margin=dict(l=150))
    return fig


BALANCE_METRICS = (
    ("max_over_mean", "max / mean", "busiest expert / mean (1 = even)", 1.0),
    ("cv", "CV", "coefficient of variation (0 = even)", 0.0),
    ("entropy_norm", "entropy / ln E", "load entropy / ln E (1 = even)", 1.0),
)


def routing_balance(
    stats: list[dict[str, Any]], n_layers: int | None = None, groups: bool = True
) -> go.Figure:
    """Per-layer routing imbalance, one metric per axis (max/mean, CV, normalised entropy),
    each with its even-load value dotted; layers without an MoE are gaps in the lines. With
    `groups`, the `group_loads` heatmap on the right (leave it out where that figure is shown
    on its own)."""
    if not stats:
        return empty("No routing statistics yet.")
    x = _layer_rows(stats, n_layers)
    titles = [m[2] for m in BALANCE_METRICS]
    if groups:
        fig = make_subplots(
            rows=3,
            cols=2,
            column_widths=[0.55, 0.45],
            horizontal_spacing=0.2,
            vertical_spacing=0.09,
            specs=[[{}, {"rowspan": 3}], [{}, None], [{}, None]],
            subplot_titles=(titles[0], "expert-group load / uniform", titles[1], titles[2]),
        )
    else:
        fig = make_subplots(
            rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.09, subplot_titles=titles
        )
    by_layer = {s["layer"]: s for s in stats}
    for row, (key, name, _, even) in enumerate(BALANCE_METRICS, start=1):
        y = [by_layer[i].get(key) if i in by_layer else None for i in x]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=name,
                connectgaps=False,
                line_color=MOE_COLOR,
                showlegend=False,
                hovertemplate=f"layer %{{x}}<br>{name}: %{{y:.3f}}<extra></extra>",
            ),
            row,
            1,
        )
        fig.add_hline(y=even, line_dash="dot", line_color="#888", row=row, col=1)
        fig.update_yaxes(title_text=name, row=row, col=1)
        fig.update_xaxes(range=[-0.5, len(x) - 0.5], row=row, col=1)
    fig.update_xaxes(title_text="layer", dtick=max(1, len(x) // 16), row=3, col=1)
    if groups:
        heat = _group_heat(stats, n_layers)
        heat.colorbar.update(len=0.9)
        fig.add_trace(heat, 1, 2)
        fig.update_xaxes(title_text="expert group (index)", dtick=1, row=1, col=2)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=2)
    height = max(560, _heat_height(len(x))) if groups else 560
    return _layout(fig, "Routing balance per layer (gaps: layers without an MoE)", height)


def router_scores(rstats: list[dict[str, Any]], n_layers: int | None = None) -> go.Figure:
    """The routers' score distribution per layer: share of all (token, expert) scores in each
    log-spaced score bin (left) and of the chosen top-k ones (right). Layers without an MoE are
    empty rows.

    `rstats`: dsv3.stats.router_stats output (every layer has the same `bin_edges`).
    """
    if not rstats:
        return empty("No router scores: turn them on (record_router_scores) and run a forward.")
    edges = list(rstats[0]["bin_edges"])
    by_layer = {s["layer"]: s for s in rstats}
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.05,
        subplot_titles=("all scores (token x expert)", "chosen scores (top-k)"),
    )
    labels = []
    zs: dict[str, list] = {"hist": [], "chosen_hist": []}
    for i in _layer_rows(rstats, n_layers):
        s = by_layer.get(i)
        if s is None:
            labels.append(f"layer {i} (no MoE)")
        else:
            labels.append(f"layer {i} ({s['score_func']}{', bias' if s['gate_bias'] else ''})")
        for key, z in zs.items():
            h = list(s[key]) if s else []
            n = sum(h)
            z.append([100 * c / n if n else None for c in h] if s else [None] * (len(edges) - 1))
    for col, key in ((1, "hist"), (2, "chosen_hist")):
        fig.add_trace(
            go.Heatmap(
                z=zs[key],
                x=edges,  # bin edges: one brick per bin
                y=labels,
                zmin=0,
                colorscale="Viridis",
                coloraxis="coloraxis",
                hoverongaps=False,
                name=key,
                hovertemplate="%{y}<br>score near %{x:.3g}: %{z:.1f}% of scores<extra></extra>",
            ),
            1,
            col,
        )
        fig.update_xaxes(
            type="log",
            dtick=1,
            title_text="router score (log scale)",
            row=1,
            col=col,
        )
    fig.update_yaxes(autorange="reversed", type="category", title_text="layer", row=1, col=1)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar=dict(title="% of scores")))
    fig = _layout(fig, "Router score distribution per layer", _heat_height(len(labels)))
    fig.update_layout(margin=dict(l=170))
    return fig


def bias_effect(rstats: list[dict[str, Any]], n_layers: int | None = None) -> go.Figure:
    """What the selection bias changes per layer: the share of top-k choices that differ from
    a selection without the bias, and the share of tokens with at least one different expert,
    one per axis. Layers without an MoE are gaps; MoE layers without a bias are marked."""
    if not rstats:
        return empty("No router scores: turn them on (record_router_scores) and run a forward.")
    by_layer = {s["layer"]: s for s in rstats}
    x = _layer_rows(rstats, n_layers)
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.14,
        subplot_titles=(
            "top-k choices changed by the bias (%)",
            "tokens with at least one expert changed by the bias (%)",
        ),
    )
    for row, key in ((1, "bias_changed"), (2, "bias_changed_tokens")):
        y = [
            100 * by_layer[i][key] if i in by_layer and by_layer[i]["gate_bias"] else None
            for i in x
        ]
        fig.add_trace(
            go.Bar(
                x=x,
                y=y,
                marker_color=COLORS["gate"],
                text=[None if v is None else f"{v:.0f}" for v in y],
                textposition="outside" if len(x) <= 32 else "none",
                cliponaxis=False,
                showlegend=False,
                name=key,
                hovertemplate="layer %{x}: %{y:.1f}%<extra></extra>",
            ),
            row,
            1,
        )
        unit = "% of choices" if row == 1 else "% of tokens"
        fig.update_yaxes(title_text=unit, rangemode="tozero", row=row, col=1)
    no_bias = [i for i in x if i in by_layer and not by_layer[i]["gate_bias"]]
    if no_bias:
        fig.add_trace(
            go.Scatter(
                x=no_bias,
                y=[0] * len(no_bias),
                mode="markers",
                marker=dict(symbol="circle-open", size=9, color="#888"),
                name="MoE layer without a bias",
                hovertemplate="layer %{x}: no selection bias<extra></extra>",
            ),
            1,
            1,
        )
    fig.update_xaxes(title_text="layer", dtick=max(1, len(x) // 16), row=2, col=1)
    fig.update_xaxes(range=[-0.5, len(x) - 0.5])
    title = "What the router's selection bias changes (gaps: no MoE)"
    biased = [st for st in rstats if st["gate_bias"]]
    if biased and all(st.get("bias_min") == st.get("bias_max") == 0 for st in biased):
        # 0% everywhere is then no finding: a random build (or a reset bias) holds zeros
        title += (
            "<br>the bias is zero in every layer (as a random build leaves it): it changes nothing"
        )
    return _layout(fig, title, 480)


def indexer_mask(sel: dict[str, Any]) -> go.Figure:
    """DSA: which keys each query attended to (from `dsv3.stats.indexer_selection`): kept,
    dropped by the indexer, or in the future (causal). With an index head chosen, that head's
    own top-k is outlined next to the layer's choice."""
    matrix = sel["matrix"]  # queries x keys: 0 future, 1 dropped, 2 kept
    q0 = sel["query_positions"][0] if sel.get("query_positions") else 0
    scale = [[0, "#FFFFFF"], [0.33, "#FFFFFF"], [0.34, "#D9D9D9"], [0.66, "#D9D9D9"]]
    scale += [[0.67, COLORS["attention"]], [1, COLORS["attention"]]]
    n_q, n_k = len(matrix), len(matrix[0]) if matrix else 0
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=list(range(n_k)),
            y=list(range(q0, q0 + n_q)),
            zmin=0,
            zmax=2,
            colorscale=scale,
            colorbar=dict(
                title="key", tickvals=[0.33, 1, 1.67], ticktext=["future", "dropped", "kept"]
            ),
            hovertemplate="query %{y}, key %{x}: %{z}<extra></extra>",
            name="layer's choice",
        )
    )
    if sel.get("head_kept") is not None:
        xs, ys = [], []
        for i, keys in enumerate(sel["head_kept"]):
            xs += keys
            ys += [q0 + i] * len(keys)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                marker=dict(symbol="square-open", size=7, color=COLORS["routed_experts"]),
                name=f"index head {sel['head']} alone",
            )
        )
    fig.update_xaxes(title_text="key position")
    fig.update_yaxes(title_text="query position", autorange="reversed")
    title = f"DSA layer {sel['layer']}: the {sel['topk']} keys each query keeps"
    return _layout(fig, title, max(320, min(900, 14 * n_q + 160)))
