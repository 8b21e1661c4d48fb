"""Inspect: the architecture of the config (one row per distinct layer shape, named axes), the
figures of the last run (expert load relative to uniform and per expert-parallel rank, group
loads, balance, router scores and the selection bias's effect, DSA's kept keys, every module's
output shape), the rotary tables (with and without YaRN) and the parameters by group."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from dsv3 import ConfigError
from dsv3.architecture import architecture, filter_trace

from .. import lazy, plots
from ..components import Choice, RawSlider, WholeNumber
from ..messages import (
    BEFORE_RUN,
    BUILT_NOT_RUN,
    META_RUN,
    NO_ROUTING,
    args_of,
    choice,
    problem,
    whole,
)
from ..state import Session
from .estimate import stale_note

TABLE_POSITIONS = 32  # rows of the cos/sin tables shown as numbers
ROTARY_DEFAULT = 64
PATHS = ["as configured", "naive", "absorb"]
TRACE_COLUMNS = ["name", "type", "layer", "shape"]


# ---------------------------------------------------------------------- architecture
def architecture_view(
    cfg: Any,
    path: Any = "as configured",
    batch: Any = 1,
    seq: Any = 16,
    form_error: Any = "",
    token_ids: Any = "",
) -> tuple[Any, str]:
    """The config's architecture -> (figure, note). Shapes for the Run inputs: the typed token
    ids' batch x length when there are any (a run takes those), else the batch and length."""
    try:
        args = args_of(cfg)
        path = choice(path, "attention path", PATHS)
        typed = _typed_shape(token_ids, args.vocab_size)
        if typed:
            (batch, seq), source = typed, "the typed token ids"
        else:
            batch, seq = whole(batch, "batch", 1), whole(seq, "seq length", 1)
            source = "the Run tab's batch and length"
    except (ConfigError, ValueError) as e:
        return gr.skip(), problem(e)
    rows = architecture(args, batch, seq, None if path == "as configured" else path)
    groups = sum(r.get("kind") == "layers" for r in rows)
    note = stale_note(form_error) + (
        f"{args.n_layers} layers in {groups} group(s) of identical consecutive layers; shapes "
        f"for batch {batch} x seq {seq} ({source}). Tinted rows override the base config; "
        "red axes are the sizes an override changed."
    )
    return plots.architecture(rows), note


def _typed_shape(text: Any, vocab_size: int) -> tuple[int, int] | None:
    """(rows, ids per row) of typed token ids like '1 2 3; 4 5 6' as a run would read them
    (`runtime.parse_token_ids`), or None when there are none or a run would refuse them (the
    Run button says why)."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        tokens = lazy.runtime.parse_token_ids(text, vocab_size)
    except ValueError:
        return None
    return None if tokens is None else tuple(tokens.shape)


# ---------------------------------------------------------------------- run views
def _last(session: Any) -> dict[str, Any]:
    return session.last_run if isinstance(session, Session) else {}


def expert_views(session: Any, ep_gpus: Any = 1) -> tuple[Any, str]:
    """Expert load relative to uniform, per expert or per expert-parallel rank."""
    last = _last(session)
    if last.get("meta"):
        return plots.empty(META_RUN.format("expert load")), ""
    if not last.get("routing"):
        return plots.empty(_not_run(session).format("expert load per layer")), ""
    try:
        n = whole(ep_gpus, "expert-parallel GPUs", 1, 4096)
        experts = sorted({s.get("n_experts", len(s["counts"])) for s in last["routing"]})
        if all(E % n for E in experts):  # not one layer splits: an empty figure says nothing
            counts = " / ".join(map(str, experts))
            fits = sorted({d for E in experts for d in range(1, E + 1) if E % d == 0})
            raise ConfigError(
                f"expert-parallel GPUs={n} splits no MoE layer's {counts} routed experts "
                f"evenly (dsv3 splits them evenly); allowed: {', '.join(map(str, fits))}",
                field="expert-parallel GPUs",
            )
    except ConfigError as e:
        return gr.skip(), problem(e)
    return plots.expert_load(last["routing"], n_gpus=n, n_layers=last["n_layers"]), ""


def _not_run(session: Any) -> str:
    """The hint of a view that waits for a run's routing: build and run, or, with a model
    built (a ZeroGPU session builds at Run), run; after a run without routing, that the model
    has no MoE layer."""
    if not isinstance(session, Session):
        return BEFORE_RUN
    if session.last_run and not session.last_run.get("meta"):
        return NO_ROUTING
    built = session.model is not None or session.source == "zerogpu"
    return BUILT_NOT_RUN if built else BEFORE_RUN


def run_views(session: Any) -> tuple[Any, Any, Any]:
    """After a run: group loads, the router's score distribution, the bias's effect."""
    last = _last(session)
    if not last.get("routing"):
        hint = plots.empty((META_RUN if last.get("meta") else _not_run(session)).format("routing"))
        return hint, hint, hint
    n = last["n_layers"]
    router = last.get("router") or []
    return (
        plots.group_loads(last["routing"], n_layers=n),
        plots.router_scores(router, n_layers=n),
        plots.bias_effect(router, n_layers=n),
    )


TRACE_READABLE = 200  # shape-trace modules above which the view suggests its filters


def trace_view(session: Any, layer: Any = "", module_type: Any = "") -> tuple[Any, Any, str]:
    """The last run's per-module output shapes, filtered by layer and module type."""
    trace = _last(session).get("trace")
    if not trace:  # the table and plot go too: they showed a model that is gone (Free, Build)
        empty = pd.DataFrame(columns=TRACE_COLUMNS)
        return (
            empty,
            plots.empty(BEFORE_RUN.format("module output shapes")),
            "⚠ nothing traced yet: press Run forward",
        )
    layer = layer.strip() if isinstance(layer, str) else layer
    try:
        if layer not in ("", None, "none"):
            layer = whole(layer, "layer", 0, _last(session)["n_layers"] - 1)
        types = sorted({t["type"] for t in trace})
        typed = module_type.strip() if isinstance(module_type, str) else module_type
        kind = choice(typed or "all", "module type", ["all", *types])  # blank = all
        kind = None if kind == "all" else kind
        rows = filter_trace(trace, layer if layer != "" else None, kind)
    except (ConfigError, ValueError) as e:
        return gr.skip(), gr.skip(), problem(e)
    table = pd.DataFrame([{**t, "shape": str(t["shape"])} for t in rows], columns=TRACE_COLUMNS)
    note = f"{len(rows)} of {len(trace)} modules"
    if len(rows) > TRACE_READABLE:  # a bar per module: hundreds do not read
        note += "; filter by layer or type above to read them"
    return table, plots.shape_trace(rows), note


def dsa_view(session: Any, layer: Any = 0, head: Any = "") -> tuple[Any, str]:
    """Which key positions a DSA layer's indexer kept for each query of the last prefill."""
    if not isinstance(session, Session) or session.model is None:
        return plots.empty(BEFORE_RUN.format("kept keys")), ""
    from dsv3 import stats

    try:
        n_layers = session.model.args.n_layers
        layer = whole(layer, "layer", 0, n_layers - 1)
        la = session.model.args.for_layer(layer)
        head = None if head in ("", None) else whole(head, "index head", 0, la.index_n_heads - 1)
        sel = stats.indexer_selection(session.model, layer, head)
    except (ConfigError, ValueError) as e:
        return gr.skip(), problem(e)
    if sel is None:
        kind = la.attn_kind
        why = "is not a DSA layer" if kind != "dsa" else "recorded nothing yet: press Run"
        if kind == "dsa" and _last(session).get("meta"):
            why = "ran on meta: shapes only, no kept keys (build on cpu or cuda to see them)"
        return plots.empty(f"layer {layer} {why}"), ""
    rows = (_last(session).get("input_shape") or [1])[0]
    return plots.indexer_mask(sel), (
        f"layer {layer}, sequence {sel['batch']} of the batch"
        + (f" (of {rows})" if rows > 1 else "")
        + f": each query attends to at most {sel['topk']} keys"
        + (
            f"; index head {sel['head']} alone agrees on {sel['head_agreement']:.0%} of them"
            if sel.get("head") is not None
            else ""
        )
    )


# ---------------------------------------------------------------------- rotary
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
    if info["use_yarn"]:
        yarn = (
            f"YaRN **on** (max_seq_len {args.max_seq_len}, original_seq_len "
            f"{args.original_seq_len}, factor {args.rope_factor:g}); correction range pairs "
            f"{info['low']}..{info['high']}; **mscale {info['mscale']:.4f}**"
        )
    else:  # its factor and correction range are not used: do not show them as if they were
        why = (
            f"rope_scaling {args.rope_scaling}"
            if args.rope_scaling != "auto"
            else f"max_seq_len {args.max_seq_len} <= original_seq_len {args.original_seq_len}"
        )
        yarn = f"YaRN **off** ({why}): plain RoPE, rope_theta {args.rope_theta:g}"
    md = stale_note(form_error) + (
        f"{yarn}; softmax scale **{info['softmax_scale']:.6f}** (= qk_head_dim^-0.5"
        + (" x mscale^2)" if info["use_yarn"] else ")")
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


def params_view(cfg: Any, log: Any = False) -> Any:
    """Parameters by group, on a log scale when asked (V3's attention is invisible on a linear
    one beside its experts)."""
    from dsv3 import count_params

    try:
        return plots.params_by_group(count_params(args_of(cfg)), log=bool(log))
    except ConfigError:
        return gr.skip()


# ---------------------------------------------------------------------- layout
def _run_plot(label: str, elem_id: str, what: str) -> gr.Plot:
    """A figure of the last run, saying before the first run what it will show."""
    return gr.Plot(plots.empty(BEFORE_RUN.format(what)), label=label, elem_id=elem_id)


def render(page: Any) -> None:
    gr.Markdown("## Inspect")
    with gr.Tabs(elem_id="inspect-tabs"):
        with gr.Tab("Architecture", id="architecture"):
            page.arch_path = Choice(
                PATHS, value=PATHS[0], label="attention path", elem_id="arch-path", scale=0
            )
            page.arch_note = gr.Markdown(elem_id="arch-note")
            page.arch_plot = gr.Plot(label="Architecture", elem_id="architecture")
        with gr.Tab("Expert load", id="experts"):
            page.ep_gpus = WholeNumber(
                1,
                label="expert-parallel GPUs",
                info="1 = per expert; N = load per GPU holding E/N experts",
                elem_id="ep-gpus",
            )
            page.ep_note = gr.Markdown(elem_classes="status", elem_id="ep-note")
            page.heatmap = _run_plot("Expert load", "expert-heatmap", "expert load per layer")
            page.groups_plot = _run_plot("Group loads", "group-loads", "expert group loads")
            page.balance = _run_plot(
                "Routing balance", "routing-balance", "routing balance per layer"
            )
            page.scores_plot = _run_plot(
                "Router scores", "router-scores", "router score distribution"
            )
            page.bias_plot = _run_plot("Selection bias", "bias-effect", "selection bias's effect")
            from .run import BALANCE_COLUMNS

            page.balance_table = gr.Dataframe(
                headers=BALANCE_COLUMNS, label="imbalance per layer", interactive=False
            )
        with gr.Tab("Sparse attention (DSA)", id="dsa"):
            with gr.Row():
                page.dsa_layer = WholeNumber(0, label="layer", elem_id="dsa-layer")
                page.dsa_head = gr.Textbox(
                    "",
                    label="index head (blank: the keys the layer keeps, all heads weighted)",
                    elem_id="dsa-head",
                )
            page.dsa_note = gr.Markdown(elem_id="dsa-note")
            page.dsa_plot = _run_plot("Kept keys", "dsa-plot", "keys each query kept (DSA layers)")
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
            with gr.Row():
                page.trace_layer = gr.Textbox(
                    "", label="layer (blank = all)", elem_id="trace-layer"
                )
                page.trace_type = gr.Textbox(
                    "",
                    label="module type (e.g. MLA, MoE, Linear; blank = all)",
                    elem_id="trace-type",
                )
            page.trace_note = gr.Markdown(elem_id="trace-note")
            page.trace_plot = _run_plot(
                "Shape trace", "shape-trace", "output shape of every module"
            )
            page.trace_table = gr.Dataframe(
                label="module outputs", interactive=False, max_height=400
            )
        with gr.Tab("Parameters", id="params"):
            page.params_log = gr.Checkbox(False, label="log scale", elem_id="params-log")
            page.params_plot = gr.Plot(label="Parameters by group", elem_id="params-plot")


def wire(page: Any) -> None:
    quiet = page.quiet
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
    page.arch_step = (
        architecture_view,
        [page.cfg, page.arch_path, page.batch, page.seq_len, page.form_error, page.token_ids],
        [page.arch_plot, page.arch_note],
    )
    gr.on(
        [
            page.arch_path.change,
            page.batch.change,
            page.seq_len.change,
            page.token_ids.blur,
            page.token_ids.submit,
        ],
        *page.arch_step,
        **quiet(),
    )
    page.params_log.change(params_view, [page.cfg, page.params_log], page.params_plot, **quiet())
    expert_out = [page.heatmap, page.ep_note]
    page.ep_gpus.change(expert_views, [page.session, page.ep_gpus], expert_out, **quiet())
    trace_in = [page.session, page.trace_layer, page.trace_type]
    trace_out = [page.trace_table, page.trace_plot, page.trace_note]
    gr.on(
        [
            page.trace_layer.submit,
            page.trace_type.submit,
            page.trace_layer.blur,
            page.trace_type.blur,
        ],
        trace_view,
        trace_in,
        trace_out,
        **quiet(),
    )
    dsa_in = [page.session, page.dsa_layer, page.dsa_head]
    gr.on(
        [page.dsa_layer.change, page.dsa_head.submit, page.dsa_head.blur],
        dsa_view,
        dsa_in,
        [page.dsa_plot, page.dsa_note],
        **quiet(),
    )
    page.run_views_steps = [
        (expert_views, [page.session, page.ep_gpus], expert_out),
        (run_views, page.session, [page.groups_plot, page.scores_plot, page.bias_plot]),
        (dsa_view, dsa_in, [page.dsa_plot, page.dsa_note]),
        (trace_view, trace_in, trace_out),
    ]
    page.demo.load(*page.rot_step, **quiet())
    page.demo.load(*page.arch_step, **quiet())
