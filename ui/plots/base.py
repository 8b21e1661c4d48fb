"""What every figure shares: one colour table, the layout, empty figures, number formats."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

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


def _pad(rows: list[list[float]]) -> list[list[float | None]]:
    width = max((len(r) for r in rows), default=0)
    return [list(r) + [None] * (width - len(r)) for r in rows]


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
