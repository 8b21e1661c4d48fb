"""Files: the built weights as a safetensors download, and a checkpoint import: a Hugging Face
DeepSeek-V2/V3 checkpoint (config.json + *.safetensors) or the app's own exported file alone
(its ModelArgs travel in the file's metadata)."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr

from dsv3 import ConfigError, count_params
from dsv3 import estimate as estimate_model
from dsv3.params import NO_FP8_PATH, human_bytes

from .. import lazy, plots, settings
from ..components import guard_files
from ..messages import choice, lit, ok, problem
from ..state import Session, make_room
from .estimate import DTYPES, dense_copies_here, weights_held
from .run import adopt, usable_device


def _tmp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dsv3-"))


def export_weights(session: Session | None) -> tuple[Any, str]:
    """The built weights as a safetensors file (refused above DSV3_EXPORT_LIMIT)."""
    from dsv3 import checkpoint

    if not isinstance(session, Session) or session.model is None:
        return None, "⚠ nothing built yet: press Build first"
    if session.device == "meta":
        return None, "⚠ a meta model has shapes but no weights to export; build on cpu or cuda"
    if session.model_bytes > settings.EXPORT_LIMIT:
        return None, (
            f"✘ not exported: the weights take {human_bytes(session.model_bytes)}, above the "
            f"export limit {human_bytes(settings.EXPORT_LIMIT)} (DSV3_EXPORT_LIMIT)"
        )
    origin = f"seed{session.seed}" if session.seed is not None else "imported"
    path = _tmp_dir() / f"dsv3-{session.dtype}-{origin}.safetensors"
    t0 = time.perf_counter()
    with session.in_use():
        checkpoint.save(session.model, path)
    size = path.stat().st_size
    session.exported = str(path)
    return str(path), ok(f"{path.name}: {human_bytes(size)} in {time.perf_counter() - t0:.2f} s")


def weights_follow(session: Any) -> tuple[Any, Any]:
    """The export's file and message once the model changed (a build, free or import): the
    file was the previous model's, so it goes; a model kept (a refused build) keeps them."""
    if isinstance(session, Session) and session.exported:
        return gr.skip(), gr.skip()
    exportable = (
        isinstance(session, Session)
        and session.model is not None
        and session.device != "meta"
        and session.model_bytes <= settings.EXPORT_LIMIT
    )
    text = "no export of this model yet: press Export to download its weights"
    return None, text if exportable else ""


class Refused(Exception):
    """A request turned down before anything was allocated; the message says why."""


def _paths(files: Any) -> list[Path]:
    files = files if isinstance(files, (list, tuple)) else [files] if files else []
    out = []
    for f in files:
        p = f if isinstance(f, str) else getattr(f, "name", None)
        if not isinstance(p, str) or not Path(p).is_file():
            raise Refused("⚠ an uploaded file could not be read; upload it again")
        out.append(Path(p))
    return out


def _plan(paths: list[Path]) -> tuple[str, Path | None]:
    """Which import: ("native", the file) for one .safetensors exported by this app (its
    ModelArgs are in its metadata; a config.json beside it is not needed), ("hf", None) for
    config.json + *.safetensors; else Refused."""
    from dsv3 import checkpoint

    names = [p.name for p in paths]
    tensors = [p for p in paths if p.name.endswith(".safetensors")]
    if len(names) != len(set(names)):
        raise Refused("⚠ two uploaded files have the same name; upload each file once")
    if not tensors:
        raise Refused(
            "⚠ upload a checkpoint: a Hugging Face config.json with its .safetensors file(s), "
            "or a .safetensors file exported by this app"
        )
    if len(tensors) == 1:
        try:
            if checkpoint.saved_args(tensors[0]) is not None:
                return "native", tensors[0]
        except checkpoint.CheckpointError as e:
            if "config.json" not in names:
                raise ConfigError(str(e), field="checkpoint") from None
    if "config.json" not in names:
        exports = [p.name for p in tensors if _is_export(p)]
        if len(exports) > 1:
            raise Refused(
                f"⚠ {lit(', '.join(exports))} are each an export of this app: import one at a "
                "time (each carries its own config)"
            )
        if exports:
            raise Refused(
                f"⚠ {lit(exports[0])} is an export of this app: upload it alone (an export is "
                "one file; the other .safetensors are not part of it)"
            )
        raise Refused(
            f"⚠ {lit(tensors[0].name)} was not exported by this app (no dsv3 metadata): upload "
            "the checkpoint's config.json with it"
        )
    return "hf", None


def _is_export(path: Path) -> bool:
    """Whether a .safetensors file carries this app's ModelArgs (`checkpoint.saved_args`)."""
    from dsv3 import checkpoint

    try:
        return checkpoint.saved_args(path) is not None
    except checkpoint.CheckpointError:
        return False


def _size_check(paths: list[Path]) -> None:
    total = sum(p.stat().st_size for p in paths)
    if total > settings.IMPORT_LIMIT:
        raise Refused(
            f"✘ not imported: {human_bytes(total)} uploaded, above the import limit "
            f"{human_bytes(settings.IMPORT_LIMIT)} (DSV3_IMPORT_LIMIT)"
        )


def _clean(text: str, folder: Path) -> str:
    """A loader's message with the private temp folder replaced by 'the upload'."""
    text = text.replace(str(folder), "the upload").replace(folder.name, "the upload")
    return re.sub(r"/tmp/[^\s:'\"]*dsv3-[a-z0-9_]+", "the upload", text)


def _load(paths: list[Path], plan: tuple[str, Path | None], dev: str, dtype: str, session: Session):
    """Copy the upload to a private temp dir, check the memory, load the `plan` (`_plan`'s)
    -> (model, seconds, kind, bytes of the bf16 copies an fp8 model keeps on a GPU without an
    fp8 path, made after the load as a build makes them). The session's current model stays
    loaded until the import succeeds."""
    from dsv3 import checkpoint

    kind, native = plan
    folder = _tmp_dir()
    try:
        for p in paths:
            shutil.copy(p, folder / p.name)
        if kind == "native":
            args = checkpoint.saved_args(folder / native.name)
        else:
            args = checkpoint.args_from_hf_config(checkpoint.read_hf_config(folder / "config.json"))
        wbytes = weights_held(estimate_model(args, dtype=dtype, batch=1, seq_len=1), dev)
        fits, reason, _ = make_room(wbytes, dev, session)
        if not fits:
            raise Refused(f"✘ not imported, nothing allocated: {dtype} weights: {reason}")
        t0 = time.perf_counter()
        if kind == "native":
            model = checkpoint.load(folder / native.name, device=dev, dtype=dtype)
        else:
            model = checkpoint.load_hf(folder, device=dev, dtype=dtype)
        copies = 0
        if model.dtype_name == "fp8" and dense_copies_here(dev):  # from the loaded weights
            copies = model.dequantize_once()
        return model, time.perf_counter() - t0, kind, copies
    except Refused:
        raise
    except (ConfigError, ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        # CheckpointError and JSONDecodeError are ValueErrors
        field, layer = getattr(e, "field", None), getattr(e, "layer", None)
        raise ConfigError(_clean(str(e), folder), field=field, layer=layer) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def import_hf(
    files: Any,
    device: Any,
    dtype: Any,
    session: Session | None,
    request: gr.Request | None = None,
) -> tuple[Any, Any, str]:
    """A checkpoint upload (HF config.json + *.safetensors, or one file exported by this app)
    -> a session model + its config."""
    session = session if isinstance(session, Session) else Session()
    try:
        dev = usable_device(device)
        dtype = choice(dtype, "dtype", DTYPES)
        paths = _paths(files)
        plan = _plan(paths)
        _size_check(paths)
        with session.in_use():
            model, seconds, kind, copies = _load(paths, plan, dev, dtype, session)
    except Refused as e:
        return session, gr.skip(), str(e)
    except ConfigError as e:
        return session, gr.skip(), problem(e)
    session.free()
    used = [p for p in paths if kind != "native" or p == plan[1]]
    unused = [p.name for p in paths if p not in used]
    source = lit(", ".join(p.name for p in used))
    nbytes = lazy.runtime.tensor_bytes(model)
    adopt(session, model, None, seconds, nbytes, f"import {source}", request, copies)
    total = plots.human(count_params(model.args)["total"])
    what = "this app's export" if kind == "native" else "a Hugging Face checkpoint"
    notes = ""
    if unused:  # an export carries its own config: a config.json beside it is not read
        notes += f"; not used: {lit(', '.join(unused))} (the export carries its own config)"
    if dev == "meta":
        notes += "; on meta only the shapes are kept: the weights were not loaded"
    if copies:
        notes += f"; the fp8 weights are also kept dequantised to bf16, {human_bytes(copies)} "
        notes += f"({NO_FP8_PATH})"
    msg = (
        f"imported {total} params ({what}: {source}) in {seconds:.2f} s onto {dev} in "
        f"{model.dtype_name}; it replaced the session's model{notes}"
    )
    return session, session.config, ok(msg)


# ---------------------------------------------------------------------- layout
def render(page: Any) -> None:
    with gr.Accordion("Export / import weights", open=False):
        with gr.Row():
            with gr.Column():
                page.export_w_btn = gr.Button("Export built weights (safetensors)")
                page.weights_file = gr.File(label="weights")
                page.weights_msg = gr.Markdown(elem_classes="status", elem_id="weights-msg")
            with gr.Column():
                page.hf_files = guard_files(
                    gr.File(
                        label="Checkpoint: HF config.json + *.safetensors, or a .safetensors "
                        "exported here",
                        file_count="multiple",
                        file_types=[".json", ".safetensors"],
                        elem_id="hf-files",
                    ),
                    "checkpoint",
                )
                page.import_btn = gr.Button(
                    "Import checkpoint (device/dtype from Build)", elem_id="import-btn"
                )
                page.hf_msg = gr.Markdown(elem_classes="status", elem_id="hf-msg")


def wire(page: Any) -> None:
    page.export_w_btn.click(
        export_weights,
        page.session,
        [page.weights_file, page.weights_msg],
        api_name="export_weights",
        concurrency_id="model",
    )
    imported = page.import_btn.click(
        import_hf,
        [page.hf_files, page.device, page.dtype, page.session],
        [page.session, page.cfg, page.hf_msg],
        api_name="import_hf",
        concurrency_id="model",
    )
    # The import replaced the model: the Build line and the preset name no longer describe it.
    imported.then(
        _after_import, page.hf_msg, [page.build_msg, page.preset, page.source_msg], **page.quiet()
    )
    page.config_loaded(imported, status=page.hf_msg)
    page.model_replaced(imported)


def _after_import(msg: str) -> tuple[Any, Any, Any]:
    if not isinstance(msg, str) or not msg.startswith("✔"):
        return gr.skip(), gr.skip(), gr.skip()
    return (
        "✔ the model now comes from the checkpoint import (see Export / import)",
        gr.update(value=None),  # the preset no longer names what is on the form either
        "the form holds the imported checkpoint's config (see Export / import)",
    )
