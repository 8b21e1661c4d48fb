"""Input components that hand the handler exactly what was sent.

Gradio's own `Number` rounds to its precision (2.5 -> 2, silently) and fails on text with a
bare "Error"; its `Dropdown` refuses an unknown value before the handler can say which field it
was. These subclasses pass the raw value on, so the handlers' checks (ui.messages.whole/choice)
answer every input with a message naming the field, its value and the allowed range. The page
draws them exactly as their base components (`is_template`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.dataframe import DataframeData
from gradio.data_classes import FileData, ListFiles
from pydantic import ValidationError, model_validator


class WholeNumber(gr.Number):
    """A number box whose value reaches the handler unrounded and unconverted."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Choice(gr.Dropdown):
    """A dropdown whose value reaches the handler even when it is not one of the choices."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class RawSlider(gr.Slider):
    """A slider whose value reaches the handler unchecked (the handler checks its range)."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


# ---------------------------------------------------------------------- tables and files
UNREADABLE = "(not a table)"  # the header a table that could not be read arrives with


class _AnyTable(DataframeData):
    """A table payload; anything that is not {"headers": [...], "data": [[...], ...]} arrives as
    an empty table headed UNREADABLE, so the handler can say what was wrong."""

    @model_validator(mode="before")
    @classmethod
    def _any(cls, v: Any) -> Any:
        if isinstance(v, DataframeData):
            return v
        ok = (
            isinstance(v, dict)
            and isinstance(v.get("headers"), list)
            and isinstance(v.get("data"), list)
            and all(isinstance(r, list) for r in v["data"])
        )
        return v if ok else {"headers": [UNREADABLE], "data": []}


class Table(gr.Dataframe):
    """A dataframe whose value reaches the handler even when it is not a table."""

    is_template = True
    data_model = _AnyTable

    def preprocess(self, payload: Any) -> Any:
        if payload is None:
            return None
        try:
            return super().preprocess(payload)
        except Exception:  # cells pandas cannot hold: the handler says the table is unreadable
            return {"headers": [UNREADABLE], "data": []}


NOT_A_FILE = (
    "expected an uploaded file (from gradio_client: handle_file(path)); nothing was imported"
)


class _OneMessage:
    """A file data model that refuses anything but an upload with one clear message (Gradio's
    own refusal reaches a client as a bare "Error"). Gradio's checks stay as they are."""

    @classmethod
    def model_validate(cls, obj: Any, *a: Any, **kw: Any) -> Any:
        try:
            return super().model_validate(obj, *a, **kw)  # type: ignore[misc]
        except ValidationError:
            # a refusal, not a fault: no traceback in the server's log
            raise gr.Error(NOT_A_FILE, print_exception=False) from None


class _Upload(_OneMessage, FileData):
    pass


class _Uploads(_OneMessage, ListFiles):
    pass


def guard_files(component: Any, field: str) -> Any:
    """`component` (a gr.File or gr.UploadButton) answering a payload that is not an upload with
    NOT_A_FILE, and a file of a type it does not take with a message naming `field`, the file
    and the types allowed; neither leaves a traceback in the server's log (Gradio prints one
    for its own refusals). (Gradio sets `data_model` per instance; a subclass would not render
    as its base for UploadButton.)"""
    component.data_model = _Uploads if component.file_count == "multiple" else _Upload
    checked = component.preprocess
    allowed = ", ".join(component.file_types or [])

    def preprocess(payload: Any) -> Any:
        try:
            return checked(payload)
        except gr.Error:
            files = getattr(payload, "root", payload)  # ListFiles holds its FileData in root
            names = [Path(getattr(f, "orig_name", None) or getattr(f, "path", "")).name
                     for f in (files if isinstance(files, list) else [files])]  # fmt: skip
            wrong = [n for n in names if not n.lower().endswith(tuple(component.file_types or []))]
            raise gr.Error(
                f"field {field}: {', '.join(wrong) or 'a file'}: not an allowed file type; "
                f"allowed: {allowed}; nothing was imported",
                print_exception=False,
            ) from None

    component.preprocess = preprocess
    return component
