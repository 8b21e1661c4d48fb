"""The page: `build_demo() -> gr.Blocks`, components and wiring only (logic is in ui.handlers).

Data flow: every form edit (the widgets' `.input` events) -> `form_changed` validates into the
config hub (`cfg`, a gr.JSON holding the last valid config) -> `estimate` and `rotary` read the
hub. Loading a config (preset, browser, upload, HF import) writes the hub, then `config_to_form`
fills the widgets (which fires no `.input`) while `estimate` and `rotary` re-run from the hub.
Build/Run use the session's gr.State.
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from . import fields
from . import handlers as h
from .state import SESSION_TTL_S, Session, free_session

BROWSER_KEY = "dsv3-playground-presets"
BROWSER_SECRET = os.environ.get("DSV3_BROWSER_SECRET", "dsv3-playground-local-presets")

CSS = """
.status p { margin: 0.2em 0; }
#estimate-summary table { font-size: 0.9em; }
#overrides .cell-wrap { min-width: 5em; }
"""
# System fonts: no request to Google Fonts, so the page also loads offline.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)


def launch_kwargs() -> dict[str, Any]:
    """What `demo.launch` needs beyond host/port: theme and CSS (Gradio 6 takes them at launch),
    footer links, upload limit and the optional login from DSV3_AUTH="user:pass"."""
    kw: dict[str, Any] = {
        "theme": THEME,
        "css": CSS,
        "footer_links": ["api", "gradio", "settings"],
        "max_file_size": h.IMPORT_LIMIT,
    }
    auth = os.environ.get("DSV3_AUTH")
    if auth and ":" in auth:
        user, password = auth.split(":", 1)
        kw["auth"] = (user, password)
    return kw


def _widget(name: str, value: Any) -> gr.components.Component:
    kind = fields.kind(name)
    common = dict(label=name, info=fields.info(name), value=fields.to_widget(name, value))
    if kind == "choice":
        return gr.Dropdown(fields.choices(name), min_width=170, **common)
    if kind == "int":
        return gr.Number(precision=0, min_width=170, **common)
    return gr.Number(min_width=170, **common)


def build_demo() -> gr.Blocks:
    cfg0 = h.initial_config()
    form0, rows0 = fields.dict_to_form(cfg0)
    names = h.list_presets()

    with gr.Blocks(title="DeepSeek-V3 MoE playground") as demo:
        session = gr.State(Session(), time_to_live=SESSION_TTL_S, delete_callback=free_session)
        store = gr.BrowserState({}, storage_key=BROWSER_KEY, secret=BROWSER_SECRET)

        gr.Markdown(
            "# DeepSeek-V3 MoE playground\n"
            "Configure a DeepSeek-V3-style mixture-of-experts transformer (per layer), see what it "
            "costs before building it, build it, run it and look inside."
        )

        # ------------------------------------------------------------------ presets bar
        with gr.Row(equal_height=True, elem_id="presets-bar"):
            preset = gr.Dropdown(names, value=names[0], label="Preset", scale=2, elem_id="preset")
            save_name = gr.Textbox(label="Save as", placeholder="my-preset", scale=2)
            save_btn = gr.Button("Save in browser", scale=1)
            saved = gr.Dropdown([], label="Saved in this browser", scale=2, elem_id="saved")
            load_saved_btn = gr.Button("Load", scale=1)
            delete_saved_btn = gr.Button("Delete", scale=1, variant="stop")
        with gr.Row():
            export_btn = gr.Button("Download config JSON", scale=1, size="sm")
            upload_btn = gr.UploadButton(
                "Upload preset JSON", file_types=[".json"], scale=1, size="sm", elem_id="upload-btn"
            )
            upload_msg = gr.Markdown(elem_classes="status", elem_id="upload-msg")
        export_file = gr.File(label="config JSON", visible=False, elem_id="export-file")
        preset_msg = gr.Markdown(
            f"✔ preset **{names[0]}**", elem_classes="status", elem_id="preset-msg"
        )

        # ------------------------------------------------------------------ configure + estimate
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("## Configure")
                widgets: dict[str, gr.components.Component] = {}
                with gr.Tabs():
                    for section, names_ in fields.SECTIONS.items():
                        with gr.Tab(section):
                            with gr.Row():
                                for name in names_:
                                    widgets[name] = _widget(
                                        name, form0[fields.FORM_FIELDS.index(name)]
                                    )
                overrides = gr.Dataframe(
                    value=rows0,
                    headers=fields.OVERRIDE_COLUMNS,
                    datatype="str",
                    type="pandas",
                    row_count=len(rows0),
                    column_count=len(fields.OVERRIDE_COLUMNS),
                    interactive=True,
                    label="Per-layer overrides: one row per layer, blank cell = inherit "
                    "(ffn: dense|moe; gate_bias: true|false|auto). Double-click a cell to edit; "
                    "type new layers into the blank rows (a cell's ⋮ menu adds more).",
                    elem_id="overrides",
                    max_height=260,
                )
                cfg_msg = gr.Markdown(
                    h.config_to_form(cfg0)[-1], elem_classes="status", elem_id="config-msg"
                )
                with gr.Accordion("Config JSON (last valid)", open=False):
                    cfg = gr.JSON(value=cfg0, label="config", elem_id="config-json")
            with gr.Column(scale=2):
                gr.Markdown("## Estimate")
                with gr.Row():
                    est_batch = gr.Number(1, precision=0, label="batch", min_width=80)
                    est_len = gr.Number(
                        0, precision=0, label="length", info="0 = max_seq_len", min_width=80
                    )
                    n_gpus = gr.Number(1, precision=0, label="n GPUs", min_width=80)
                est_md = gr.Markdown(elem_id="estimate-summary")
        layer_map = gr.Plot(label="Layer map", elem_id="layer-map")
        with gr.Accordion("Per-layer estimate", open=False):
            layers_table = gr.Dataframe(label="per layer", interactive=False, max_height=320)

        # ------------------------------------------------------------------ build + run
        with gr.Row():
            with gr.Column():
                gr.Markdown("## Build")
                with gr.Row():
                    device = gr.Dropdown(h.DEVICES, value="auto", label="device", min_width=100)
                    dtype = gr.Dropdown(h.DTYPES, value="fp32", label="dtype", min_width=100)
                    seed = gr.Number(0, precision=0, label="seed", min_width=100)
                with gr.Row():
                    build_btn = gr.Button("Build", variant="primary", elem_id="build-btn", scale=3)
                    free_btn = gr.Button(
                        "Free model", variant="secondary", elem_id="free-btn", scale=1
                    )
                build_msg = gr.Markdown(elem_classes="status", elem_id="build-msg")
                build_info = gr.JSON(label="built model", visible=False)
            with gr.Column():
                gr.Markdown("## Run")
                with gr.Row():
                    batch = gr.Number(2, precision=0, label="batch", min_width=80)
                    seq_len = gr.Number(16, precision=0, label="seq length", min_width=80)
                    token_seed = gr.Number(0, precision=0, label="token seed", min_width=80)
                    decode_steps = gr.Number(
                        0, precision=0, label="decode steps", info="with KV cache", min_width=80
                    )
                token_ids = gr.Textbox(
                    label="token ids (optional)",
                    placeholder="1 2 3; 4 5 6  (rows = batch; overrides batch/length/seed)",
                )
                run_btn = gr.Button("Run forward", variant="primary", elem_id="run-btn")
                run_msg = gr.Markdown(elem_classes="status", elem_id="run-msg")
                run_info = gr.JSON(label="run", visible=False)

        # ------------------------------------------------------------------ inspect
        gr.Markdown("## Inspect")
        with gr.Tabs(elem_id="inspect-tabs"):
            with gr.Tab("Expert load", id="experts"):
                heatmap = gr.Plot(label="Expert load", elem_id="expert-heatmap")
                balance = gr.Plot(label="Routing balance", elem_id="routing-balance")
                balance_table = gr.Dataframe(
                    headers=h.BALANCE_COLUMNS, label="imbalance per layer", interactive=False
                )
            with gr.Tab("Rotary / YaRN", id="rotary"):
                rot_positions = gr.Slider(
                    8, 1024, value=64, step=8, label="positions in the cos/sin tables"
                )
                rot_md = gr.Markdown(elem_id="rotary-summary")
                rot_freqs = gr.Plot(label="Rotary frequencies", elem_id="rotary-plot")
                rot_tables = gr.Plot(label="cos / sin", elem_id="rotary-tables")
                with gr.Row():
                    cos_table = gr.Dataframe(label="cos", interactive=False, max_height=300)
                    sin_table = gr.Dataframe(label="sin", interactive=False, max_height=300)
            with gr.Tab("Shape trace", id="shapes"):
                trace_plot = gr.Plot(label="Shape trace", elem_id="shape-trace")
                trace_table = gr.Dataframe(
                    label="module outputs", interactive=False, max_height=400
                )
            with gr.Tab("Parameters", id="params"):
                params_plot = gr.Plot(label="Parameters by group", elem_id="params-plot")

        # ------------------------------------------------------------------ export / import
        with gr.Accordion("Export / import weights", open=False):
            with gr.Row():
                with gr.Column():
                    export_w_btn = gr.Button("Export built weights (safetensors)")
                    weights_file = gr.File(label="weights")
                    weights_msg = gr.Markdown(elem_classes="status")
                with gr.Column():
                    hf_files = gr.File(
                        label="HF DeepseekV3 checkpoint: config.json + *.safetensors",
                        file_count="multiple",
                        file_types=[".json", ".safetensors"],
                    )
                    import_btn = gr.Button("Import checkpoint (device/dtype from Build)")
                    hf_msg = gr.Markdown(elem_classes="status")

        # ------------------------------------------------------------------ wiring
        form = [widgets[name] for name in fields.FORM_FIELDS]
        est_in = [cfg, device, dtype, est_batch, est_len, n_gpus]
        est_out = [est_md, layers_table, layer_map, params_plot]
        rot_in = [cfg, rot_positions]
        rot_out = [rot_freqs, rot_tables, cos_table, sin_table, rot_md]
        n_private = iter(range(100))

        def quiet() -> dict[str, Any]:
            # Internal steps: hidden from the API, named so they never take a public name.
            return dict(
                show_progress="hidden", api_visibility="private", api_name=f"_step{next(n_private)}"
            )

        def refill_form(event: Any) -> None:
            """After a config is loaded into the hub: show it in the widgets and re-estimate.
            Filling widgets fires no `.input`, so no half-updated form is ever validated."""
            event.then(h.config_to_form, cfg, [*form, overrides, cfg_msg], **quiet())
            event.then(h.estimate, est_in, est_out, **quiet())
            event.then(h.rotary, rot_in, rot_out, **quiet())

        gr.api(h.list_presets, api_name="presets")
        refill_form(preset.input(h.load_preset, preset, [cfg, preset_msg], api_name="preset"))
        # `.input` = edits by the user only (not programmatic fills), every keystroke/cell.
        edited = gr.on(
            [w.input for w in form] + [overrides.input],
            h.form_changed,
            [cfg, overrides],
            [cfg, cfg_msg],
            inputs_kwargs=widgets,  # API parameters named after the fields
            trigger_mode="always_last",
            show_progress="hidden",
            api_name="config_from_form",
        )
        edited.then(h.estimate, est_in, est_out, **quiet())
        edited.then(h.rotary, rot_in, rot_out, **quiet())
        gr.on(
            [device.change, dtype.change, est_batch.change, est_len.change, n_gpus.change],
            h.estimate,
            est_in,
            est_out,
            trigger_mode="always_last",
            show_progress="hidden",
            api_name="estimate",
        )
        rot_positions.release(h.rotary, rot_in, rot_out, api_name="rotary")

        save_btn.click(
            h.save_browser,
            [store, save_name, cfg],
            [store, saved, preset_msg],
            api_name="browser_save",
        )
        refill_form(
            load_saved_btn.click(
                h.load_browser, [store, saved], [cfg, preset_msg], api_name="browser_load"
            )
        )
        delete_saved_btn.click(
            h.delete_browser, [store, saved], [store, saved, preset_msg], api_name="browser_delete"
        )
        export_btn.click(
            h.export_config, [cfg, save_name], [export_file, preset_msg], api_name="export_config"
        )
        refill_form(
            upload_btn.upload(
                h.import_config, upload_btn, [cfg, upload_msg], api_name="import_config"
            )
        )

        build_btn.click(
            h.build,
            [cfg, device, dtype, seed, session],
            [session, build_msg, build_info],
            api_name="build",
            concurrency_id="model",
        )
        free_btn.click(h.release_model, session, [session, build_msg], api_name="release")
        run_btn.click(
            h.forward,
            [session, batch, seq_len, token_seed, token_ids, decode_steps],
            [session, run_msg, run_info, trace_table, trace_plot, heatmap, balance, balance_table],
            api_name="forward",
            concurrency_id="model",
        )
        export_w_btn.click(
            h.export_weights, session, [weights_file, weights_msg], api_name="export_weights"
        )
        refill_form(
            import_btn.click(
                h.import_hf,
                [hf_files, device, dtype, session],
                [session, cfg, hf_msg],
                api_name="import_hf",
                concurrency_id="model",
            )
        )

        demo.load(h.estimate, est_in, est_out, **quiet())
        demo.load(h.rotary, rot_in, rot_out, **quiet())
        demo.load(h.saved_names_update, store, saved, **quiet())
        demo.unload(h.on_unload)
    return demo
