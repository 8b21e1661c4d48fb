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

# One colour per part of the model, in every view (parameters, layer map, architecture, expert
# load): attention blue, dense MLP green, shared experts purple, routed experts orange.
COLORS = {
    "embedding": "#9D755D",
    "attention": "#4C78A8",
    "dense_mlp": "#54A24B",
    "shared_experts": "#B279A2",
    "routed_experts": "#F58518",
    "gate": "#72B7B2",
    "norms": "#BAB0AC",
    "head": "#FF9DA6",
    "mtp": "#79706E",
}
DENSE_COLOR = COLORS["dense_mlp"]  # a dense layer
MOE_COLOR = COLORS["routed_experts"]  # an MoE layer
OVERRIDE_FILL = "#FDEBD3"  # rows of layers with per-layer overrides
CHANGED_COLOR = "#C0392B"  # an axis whose size an override changed
DEAD_COLOR = "#000000"  # experts that got no token
BASE_COLOR = "#4C78A8"
YARN_COLOR = "#E45756"
# Parameter groups in a fixed order, per layer and for the whole model.
LAYER_GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "gate", "norms")
MODEL_GROUPS = ("embedding",) + LAYER_GROUPS + ("head", "mtp")
GROUP_COLORS = COLORS
GROUP_NAMES = {
    "embedding": "embedding",
    "attention": "attention (MLA)",
    "dense_mlp": "dense MLP",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "gate": "router (gate)",
    "norms": "norms",
    "head": "output head",
    "mtp": "MTP module",
}
LOAD_SCALE = "RdBu_r"  # relative load: blue under the uniform share, white at it, red over


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
    title = f"Shape trace: {len(trace)} modules" + (f" in {n_layers} layers" if n_layers else "")
    return _layout(fig, title, 420, bargap=0.1)


def _pad(rows: list[list[float]]) -> list[list[float | None]]:
    width = max((len(r) for r in rows), default=0)
    return [list(r) + [None] * (width - len(r)) for r in rows]


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


def _layer_rows(stats: list[dict[str, Any]], n_layers: int | None) -> list[int]:
    """Every layer from 0 to the last (or n_layers - 1): layers without stats are gaps."""
    last = max((s["layer"] for s in stats), default=-1)
    return list(range(max(n_layers or 0, last + 1)))


def _heat_height(n_rows: int) -> int:
    return min(max(300, 130 + 18 * n_rows), 1300)


LOAD_COLORBAR = dict(
    title=dict(text="load / uniform", side="right"),
    tickvals=[0, 0.5, 1, 1.5, 2],
    ticktext=["0 (dead)", "0.5", "1 (uniform)", "1.5", "2 or more"],
)


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
        go.Heatmap(
            z=z,
            x=list(range(width)),
            y=labels,
            zmin=0,
            zmax=2,
            colorscale=LOAD_SCALE,
            colorbar=LOAD_COLORBAR,
            customdata=hover,
            hoverongaps=False,
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
    return go.Heatmap(
        z=z,
        x=list(range(len(z[0]) if z else 0)),
        y=labels,
        zmin=0,
        zmax=2,
        colorscale=LOAD_SCALE,
        colorbar=LOAD_COLORBAR,
        customdata=raw,
        hoverongaps=False,
        texttemplate="%{z:.2f}",
        name="group load",
        hovertemplate="%{y}, group %{x}: %{customdata} tokens, %{z:.2f} x uniform<extra></extra>",
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
    return _layout(fig, "What the router's selection bias changes (gaps: no MoE)", 480)


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
