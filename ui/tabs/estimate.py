"""Estimate: what the config costs before anything is allocated (parameters, weights per dtype,
KV cache, FLOPs, per-GPU memory, whether it fits here) and how fast it could run per GPU type
(the roofline floor). Reads the config hub; an invalid form marks everything here stale."""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr
import pandas as pd

from dsv3 import ConfigError, ModelArgs
from dsv3 import estimate as estimate_model
from dsv3.params import NO_FP8_PATH, human_bytes, run_bytes
from dsv3.roofline import GPUS, speed_table, split_problem

from .. import lazy, plots
from ..components import WholeNumber
from ..messages import args_of, choice, problem, whole

DEVICES = ["auto", "cpu", "cuda", "meta"]
DTYPES = ["fp32", "bf16", "fp8"]
SPEED_GPUS = (1, 8)


def stale_note(form_error: Any) -> str:
    """The marker shown above figures while the form holds an error."""
    if not form_error:
        return ""
    return "⚠ **stale**: the form has an error (see Configure); showing the last valid config.\n\n"


def _fits_line(nbytes: float, device: str, what: str, dtype: str | None = None) -> str:
    dev = lazy.runtime.resolve_device(device)
    if dev == "meta":
        return f"✔ {what} on **meta**: shapes only, nothing is allocated"
    try:
        from dsv3 import memory

        fits, reason = memory.check_fits(nbytes, dev, dtype=dtype)
    except (RuntimeError, AssertionError) as e:  # e.g. cuda asked on a machine without one
        return f"✘ {what} on **{dev}**: device not usable here ({e})"
    return f"{'✔ fits' if fits else '✘ does not fit'} {what} on **{dev}**: {reason}"


def dense_copies_here(dev: str) -> bool:
    """Does an fp8 model on this server's `dev` keep bf16 copies of its weights (a GPU without
    an fp8 path), so that fp8 needs more memory than bf16 there?"""
    return dev == "cuda" and not lazy.runtime.fp8_path()


def weights_held(e: dict, dev: str) -> int:
    """What a build or import of estimate `e` holds on `dev`: its weights, and on a GPU without
    an fp8 path an fp8 model's bf16 copies with the working memory of making them."""
    if e["dtype"] == "fp8" and dense_copies_here(dev):
        return e["weight_bytes"] + e["dense_copy_bytes"] + e["dense_work_bytes"]
    return e["weight_bytes"]


def request(cfg: Any, device: Any, dtype: Any, batch: Any, length: Any, n_gpus: Any):
    """The estimate's inputs, checked: (args, device, dtype, batch, length, GPUs); length 0 =
    max_seq_len."""
    args = args_of(cfg)
    device = choice(device, "device", DEVICES)
    dtype = choice(dtype, "dtype", DTYPES)
    batch, length = sizes(args, batch, length)
    n_gpus = whole(n_gpus, "n GPUs", 1, 4096)
    return args, device, dtype, batch, length, n_gpus


def check_batch(args: ModelArgs, batch: Any) -> int:
    """A batch in 1..max_batch_size, else a ConfigError with the whole range."""
    return whole(batch, "batch", 1, args.max_batch_size, f"max_batch_size={args.max_batch_size}")


def sizes(args: ModelArgs, batch: Any, length: Any) -> tuple[int, int]:
    """Batch and length (0 = max_seq_len) within the config's max_batch_size / max_seq_len."""
    batch = check_batch(args, batch)
    length = whole(
        length, "length", 0, args.max_seq_len, f"max_seq_len={args.max_seq_len}; 0 = max_seq_len"
    )
    return batch, length or args.max_seq_len


def split_note(args: ModelArgs, n_gpus: int, dtype: str) -> str:
    """Why the model does not split over n_gpus (tensor/expert parallel), or ""."""
    why = split_problem(args, n_gpus, dtype)
    return f"✘ does not split over {n_gpus} GPUs: {why}" if why else ""


def estimate(
    cfg: Any,
    device: Any = "auto",
    dtype: Any = "bf16",
    batch: Any = 1,
    length: Any = 0,
    n_gpus: Any = 1,
    form_error: Any = "",
) -> tuple[str, Any, Any, Any]:
    """Analytic estimate, no build: -> (summary Markdown, per-layer table, layer map, params)."""
    try:
        args, device, dtype, batch, length, n_gpus = request(
            cfg, device, dtype, batch, length, n_gpus
        )
        e = estimate_model(args, dtype=dtype, batch=batch, seq_len=length, n_gpus=n_gpus)
        note = split_note(args, n_gpus, dtype)
    except (ConfigError, ValueError) as err:
        return problem(err), *config_views(cfg, dtype)
    md = stale_note(form_error) + summary(e, args, device, dtype, batch, length, note)
    return md, *_views(args, e)


def _views(args: ModelArgs, e: dict) -> tuple[Any, Any, Any]:
    layers = [la.to_dict() for la in args.layers()]
    table = pd.DataFrame(e["layers"])
    if e["params"]["mtp"]:  # the MTP module's parameters have a row too (a plain forward
        n = args.n_mtp_layers  # does not run it: no active parameters, no KV per token)
        mtp = dict.fromkeys(table.columns, "") | {
            "layer": f"MTP ({n} layer{'s' if n > 1 else ''}, not run)",
            "params": e["params"]["mtp"],
        }
        table = pd.concat([table.astype(object), pd.DataFrame([mtp])], ignore_index=True)
    return (
        table,
        plots.layer_map(layers),
        plots.params_by_group(e["params"]),
    )


def config_views(cfg: Any, dtype: Any) -> tuple[Any, ...]:
    """The per-layer table, layer map and parameter chart: they depend on the config (and
    dtype) alone, so a batch or length the config refuses leaves them following the config
    rather than showing the last one's. Config or dtype invalid: all three kept."""
    try:
        args = args_of(cfg)
        e = estimate_model(args, dtype=choice(dtype, "dtype", DTYPES), batch=1, seq_len=1)
    except (ConfigError, ValueError):
        return gr.skip(), gr.skip(), gr.skip()
    return _views(args, e)


def summary(
    e: dict, args: ModelArgs, device: str, dtype: str, batch: int, length: int, note: str
) -> str:
    p = e["params"]
    wb, kvt, kvc = e["weight_bytes_by_dtype"], e["kv_bytes_per_token"], e["kv_cache_bytes"]
    mark = {k: " (configured)" if k == e["kv_impl"] else "" for k in ("naive", "absorb")}
    kv_dtype = e.get("kv_dtype", dtype)
    kv_why = " (fp8 models keep their cache in bf16)" if dtype == "fp8" else ""
    n = e["n_gpus"]
    # fp8 on CPU dequantises its weights for each call, on a GPU without an fp8 path once, at
    # build, into bf16 copies it keeps: memory a GPU with one does not need
    dev = lazy.runtime.resolve_device(device)
    path = not (dtype == "fp8" and dense_copies_here(dev))
    deq = run_bytes(e, dev, fp8_path=path) - e["total_bytes"]
    deq_term = ""
    if deq:
        if dev == "cpu":
            deq_term = f" + fp8 weights dequantised per call on CPU {human_bytes(deq)}"
        else:
            deq_term = (
                f" + fp8 weights dequantised to bf16 copies, kept ({NO_FP8_PATH}), "
                f"{human_bytes(e['dense_copy_bytes'])} + one matrix's float32 working copy "
                f"while they are made {human_bytes(e['dense_work_bytes'])}"
            )
    per_gpu_bytes = run_bytes(e, dev, per_gpu=True, fp8_path=path)
    dense_note = ""
    if dtype == "fp8" and path:  # a plan for GPUs this server cannot ask
        dense_note = (
            "  \nOn a GPU without an fp8 path (compute capability below 8.9, e.g. an A100, or "
            "no Triton) an fp8 build also keeps bf16 copies of these weights: + "
            f"{human_bytes(e['dense_copy_bytes'])}"
            + (
                f", {human_bytes(e['per_gpu_dense_copy_bytes'])} per GPU"
                if n > 1 and not note
                else ""
            )
            + "."
        )
    per_gpu = (  # a split the model cannot take has no per-GPU figure (`note` says why)
        f"per GPU with {n} GPU{'s' if n > 1 else ''}: **{human_bytes(per_gpu_bytes)}**."
        if not note
        else f"per GPU with {n} GPUs: none, the model does not split that way (below)."
    )
    mtp = ""
    if p.get("mtp"):
        stored = e.get("checkpoint_params")
        mtp = f"  \n= main model **{p['main']:,}** + MTP module **{p['mtp']:,}**" + (
            f"; a checkpoint stores {stored:,} ({plots.human(stored)}: the MTP layer "
            "repeats the embedding and head)"
            if stored
            else ""
        )
    return "\n".join(
        [
            f"**{p['total']:,} parameters** ({plots.human(p['total'])}), "
            f"**{p['active']:,} active** per token ({plots.human(p['active'])}: the main "
            f"forward's, embedding lookup{' and MTP module' if p.get('mtp') else ''} not "
            f"counted){mtp}",
            "",
            "| | fp32 | bf16 | fp8 |",
            "|---|---|---|---|",
            "| weights | " + " | ".join(human_bytes(wb[d]) for d in DTYPES) + " |",
            "",
            f"| KV cache, {kv_dtype} bytes{kv_why} | naive{mark['naive']} | "
            f"absorb{mark['absorb']} |",
            "|---|---|---|",
            f"| per token | {human_bytes(kvt['naive'])} | {human_bytes(kvt['absorb'])} |",
            f"| batch {batch} x {length} | {human_bytes(kvc['naive'])} | "
            f"{human_bytes(kvc['absorb'])} |",
            "",
            f"Forward FLOPs: **{plots.human(e['flops_per_token'])}** per token, "
            f"{plots.human(e['flops_forward'])} for batch {batch} x {length}.",
            f"Memory ({dtype} weights, {kv_dtype} activations and cache): weights "
            f"{human_bytes(e['weight_bytes'])} + activations "
            f"{human_bytes(e['activation_bytes'])} + KV {human_bytes(e['kv_model_bytes'])} "
            f"({e['kv_impl']}){deq_term} = **{human_bytes(e['total_bytes'] + deq)}**; "
            + per_gpu
            + dense_note,
            "",
            f"{_fits_line(weights_held(e, dev), device, f'a {dtype} build', dtype)}  ",
            note
            or _fits_line(
                per_gpu_bytes,
                device,
                "weights + KV + activations" + (" + dequantised fp8" if deq else "") + " per GPU",
                dtype,
            ),
        ]
    )


@functools.cache
def this_gpu() -> Any:
    """This server's GPU as a roofline entry, from a short measured probe (once per process);
    None without CUDA."""
    if not lazy.runtime.cuda_ok():
        return None
    from dsv3.roofline import measure_gpu

    return measure_gpu()


SPEED_COLUMNS = [
    "GPU",
    "GPUs",
    "fits",
    "memory per GPU",
    "prefill (ms)",
    "prefill bound",
    "decode (tokens/s)",
    "decode bound",
]


def _sig(x: float, digits: int = 3) -> float:
    """x to `digits` significant digits: a tiny model's 0.00032 ms prefill is not shown as 0."""
    return float(f"{x:.{digits}g}")


def speed(
    cfg: Any, dtype: Any = "bf16", batch: Any = 1, length: Any = 0, form_error: Any = ""
) -> tuple[str, Any]:
    """Predicted floors per GPU type (roofline): -> (Markdown, table). Prefill of batch x
    length tokens (the Estimate's), then one decode step; memory per GPU as the Estimate
    counts it."""
    try:
        args = args_of(cfg)
        dtype = choice(dtype, "dtype", DTYPES)
        batch, length = sizes(args, batch, length)
    except (ConfigError, ValueError) as err:
        return problem(err), gr.skip()
    gpus = list(GPUS.values()) + ([this_gpu()] if this_gpu() is not None else [])
    rows = speed_table(
        args, dtype=dtype, batch=batch, prompt_len=length, gpus=tuple(gpus), n_gpus=SPEED_GPUS
    )
    table = pd.DataFrame(
        [
            [
                r["gpu"],
                r["n_gpus"],
                "yes" if r["fits"] else "no: does not split" if r["split"] else "no",
                human_bytes(r["bytes_per_gpu"]),
                _sig(r["prefill_seconds"] * 1e3),
                r["prefill_bound"],
                round(r["decode_tokens_per_s"], 1),
                r["decode_bound"],
            ]
            for r in rows
        ],
        columns=SPEED_COLUMNS,
    )
    notes = sorted({r["note"] for r in rows if r.get("note")})
    notes += sorted(  # once per N, not per GPU kind
        {
            f"✘ {r['n_gpus']} GPUs: {r['split']}; its rows are a what-if, every share rounded down"
            for r in rows
            if r["split"]
        }
    )
    md = stale_note(form_error) + (
        f"Floors from spec sheets (dsv3.roofline): prefill of **{batch} x {length}** tokens, "
        f"then one decode step at batch {batch}, in {dtype}; memory per GPU: weights + KV cache "
        "+ activations, as the Estimate counts them (for fp8 on a GPU without fp8, also the bf16 "
        "copies dsv3 keeps there). A floor is the larger of compute time and "
        "memory time (plus communication for several GPUs); it leaves out kernel launches and "
        "the host, so real runs are slower, most of all for small models."
        + "".join(f"  \n{n}" for n in notes)
    )
    return md, table


# ---------------------------------------------------------------------- layout
def render(page: Any) -> None:
    gr.Markdown("## Estimate")
    with gr.Row():
        page.est_batch = WholeNumber(1, label="batch", min_width=80, elem_id="est-batch")
        page.est_len = WholeNumber(
            0, label="length", info="0 = max_seq_len", min_width=80, elem_id="est-length"
        )
        page.n_gpus = WholeNumber(1, label="n GPUs", min_width=80, elem_id="est-gpus")
    page.est_md = gr.Markdown(elem_id="estimate-summary")


def render_wide(page: Any) -> None:
    """The full-width parts under Configure / Estimate."""
    page.layer_map = gr.Plot(label="Layer map", elem_id="layer-map")
    with gr.Accordion("Per-layer estimate", open=False):
        page.layers_table = gr.Dataframe(label="per layer", interactive=False, max_height=320)
    with gr.Accordion("Predicted speed per GPU (roofline floor)", open=False):
        page.speed_md = gr.Markdown(elem_id="speed-summary")
        page.speed_table = gr.Dataframe(
            headers=SPEED_COLUMNS, interactive=False, max_height=420, elem_id="speed-table"
        )


def wire(page: Any) -> None:
    page.est_in = [
        page.cfg,
        page.device,
        page.dtype,
        page.est_batch,
        page.est_len,
        page.n_gpus,
        page.form_error,
    ]
    page.est_out = [page.est_md, page.layers_table, page.layer_map, page.params_plot]
    page.speed_in = [page.cfg, page.dtype, page.est_batch, page.est_len, page.form_error]
    page.speed_out = [page.speed_md, page.speed_table]
    ev = gr.on(
        [
            page.device.change,
            page.dtype.change,
            page.est_batch.change,
            page.est_len.change,
            page.n_gpus.change,
        ],
        estimate,
        page.est_in,
        page.est_out,
        trigger_mode="always_last",
        show_progress="hidden",
        api_name="estimate",
    )
    ev.then(speed, page.speed_in, page.speed_out, api_name="speed", show_progress="hidden")
    page.demo.load(estimate, page.est_in, page.est_out, **page.quiet())
    page.demo.load(speed, page.speed_in, page.speed_out, **page.quiet())
