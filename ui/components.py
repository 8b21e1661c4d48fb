"""Input components that hand the handler exactly what was sent.

Gradio's own `Number` rounds to its precision (2.5 -> 2, silently) and fails on text with a
bare "Error"; its `Dropdown` refuses an unknown value before the handler can say which field it
was. These subclasses pass the raw value on, so the handlers' checks (ui.messages.whole/choice)
answer every input with a message naming the field, its value and the allowed range. The page
draws them exactly as their base components (`is_template`).
"""

from __future__ import annotations

from typing import Any

import gradio as gr


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
