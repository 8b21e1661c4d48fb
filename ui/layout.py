"""The page: `build_demo() -> gr.Blocks`. It only composes: each part of the page (ui/tabs/:
configure, estimate, run, inspect, files) renders its components and wires its own events.

Every part writes its components onto one `Page` namespace, so a part can wire events that read
or update another's (Build reads the config hub, Run fills the Inspect figures). The refresh
rules live here, once: after a config is loaded the form is filled, then everything that reads
the config (estimate, speed, rotary, model status) runs again, in that order.
"""

from __future__ import annotations

from itertools import count
from typing import Any

import gradio as gr

from . import settings
from .state import Session, free_session, release
from .tabs import compare, configure, estimate, files, inspect, run

CSS = """
.status p { margin: 0.2em 0; }
#estimate-summary table { font-size: 0.9em; }
/* Wide Markdown tables scroll sideways on a narrow screen instead of breaking numbers. */
#compare-md table, #estimate-summary table { display: block; overflow-x: auto; }
#compare-md td:not(:first-child), #compare-md th:not(:first-child) { white-space: nowrap; }
/* Row labels wrap between words, never inside one ("weigh ts"), and keep a readable width. */
#compare-md td:first-child, #estimate-summary td:first-child { word-break: normal;
  overflow-wrap: normal; }
#compare-md td:first-child, #compare-md th:first-child { min-width: 11em; }
/* The architecture table keeps its columns readable on a phone: it scrolls sideways (Gradio's
   block hides overflow, hence !important). */
#architecture { overflow-x: auto !important; }
#architecture .js-plotly-plot { min-width: 880px; }
/* The override table's headers are fixed: renaming one would only change what it shows. */
#overrides thead th, #overrides thead th * { pointer-events: none; }
"""
# System fonts: no request to Google Fonts, so the page also loads offline.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)


def launch_kwargs() -> dict[str, Any]:
    """What `demo.launch` needs beyond host/port: theme and CSS (Gradio 6 takes them at launch),
    footer links, upload limit and the optional login (DSV3_AUTH)."""
    kw: dict[str, Any] = {
        "theme": THEME,
        "css": CSS,
        "footer_links": ["api", "gradio", "settings"],
        "max_file_size": settings.IMPORT_LIMIT,
    }
    if settings.AUTH:
        kw["auth"] = settings.AUTH
    return kw


class Page:
    """The page's components by name, and the event chains several parts share."""

    def __init__(self, demo: gr.Blocks):
        self.demo = demo
        self._steps = count()

    def quiet(self) -> dict[str, Any]:
        """Internal steps: hidden from the API, named so they never take a public name. A step
        triggered while its previous run is pending runs again after it (`always_last`; the
        default would drop it, and an estimate of an older form would stay on screen)."""
        return dict(
            show_progress="hidden",
            api_visibility="private",
            api_name=f"_step{next(self._steps)}",
            trigger_mode="always_last",
        )

    def config_changed(self, event: Any) -> None:
        """After the hub (or the form's error) changed: everything that reads them, again."""
        after = event.then(estimate.estimate, self.est_in, self.est_out, **self.quiet())
        after.then(estimate.speed, self.speed_in, self.speed_out, **self.quiet())
        after.then(
            inspect.params_view, [self.cfg, self.params_log], self.params_plot, **self.quiet()
        )
        event.then(*self.rot_step, **self.quiet())
        event.then(*self.arch_step, **self.quiet())
        event.then(*self.compare_step, **self.quiet())
        event.then(*self.model_status_step, **self.quiet())

    def config_loaded(self, event: Any, status: Any = None) -> None:
        """After a config was loaded into the hub: fill the form (fires no `.input`, so no
        half-filled form is validated), then refresh what reads the config."""
        filled = event.then(
            configure.fill_form,
            [self.cfg, status if status is not None else self.source_msg],
            [*self.form, self.overrides, self.cfg_msg, self.form_error],
            **self.quiet(),
        )
        self.config_changed(filled)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="DeepSeek-V3 MoE playground") as demo:
        page = Page(demo)
        page.session = gr.State(
            Session(), time_to_live=settings.SESSION_TTL_S, delete_callback=free_session
        )
        gr.Markdown(
            "# DeepSeek-V3 MoE playground\n"
            "Configure a DeepSeek-V3-style mixture-of-experts transformer (per layer), see what it "
            "costs before building it, build it, run it and look inside."
        )
        configure.render_bar(page)
        with gr.Row():
            with gr.Column(scale=3):
                configure.render(page)
            with gr.Column(scale=2):
                estimate.render(page)
        estimate.render_wide(page)
        compare.render(page)
        with gr.Row():
            with gr.Column():
                run.render_build(page)
            with gr.Column():
                run.render_run(page)
        inspect.render(page)
        files.render(page)

        inspect.wire(page)
        run.wire(page)
        estimate.wire(page)
        compare.wire(page)
        configure.wire(page)
        files.wire(page)
        demo.unload(on_unload)
    return demo


def on_unload(request: gr.Request) -> None:
    """Tab closed: free its model now (gr.State alone would hold it for an hour)."""
    release(getattr(request, "session_hash", None))
