"""Configure: the presets bar, the form (every ModelArgs field), the per-layer override table and
the config hub, with the handlers that read and write them.

Data flow: every form edit (the widgets' `.input` events) -> `form_changed` validates into the
config hub `cfg` (a gr.JSON holding the last valid config) and `form_error` (the form's current
error, "" when it is valid): Estimate, Build and the model status read both, so an invalid form
is never silently replaced by the last valid config. Loading a config (preset, browser, file,
checkpoint) writes the hub, then `config_to_form` fills the widgets (which fires no `.input`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from dsv3 import ConfigError, ModelArgs, args_from_hf_config, count_params, presets
from dsv3.checkpoint.hf_config import hf_defaulted
from dsv3.config import unused_by

from .. import fields, plots, settings
from ..components import Choice, Table, WholeNumber, guard_files
from ..messages import args_of, choice, clip, config_line, lit, ok, problem

BROWSER_KEY = "dsv3-playground-presets"
CLEAR_UPLOAD_JS = """() => {
  const input = document.querySelector(
    'input[data-testid="Upload preset or config.json-upload-button"]'
  );
  if (input) input.value = '';
}"""
PRESET_FILE_LIMIT = 1 << 20
SAVE_NAME_LIMIT = 80


# ---------------------------------------------------------------------- handlers
def list_presets() -> list[str]:
    """Names of the shipped presets, tiny first."""
    return presets.names()


def initial_config() -> dict[str, Any]:
    names = presets.names()
    return presets.load("tiny" if "tiny" in names else names[0]).to_dict()


def load_preset(name: Any) -> tuple[dict | Any, str]:
    """A shipped preset by name -> (config dict, status)."""
    try:
        doc = presets.load_preset(choice(name, "preset", presets.names()))
    except ConfigError as e:
        return gr.skip(), problem(e)
    return doc["args"].to_dict(), ok(f"preset **{doc['name']}** ({size_text(doc['args'])})")


def size_text(args: ModelArgs) -> str:
    """'671.03B params + 11.61B MTP' (the MTP module apart, as model cards count it)."""
    c = count_params(args)
    if c.get("mtp"):
        return f"{plots.human(c['main'])} params + {plots.human(c['mtp'])} MTP"
    return f"{plots.human(c['total'])} params"


def valid_line(cfg: dict[str, Any]) -> str:
    """The form's status for a valid config, with a note on overrides that change nothing."""
    return ok(f"valid: {config_line(cfg)}") + _inert_note(cfg)


def _inert_note(cfg: dict[str, Any]) -> str:
    """ "  \nnote: layer 0 is dense: n_routed_experts has no effect there" for each override
    of a field the layer's kind does not use (accepted: the kind may change back)."""
    try:
        args = args_of(cfg)
    except ConfigError:
        return ""
    notes = [
        f"layer {i} is {args.ffn_kind(i)}: {k} has no effect there"
        for i, over in sorted(args.layer_config.items())
        for k in over
        if unused_by(k, args.ffn_kind(i))
    ]
    return "".join(f"  \nnote: {lit(n)}" for n in notes)


def config_to_form(cfg: dict[str, Any]) -> list[Any]:
    """Config dict -> every form widget's value (FORM_FIELDS order), the override rows, the
    form's status line and its (cleared) error."""
    values, rows = fields.dict_to_form(cfg)
    return [*values, rows, valid_line(cfg), ""]


def fill_form(cfg: dict[str, Any], status: str) -> list[Any]:
    """After a config load: fill the form from the hub, unless the load was refused (the form,
    with whatever the user was editing, stays as it is)."""
    if not isinstance(status, str) or not status.startswith("✔"):
        return [gr.skip()] * (len(fields.FORM_FIELDS) + 3)
    return config_to_form(cfg)


def _changed_fields(prev: Any, values: dict[str, Any]) -> list[str]:
    """Form fields whose value differs from the previous valid config (what the user edited)."""
    if not isinstance(prev, dict):
        return []
    out = []
    for name in fields.FORM_FIELDS:
        try:
            if fields._coerce(name, values[name]) != prev.get(name):
                out.append(name)
        except ConfigError:
            out.append(name)
    return out


def form_changed(prev_cfg: Any, overrides: Any, **values: Any) -> tuple[Any, str, str]:
    """Form values by field name -> (config, status, form error). On error the hub keeps the
    previous config, the status names the field (the one the user changed, when the broken
    rule involves several) and the error marks everything that reads the hub as stale."""
    try:
        missing = [name for name in fields.FORM_FIELDS if name not in values]
        if missing:
            raise ConfigError(f"missing form field(s): {', '.join(missing)}", field=missing[0])
        cfg = fields.form_to_dict([values[name] for name in fields.FORM_FIELDS], overrides)
    except ConfigError as e:
        changed = _changed_fields(prev_cfg, values) if not missing else []
        if e.layer is None and len(changed) == 1 and e.field != changed[0]:
            # the field the user changed leads; the message already names it when it is the
            # broken one under another field name (no "n: n: n=7")
            text = str(e)
            lead = "" if text.startswith(changed[0]) else f"{changed[0]}: "
            e = ConfigError(f"{lead}{text}", field=changed[0])
        msg = problem(e)
        return prev_cfg if isinstance(prev_cfg, dict) else gr.skip(), msg, msg
    return cfg, valid_line(cfg), ""


def saved_names_update(store: Any) -> Any:
    names = sorted(store) if isinstance(store, dict) else []
    return gr.update(choices=names, value=names[-1] if names else None)


def _save_name(name: Any) -> str:
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise ConfigError("give the preset a name first", field="Save as")
    if len(name) > SAVE_NAME_LIMIT:
        raise ConfigError(
            f"a name of {len(name)} characters is too long; allowed: 1..{SAVE_NAME_LIMIT}",
            field="Save as",
        )
    return name


def save_browser(store: Any, name: Any, cfg: Any, form_error: str = "") -> tuple[Any, Any, str]:
    """Save the current config in the browser's localStorage under `name`."""
    try:
        name = _save_name(name)
        if form_error:
            raise ConfigError(
                "the form has an error: fix it before saving (the last valid config was not saved)",
                field="config",
            )
        args = args_of(cfg)
    except ConfigError as e:
        return gr.skip(), gr.skip(), problem(e)
    store = dict(store) if isinstance(store, dict) else {}
    replaced = name in store
    store[name] = args.to_dict()  # plain, JSON-safe dict
    said = "replaced the config saved as" if replaced else "saved"
    return (
        store,
        gr.update(choices=sorted(store), value=name),
        ok(f"{said} **{lit(name)}** in this browser"),
    )


def _not_saved(name: Any) -> str:
    if not isinstance(name, str) or not name:
        return "⚠ choose a saved config first"
    return f"⚠ no preset named {lit(repr(name))} saved in this browser"


def load_browser(store: Any, name: Any) -> tuple[Any, str]:
    """A config saved in this browser -> (config, status)."""
    store = store if isinstance(store, dict) else {}
    if not isinstance(name, str) or name not in store:
        return gr.skip(), _not_saved(name)
    try:
        cfg = args_of(store[name]).to_dict()
    except ConfigError as e:  # saved by an older version, say
        return gr.skip(), problem(e)
    return cfg, ok(f"loaded **{lit(name)}** from this browser")


def not_a_preset(status: Any) -> Any:
    """After a config arrived from elsewhere (browser, file, checkpoint): the Preset dropdown no
    longer names what is on the form."""
    ok_ = isinstance(status, str) and status.startswith("✔")
    return gr.update(value=None) if ok_ else gr.skip()


EDITED = "; the form was edited since"
FIXED = "✔ the form's error is fixed: save or download again"


def after_edit(source: Any, form_error: Any) -> Any:
    """The config line after a form edit: a refusal that blamed the form's error goes once the
    form is valid again (it stayed, next to the form's own "✔ valid"), and where the config came
    from gets "edited since" (it still read "✔ preset tiny" for a form holding another dim)."""
    if form_error or not isinstance(source, str):
        return gr.skip()
    if "the form has an error" in source:
        return FIXED
    if source.startswith("✔") and source != FIXED and not source.endswith(EDITED):
        return source + EDITED
    return gr.skip()


def delete_browser(store: Any, name: Any) -> tuple[Any, Any, str]:
    store = dict(store) if isinstance(store, dict) else {}
    if not isinstance(name, str) or store.pop(name, None) is None:
        return gr.skip(), gr.skip(), _not_saved(name)
    # Nothing chosen after a delete: a second click must not delete the next config too.
    names = gr.update(choices=sorted(store), value=None)
    return store, names, ok(f"deleted **{lit(name)}** from this browser")


def export_config(cfg: Any, name: Any = "", form_error: str = "") -> tuple[Any, str]:
    """The current config as a preset JSON file to download."""
    try:
        if form_error:
            raise ConfigError("the form has an error: fix it before downloading", field="config")
        args = args_of(cfg)
    except ConfigError as e:
        return gr.skip(), problem(e)
    name = (name.strip() if isinstance(name, str) else "")[:SAVE_NAME_LIMIT] or "my-preset"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    path = Path(tempfile.mkdtemp(prefix="dsv3-")) / f"{safe}.json"
    path.write_text(presets.to_json(args, name), encoding="utf-8")
    return gr.update(value=str(path), visible=True), ok(f"{lit(path.name)} ready to download")


def _upload_path(file: Any) -> Path | None:
    if isinstance(file, (list, tuple)):
        file = file[0] if len(file) == 1 else None
    path = file if isinstance(file, str) else getattr(file, "name", None)
    return Path(path) if isinstance(path, str) and path else None


def defaults_note(left: list[str], hf: bool) -> str:
    """ "; 2 key(s) not in the file take transformers' defaults: a, b" (an HF config's keys),
    "; 2 field(s) not in the file keep their defaults: a, b" (ModelArgs fields); "" for none."""
    if not left:
        return ""
    what = (
        "key(s) not in the file take transformers'" if hf else "field(s) not in the file keep their"
    )
    return f"; {len(left)} {what} defaults: {', '.join(left)}"


def _config_from_json(doc: Any, text: str, name: str) -> tuple[ModelArgs, list[str]]:
    """A preset document, a Hugging Face config.json, or a plain dict of ModelArgs fields ->
    (args, fields left default: HF keys for an HF config)."""
    if is_hf_config(doc):
        try:
            return args_from_hf_config(doc), hf_defaulted(doc)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}", field=e.field, layer=e.layer) from None
    if isinstance(doc, dict) and "args" in doc:
        args = presets.parse(text, source=name)["args"]
        given = doc["args"]
    else:
        if not isinstance(doc, dict):
            raise ConfigError(
                f"{name} must be a JSON object of ModelArgs fields (or a preset document), "
                f"got {type(doc).__name__}",
                field="preset",
            )
        given = doc
        try:
            args = ModelArgs.from_dict(doc)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}", field=e.field, layer=e.layer) from None
    known = [f for f in fields.FORM_FIELDS if f in given]
    if not known:
        raise ConfigError(
            f"{name} sets no ModelArgs field (e.g. dim, n_layers); nothing to import",
            field="preset",
        )
    return args, [f for f in fields.FORM_FIELDS if f not in given]


def is_hf_config(doc: Any) -> bool:
    """A Hugging Face config.json (DeepSeek-V2/V3, Kimi K2, V3.2...) rather than a preset: every
    one names its model_type (a nested text_config for Kimi K2.5)."""
    return isinstance(doc, dict) and bool({"model_type", "text_config"} & set(doc))


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def hf_config(text: Any) -> tuple[Any, str]:
    """A Hub repository id (reads its config.json alone) or a pasted config.json -> (config,
    status). Nothing but the config is downloaded: the weights are never needed to size a
    model."""
    text = text.strip() if isinstance(text, str) else ""
    try:
        if not text:
            raise ConfigError(
                "give a Hub repository id (e.g. deepseek-ai/DeepSeek-V3) or paste a config.json",
                field="HF config",
            )
        if text.startswith("{"):
            if len(text) > PRESET_FILE_LIMIT:
                raise ConfigError("the pasted config is larger than 1 MiB", field="HF config")
            try:
                doc = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ConfigError(
                    f"the pasted config is not valid JSON: {e}", field="HF config"
                ) from None
            source = "the pasted config.json"
        elif REPO_ID.fullmatch(text):
            from dsv3.checkpoint.hf_config import fetch_hf_config

            doc, source = fetch_hf_config(text), f"{text}/config.json"
        else:
            raise ConfigError(
                f"{clip(repr(text), 60)} is neither a Hub repository id (owner/name) nor a "
                "config.json",
                field="HF config",
            )
        if not is_hf_config(doc):
            raise ConfigError(
                f"{source} is not a Hugging Face config (it has no model_type)",
                field="HF config",
            )
        args = args_from_hf_config(doc)
    except ConfigError as e:
        return gr.skip(), problem(e)
    note = defaults_note(hf_defaulted(doc), hf=True)
    return args.to_dict(), ok(
        f"read **{lit(source)}** ({size_text(args)}); no weights loaded{note}"
    )


def import_config(file: Any) -> tuple[Any, str]:
    """An uploaded preset JSON (a preset document, or plain ModelArgs fields) -> (config,
    status). A file that sets only some fields is imported with a note listing the fields left
    at their defaults."""
    path = _upload_path(file)
    if path is None or not path.is_file():
        return gr.skip(), "⚠ no preset file uploaded"
    name = lit(path.name)
    try:
        if path.stat().st_size > PRESET_FILE_LIMIT:
            raise ConfigError(
                f"{path.name} is larger than 1 MiB; a preset is a small JSON file", field="preset"
            )
        text = path.read_text(encoding="utf-8-sig")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path.name} is not valid JSON: {e}", field="preset") from None
        except RecursionError:  # absurdly nested JSON: refuse rather than crash the handler
            raise ConfigError(
                f"{path.name} is nested too deeply to be a preset", field="preset"
            ) from None
        args, defaulted = _config_from_json(doc, text, path.name)
    except UnicodeDecodeError:
        return gr.skip(), problem(ConfigError(f"{path.name} is not UTF-8 text", field="preset"))
    except (ConfigError, TypeError) as e:
        return gr.skip(), problem(e)
    note = defaults_note(defaulted, hf=is_hf_config(doc))
    msg = ok(f"imported **{name}** ({size_text(args)}){note}")
    return args.to_dict(), msg


# ---------------------------------------------------------------------- layout
def _widget(name: str, value: Any) -> gr.components.Component:
    kind = fields.kind(name)
    common = dict(
        label=name,
        info=fields.info(name),
        value=fields.to_widget(name, value),
        min_width=170,
        elem_id=f"field-{name}",
    )
    if kind == "choice":
        return Choice(fields.choices(name), **common)
    return WholeNumber(**common) if kind == "int" else gr.Number(**common)


def render_bar(page: Any) -> None:
    """The presets bar: shipped presets, configs saved in the browser, config files."""
    names = list_presets()
    page.store = gr.BrowserState({}, storage_key=BROWSER_KEY, secret=settings.BROWSER_SECRET)
    page.form_error = gr.State("")
    with gr.Row(equal_height=True, elem_id="presets-bar"):
        page.preset = Choice(names, value=names[0], label="Preset", scale=2, elem_id="preset")
        page.save_name = gr.Textbox(
            label="Save as", placeholder="my-preset", scale=2, max_length=SAVE_NAME_LIMIT
        )
        page.save_btn = gr.Button("Save in browser", scale=1)
        page.saved = Choice([], label="Saved in this browser", scale=2, elem_id="saved")
        page.load_saved_btn = gr.Button("Load", scale=1)
        page.delete_saved_btn = gr.Button("Delete", scale=1, variant="stop")
    with gr.Row():
        page.export_btn = gr.Button("Download config JSON", scale=1, size="sm")
        page.upload_btn = guard_files(
            gr.UploadButton(
                "Upload preset or config.json",
                file_types=[".json"],
                scale=1,
                size="sm",
                elem_id="upload-btn",
            ),
            "config upload",
        )
    with gr.Row(equal_height=True):
        page.hf_text = gr.Textbox(
            label="Hugging Face config: a Hub repo id, or paste a config.json",
            placeholder='moonshotai/Kimi-K2-Instruct   or   {"model_type": "deepseek_v3", ...}',
            lines=1,
            max_lines=6,
            scale=4,
            elem_id="hf-config",
        )
        page.hf_btn = gr.Button("Read config (no weights)", scale=1, elem_id="hf-config-btn")
    page.export_file = gr.File(label="config JSON", visible=False, elem_id="export-file")
    # One line for every way a config arrives (preset, browser, file): the newest action wins.
    page.source_msg = gr.Markdown(
        f"✔ preset **{names[0]}**", elem_classes="status", elem_id="preset-msg"
    )


def render(page: Any) -> None:
    """The Configure column: the form by section, the override table, the config hub."""
    cfg0 = initial_config()
    form0, rows0 = fields.dict_to_form(cfg0)
    gr.Markdown("## Configure")
    page.widgets = {}
    with gr.Tabs():
        for section, names_ in fields.SECTIONS.items():
            with gr.Tab(section):
                with gr.Row():
                    for name in names_:
                        page.widgets[name] = _widget(name, form0[fields.FORM_FIELDS.index(name)])
    page.form = [page.widgets[name] for name in fields.FORM_FIELDS]
    page.overrides = Table(
        value=rows0,
        headers=fields.TABLE_COLUMNS,
        datatype="str",
        type="pandas",
        row_count=len(rows0),
        column_count=len(fields.TABLE_COLUMNS),
        interactive=True,
        label="Per-layer overrides: one row per layer and field (e.g. 5 | n_heads | 32). "
        "Double-click a cell to edit; type into the blank rows; clear a row to inherit again. "
        f"Fields: {', '.join(fields.OVERRIDE_COLUMNS[1:])}.",
        elem_id="overrides",
        max_height=300,
        column_widths=["18%", "42%", "40%"],
    )
    # Exactly these three columns: no column can be added, so no value can sit out of sight.
    page.overrides.col_count = (len(fields.TABLE_COLUMNS), "fixed")
    page.more_rows_btn = gr.Button("+ 4 blank rows", size="sm", elem_id="more-rows")
    page.cfg_msg = gr.Markdown(valid_line(cfg0), elem_classes="status", elem_id="config-msg")
    with gr.Accordion("Config JSON (last valid)", open=False):
        page.cfg = gr.JSON(value=cfg0, label="config", elem_id="config-json")


def more_rows(table: Any) -> Any:
    """The override table with 4 more blank rows (a button, so never while a cell is edited)."""
    try:
        _, rows = fields._table(table)
    except ConfigError:
        return gr.skip()
    rows = [[("" if fields._blank(c) else str(c)) for c in r] for r in rows]
    return rows + [[""] * len(fields.TABLE_COLUMNS) for _ in range(fields.BLANK_ROWS)]


def wire(page: Any) -> None:
    quiet, refill = page.quiet, page.config_loaded
    gr.api(list_presets, api_name="presets")
    refill(
        page.preset.input(load_preset, page.preset, [page.cfg, page.source_msg], api_name="preset")
    )
    # `.input` = edits by the user only (not programmatic fills), every keystroke/cell.
    edited = gr.on(
        [w.input for w in page.form] + [page.overrides.input],
        form_changed,
        [page.cfg, page.overrides],
        [page.cfg, page.cfg_msg, page.form_error],
        inputs_kwargs=page.widgets,  # API parameters named after the fields
        trigger_mode="always_last",
        show_progress="hidden",
        api_name="config_from_form",
    )
    page.config_changed(edited)
    edited.then(after_edit, [page.source_msg, page.form_error], page.source_msg, **quiet())
    page.more_rows_btn.click(more_rows, page.overrides, page.overrides, **quiet())

    page.save_btn.click(
        save_browser,
        [page.store, page.save_name, page.cfg, page.form_error],
        [page.store, page.saved, page.source_msg],
        api_name="browser_save",
    )
    loaded = page.load_saved_btn.click(
        load_browser, [page.store, page.saved], [page.cfg, page.source_msg], api_name="browser_load"
    )
    loaded.then(not_a_preset, page.source_msg, page.preset, **quiet())
    refill(loaded)
    page.delete_saved_btn.click(
        delete_browser,
        [page.store, page.saved],
        [page.store, page.saved, page.source_msg],
        api_name="browser_delete",
    )
    page.export_btn.click(
        export_config,
        [page.cfg, page.save_name, page.form_error],
        [page.export_file, page.source_msg],
        api_name="export_config",
    )
    uploaded = page.upload_btn.upload(
        import_config, page.upload_btn, [page.cfg, page.source_msg], api_name="import_config"
    )
    uploaded.then(not_a_preset, page.source_msg, page.preset, **quiet())
    # Forget the file, so choosing the same file again is a new upload that imports again: the
    # browser fires no change for a file input that already holds the chosen file.
    uploaded.then(None, js=CLEAR_UPLOAD_JS, **quiet())
    refill(uploaded)
    read = page.hf_btn.click(
        hf_config, page.hf_text, [page.cfg, page.source_msg], api_name="hf_config"
    )
    read.then(not_a_preset, page.source_msg, page.preset, **quiet())
    refill(read)
    page.demo.load(saved_names_update, page.store, page.saved, **quiet())
