"""Figures of the rotary tables, with and without YaRN."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import BASE_COLOR, YARN_COLOR, _layout


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
