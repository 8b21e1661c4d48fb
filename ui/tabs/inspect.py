"""Inspect: the figures of the last run (expert load, routing balance, shape trace), the rotary
tables of the config (with and without YaRN) and the parameters by group."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from dsv3 import ConfigError

from .. import plots
from ..components import RawSlider
from ..messages import args_of, problem, whole
from .estimate import stale_note
from .run import BALANCE_COLUMNS

TABLE_POSITIONS = 32  # rows of the cos/sin tables shown as numbers
ROTARY_DEFAULT = 64
BEFORE_RUN = "Build a model and press Run forward: this shows the run's {}"


def rotary_max(args: Any) -> int:
    """The slider's top: max_seq_len, but able to reach original_seq_len (4096 for V3) without
    drawing all of a 128K context."""
    return max(1, min(args.max_seq_len, max(args.original_seq_len, 4096)))


def rotary(
    cfg: Any, n_positions: Any = ROTARY_DEFAULT, form_error: Any = ""
) -> tuple[Any, Any, Any, Any, str]:
    """Rotary tables for the config -> (frequency figure, cos/sin figure, cos, sin, Markdown)."""
    try:
        args = args_of(cfg)
        top = rotary_max(args)
        n = whole(n_positions, "positions", 1, top)
        from dsv3.rotary import rotary_info  # torch: loaded on first use, not with the page

        info = rotary_info(args, n_positions=n)
    except (ConfigError, ValueError) as e:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), problem(e)
    cols = [f"pair {d}" for d in info["dims"]]
    cos = pd.DataFrame(info["cos"][:TABLE_POSITIONS], columns=cols).round(4)
    sin = pd.DataFrame(info["sin"][:TABLE_POSITIONS], columns=cols).round(4)
    cos.insert(0, "pos", info["positions"][:TABLE_POSITIONS])
    sin.insert(0, "pos", info["positions"][:TABLE_POSITIONS])
    state = "on" if info["use_yarn"] else "off"
    md = stale_note(form_error) + (
        f"YaRN **{state}** (max_seq_len {args.max_seq_len}, original_seq_len "
        f"{args.original_seq_len}, factor {args.rope_factor:g}); correction range pairs "
        f"{info['low']}..{info['high']}; **mscale {info['mscale']:.4f}**; softmax scale "
        f"**{info['softmax_scale']:.6f}** (= qk_head_dim^-0.5 x mscale^2)"
    )
    return plots.rotary_freqs(info), plots.rotary_tables(info), cos, sin, md


def rotary_for_config(cfg: Any, n_positions: Any, form_error: Any = "") -> tuple[Any, ...]:
    """After the config changed: the same, plus the slider bounded by the new config (max_seq_len,
    reaching original_seq_len) with its value kept within them."""
    try:
        top = rotary_max(args_of(cfg))
        n = min(whole(n_positions, "positions", 1, None), top)
    except (ConfigError, ValueError):
        return (*rotary(cfg, ROTARY_DEFAULT, form_error), gr.skip())
    return (*rotary(cfg, n, form_error), gr.update(maximum=top, value=n))


# ---------------------------------------------------------------------- layout
def render(page: Any) -> None:
    gr.Markdown("## Inspect")
    with gr.Tabs(elem_id="inspect-tabs"):
        with gr.Tab("Expert load", id="experts"):
            page.heatmap = gr.Plot(
                plots.empty(BEFORE_RUN.format("expert load per layer")),
                label="Expert load",
                elem_id="expert-heatmap",
            )
            page.balance = gr.Plot(
                plots.empty(BEFORE_RUN.format("routing balance per layer")),
                label="Routing balance",
                elem_id="routing-balance",
            )
            page.balance_table = gr.Dataframe(
                headers=BALANCE_COLUMNS, label="imbalance per layer", interactive=False
            )
        with gr.Tab("Rotary / YaRN", id="rotary"):
            page.rot_positions = RawSlider(
                1,
                1024,
                value=ROTARY_DEFAULT,
                step=1,
                label="positions in the cos/sin tables",
                elem_id="rotary-positions",
            )
            page.rot_md = gr.Markdown(elem_id="rotary-summary")
            page.rot_freqs = gr.Plot(label="Rotary frequencies", elem_id="rotary-plot")
            page.rot_tables = gr.Plot(label="cos / sin", elem_id="rotary-tables")
            with gr.Row():
                page.cos_table = gr.Dataframe(label="cos", interactive=False, max_height=300)
                page.sin_table = gr.Dataframe(label="sin", interactive=False, max_height=300)
        with gr.Tab("Shape trace", id="shapes"):
            page.trace_plot = gr.Plot(
                plots.empty(BEFORE_RUN.format("output shape of every module")),
                label="Shape trace",
                elem_id="shape-trace",
            )
            page.trace_table = gr.Dataframe(
                label="module outputs", interactive=False, max_height=400
            )
        with gr.Tab("Parameters", id="params"):
            page.params_plot = gr.Plot(label="Parameters by group", elem_id="params-plot")


def wire(page: Any) -> None:
    rot_out = [
        page.rot_freqs,
        page.rot_tables,
        page.cos_table,
        page.sin_table,
        page.rot_md,
        page.rot_positions,
    ]
    page.rot_step = (rotary_for_config, [page.cfg, page.rot_positions, page.form_error], rot_out)
    page.rot_positions.release(
        rotary, [page.cfg, page.rot_positions, page.form_error], rot_out[:5], api_name="rotary"
    )
    page.demo.load(*page.rot_step, **page.quiet())
