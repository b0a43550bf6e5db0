"""The Blocks page and its API (`build_app` in app.py calls `build_ui`).

Page: examples with thumbnails at the top; the inputs on the left; on the right one column per method (answer,
numbers, kept tokens per drop stage) and, in tabs below, the charts and the raw JSON.

API (`gradio_client`): `/compare` takes `image`, `question`, `methods` and optional named parameters and returns
the comparison as JSON; `/preview_media` and `/preview_schedule` check an upload. Errors come back as messages
titled "Input error" (what to fix) or "Internal error" (logged in full on the server), never with a server path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .app import (
    _LIMITS,
    DEFAULT_MODEL,
    ModelStore,
    examples,
    preview_media,
    preview_schedule,
    run_demo,
)
from .compare import DEFAULT_REPEATS
from .inputs import LIMITS_TEXT, DemoInputError, load_media
from .methods import PLACEHOLDER_SPECS, UI_METHODS
from .summary import CARDS_CSS

__all__ = ["API_PARAMETERS", "build_ui"]

log = logging.getLogger(__name__)

#: `/compare`'s optional parameters and their defaults (image, question and methods come first and are required).
API_PARAMETERS: dict[str, Any] = dict(
    model=DEFAULT_MODEL, warmup=1, repeats=DEFAULT_REPEATS, max_new_tokens=4, fastv_layer=2, fastv_keep=0.25,
    pdrop_layers="", pdrop_keep=0.5, random_layer=2, random_keep=0.25, random_seed=0, schedule_file=None,
    extra_specs="",
)

_INTRO = """# mmreduce: fewer vision tokens, side by side
Pick an example (or upload an image or a short video), ask a question, choose methods, press **Compare**. Every
method runs after a warm-up, its timed runs interleaved with the others'; the baseline is the unreduced model.
{limits}"""


def _messages(store: ModelStore, error: Exception) -> tuple[str, str]:
    """(title, message) of a failure as the browser may see it."""
    if isinstance(error, DemoInputError):
        return "Input error", store.scrub(str(error))
    log.exception("demo request failed")  # the server log gets the traceback
    return "Internal error", store.scrub(f"{type(error).__name__}: {error}")


def _raising(store: ModelStore, function):
    """For API endpoints: any failure becomes a gr.Error titled by its kind."""
    import gradio as gr

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            title, message = _messages(store, error)
            raise gr.Error(message, title=title) from None

    return wrapper


def build_ui(store: ModelStore):
    import gradio as gr

    rows = examples(store)
    thumbnails = [(load_media(file)[0][0], f"{model}: {question}") for file, question, model in rows]
    with gr.Blocks(title="mmreduce demo", analytics_enabled=False) as app:
        gr.Markdown(_INTRO.format(limits=LIMITS_TEXT))
        gallery = gr.Gallery(thumbnails, label="Examples: click one to load it (videos go to tiny-llava-video)",
                             columns=len(thumbnails), rows=1, height=190, allow_preview=False, object_fit="contain",
                             elem_id="examples")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(store.names, value=store.default, label="Model", elem_id="model")
                media = gr.File(label="Image or short video", type="filepath", elem_id="media")
                preview = gr.Image(label="Input", interactive=False, height=200, elem_id="preview")
                question = gr.Textbox(label="Question", placeholder="what color is the square ?", elem_id="question")
                methods = gr.CheckboxGroup(list(UI_METHODS), value=["fastv", "pdrop"], label="Methods (ticked: "
                                           "own controls below, or the method's defaults)", elem_id="methods")
                with gr.Accordion("Method parameters", open=False):
                    with gr.Row():
                        fastv_layer = gr.Number(2, precision=0, label="fastv layer K")
                        fastv_keep = gr.Slider(0.01, 1.0, 0.25, step=0.01, label="fastv keep ratio")
                    with gr.Row():
                        pdrop_layers = gr.Textbox("", label="pdrop layers (e.g. 2,4,6; empty = default)")
                        pdrop_keep = gr.Slider(0.01, 1.0, 0.5, step=0.01, label="pdrop keep ratio λ")
                    with gr.Row():
                        random_layer = gr.Number(2, precision=0, label="random layer")
                        random_keep = gr.Slider(0.01, 1.0, 0.25, step=0.01, label="random keep ratio")
                        random_seed = gr.Number(0, precision=0, label="random seed")
                    schedule_file = gr.File(label="Tuned schedule JSON (from `mmreduce tune`; tick `schedule`)",
                                            type="filepath", elem_id="schedule_file")
                    schedule_plot = gr.Plot(label="Uploaded schedule", elem_id="schedule_plot")
                extra_specs = gr.Textbox("", lines=2, label="More methods: one SPEC per line (`A then B` composes)",
                                         placeholder=PLACEHOLDER_SPECS, elem_id="extra_specs")
                with gr.Accordion("Timing", open=False):
                    warmup = gr.Slider(*_LIMITS["warmup"], 1, step=1, label="warm-up runs")
                    repeats = gr.Slider(*_LIMITS["repeats"], DEFAULT_REPEATS, step=1,
                                        label="timed runs (median and IQR)")
                    max_new_tokens = gr.Slider(*_LIMITS["max_new_tokens"], 4, step=1, label="max new tokens")
                run = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column(scale=3):
                cards = gr.HTML(elem_id="cards")
                with gr.Tabs():
                    with gr.Tab("Vision tokens per layer"):
                        tokens_plot = gr.Plot(show_label=False, elem_id="tokens_plot")
                    with gr.Tab("Latency"):
                        latency_plot = gr.Plot(show_label=False, elem_id="latency_plot")
                    with gr.Tab("Raw numbers (JSON)"):
                        details = gr.JSON(label="results", elem_id="details")
        api_results = gr.JSON(label="results", visible=False)
        api_trigger = gr.Button(visible=False)

        inputs = [media, question, methods, model, warmup, repeats, max_new_tokens, fastv_layer, fastv_keep,
                  pdrop_layers, pdrop_keep, random_layer, random_keep, random_seed, schedule_file, extra_specs]

        def compare_json(image, question, methods, model=DEFAULT_MODEL, warmup=1, repeats=DEFAULT_REPEATS,
                         max_new_tokens=4, fastv_layer=2, fastv_keep=0.25, pdrop_layers="", pdrop_keep=0.5,
                         random_layer=2, random_keep=0.25, random_seed=0, schedule_file=None, extra_specs=""):
            """Baseline and `methods` on one image or short video: answers, vision tokens per layer, FLOPs and
            latency (median and IQR of the timed runs) per method, as JSON."""
            return run_demo(store, model, image, question, methods, warmup=warmup, repeats=repeats,
                            max_new_tokens=max_new_tokens, fastv_layer=fastv_layer, fastv_keep=fastv_keep,
                            pdrop_layers=pdrop_layers, pdrop_keep=pdrop_keep, random_layer=random_layer,
                            random_keep=random_keep, random_seed=random_seed, schedule_file=schedule_file,
                            extra_specs=extra_specs).to_dict()

        def compare_page(*values, progress=gr.Progress()):
            try:
                comparison = run_demo(store, values[3], *values[:3], **dict(zip(list(API_PARAMETERS)[1:], values[4:])),
                                      progress=lambda fraction, message: progress(fraction, desc=message))
            except Exception as error:
                title, message = _messages(store, error)
                # The kind leads the message too: Gradio's toast header shows its level ("Warning", "Error").
                if title == "Internal error":
                    raise gr.Error(f"{title}: {message}", title=title) from None
                gr.Warning(f"{title}: {message}", title=title)  # a toast; the previous results stay as they were
                return [gr.skip()] * 4
            tokens, latency = comparison.figures()
            return comparison.html(), tokens, latency, comparison.to_dict()

        def preview_page(path):
            try:
                return preview_media(path), gr.skip()
            except DemoInputError as error:
                gr.Warning(f"Input error: {store.scrub(str(error))}", title="Input error")
                return None, None  # the upload is cleared, so Compare does not report it a second time

        def load_example(event: gr.SelectData):
            file, text, name = rows[event.index]
            return file, text, name

        # Gradio passes the selection by the parameter's type; this module's annotations are strings.
        load_example.__annotations__ = {"event": gr.SelectData}

        run.click(compare_page, inputs, [cards, tokens_plot, latency_plot, details], api_visibility="private",
                  show_progress="full", show_progress_on=[cards])
        api_trigger.click(_raising(store, compare_json), inputs, api_results, api_name="compare")
        gallery.select(load_example, None, [media, question, model], api_visibility="private")
        media.change(preview_page, media, [preview, media], api_visibility="private")
        api_preview = gr.Button(visible=False)
        api_preview.click(_raising(store, preview_media), media, preview, api_name="preview_media")
        schedule_file.change(_raising(store, lambda name, path: preview_schedule(store, name, path)),
                             [model, schedule_file], schedule_plot, api_name="preview_schedule")
    app.mmreduce_css = CARDS_CSS  # launch() takes the CSS in Gradio 6
    return app
