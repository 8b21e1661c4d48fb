"""Compare: pin the current config as A, edit the form into B, and see both side by side:
changed fields (per layer), parameters, weights per dtype, KV per token, FLOPs, per-GPU memory,
predicted speed per GPU (dsv3.compare), their layer maps; download it as Markdown or CSV."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from dsv3 import ConfigError, ModelArgs
from dsv3.compare import compare, to_csv, to_markdown

from .. import plots
from ..messages import args_of, choice, config_line, ok, problem, whole
from .estimate import DTYPES, sizes, stale_note

HINT = "Pin the current config as **A**, then edit the form: the comparison follows it as **B**."


def pin(cfg: Any, form_error: Any = "") -> tuple[Any, str]:
    """The form's config becomes A."""
    if form_error:
        return gr.skip(), "⚠ the form has an error: fix it before pinning it as A"
    try:
        a = args_of(cfg).to_dict()
    except ConfigError as e:
        return gr.skip(), problem(e)
    return a, ok(f"pinned A: {config_line(a)}")


def unpin() -> tuple[None, str, Any, Any, Any, Any]:
    none = plots.empty("no config pinned as A")
    return None, HINT, gr.update(value=None, visible=False), gr.update(visible=False), none, none


def _result(a_cfg: Any, b_cfg: Any, dtype: Any, batch: Any, length: Any, n_gpus: Any):
    a, b = args_of(a_cfg), args_of(b_cfg)
    dtype = choice(dtype, "dtype", DTYPES)
    batch, length = sizes(b, batch, length)
    n_gpus = whole(n_gpus, "n GPUs", 1, 4096)
    return a, b, compare(a, b, dtype=dtype, batch=batch, seq_len=length, n_gpus=n_gpus)


def compare_api(
    a: dict, b: dict, dtype: str = "bf16", batch: int = 1, length: int = 0, n_gpus: int = 1
) -> tuple[str, dict]:
    """Two configs side by side -> (Markdown, the comparison as data). length 0 = B's
    max_seq_len."""
    try:
        _, _, result = _result(a, b, dtype, batch, length, n_gpus)
    except (ConfigError, ValueError) as e:
        return problem(e), {"ok": False, "error": str(e)}
    return to_markdown(result), {"ok": True, **result}


def compare_view(
    pinned: Any,
    cfg: Any,
    dtype: Any = "bf16",
    batch: Any = 1,
    length: Any = 0,
    n_gpus: Any = 1,
    form_error: Any = "",
) -> tuple[str, Any, Any, Any, Any]:
    """A (pinned) vs B (the form) -> (Markdown, Markdown file, CSV file, layer map A, B)."""
    if not pinned:
        return HINT, gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
        a, b, result = _result(pinned, cfg, dtype, batch, length, n_gpus)
    except (ConfigError, ValueError) as e:
        # No table for these settings: its downloads go (they were another comparison's);
        # the layer maps depend on the configs alone and follow them where they are valid.
        gone = gr.update(value=None, visible=False)
        return problem(e), gone, gone, *_maps(pinned, cfg)
    folder = Path(tempfile.mkdtemp(prefix="dsv3-compare-"))
    md_path, csv_path = folder / "compare.md", folder / "compare.csv"
    md = to_markdown(result)
    md_path.write_text(md, encoding="utf-8")
    csv_path.write_text(to_csv(result), encoding="utf-8")
    return (
        stale_note(form_error) + md,
        gr.update(value=str(md_path), visible=True),
        gr.update(value=str(csv_path), visible=True),
        *_maps(a, b),
    )


def _maps(a: Any, b: Any) -> list[Any]:
    """The layer maps of A and B (ModelArgs or configs; an invalid one keeps its map)."""
    maps = []
    for x, name in ((a, "A (pinned)"), (b, "B (the form)")):
        try:
            args = x if isinstance(x, ModelArgs) else args_of(x)
        except (ConfigError, ValueError):
            maps.append(gr.skip())
            continue
        fig = plots.layer_map([la.to_dict() for la in args.layers()])
        maps.append(fig.update_layout(title_text=f"{name}: {fig.layout.title.text}"))
    return maps


# ---------------------------------------------------------------------- layout
def render(page: Any) -> None:
    page.pinned = gr.State(None)
    with gr.Accordion("Compare configs: A (pinned) vs B (the form)", open=False):
        with gr.Row():
            page.pin_btn = gr.Button("Pin current config as A", elem_id="pin-btn", scale=2)
            page.unpin_btn = gr.Button("Clear A", size="sm", scale=1)
        page.compare_md = gr.Markdown(HINT, elem_id="compare-md")
        with gr.Row():
            page.compare_md_file = gr.File(
                label="Markdown", visible=False, elem_id="compare-md-file"
            )
            page.compare_csv_file = gr.File(label="CSV", visible=False, elem_id="compare-csv-file")
        with gr.Row():
            page.map_a = gr.Plot(label="Layer map A", elem_id="map-a")
            page.map_b = gr.Plot(label="Layer map B", elem_id="map-b")


def wire(page: Any) -> None:
    quiet = page.quiet
    inputs = [
        page.pinned,
        page.cfg,
        page.dtype,
        page.est_batch,
        page.est_len,
        page.n_gpus,
        page.form_error,
    ]
    outputs = [page.compare_md, page.compare_md_file, page.compare_csv_file, page.map_a, page.map_b]
    page.compare_step = (compare_view, inputs, outputs)
    pinned = page.pin_btn.click(pin, [page.cfg, page.form_error], [page.pinned, page.compare_md])
    pinned.then(*page.compare_step, **quiet())
    page.unpin_btn.click(unpin, None, [page.pinned, *outputs], **quiet())
    gr.on(
        [page.dtype.change, page.est_batch.change, page.est_len.change, page.n_gpus.change],
        *page.compare_step,
        **quiet(),
    )
    gr.api(compare_api, api_name="compare")
