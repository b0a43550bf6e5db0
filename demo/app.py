"""The Gradio app: baseline and reduced model side by side on one image (or short video) and question.

    from mmreduce.demo.app import ModelStore, build_app, run_demo
    store = ModelStore(default="tiny-llava-shapes")
    comparison = run_demo(store, "tiny-llava-shapes", "cat.png", "what color is the square ?", ["pdrop"])
    build_app(store).launch()          # or: mmreduce demo

`run_demo` is the whole comparison as a plain function (the UI only converts its errors into UI errors). The
UI can only load the models the store was given: bundled checkpoints and the `--model` path from the command
line, never a path or hub id typed in the browser, and never with remote code.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmreduce.adapters import get_adapter

from .charts import latency_chart, schedule_chart, tokens_chart
from .compare import MethodResult, prepare_inputs, run_comparison
from .inputs import LIMITS_TEXT, DemoInputError, check_question, load_media
from .methods import UI_METHODS, build_methods
from .overlay import draw_kept_tokens
from .summary import CARDS_CSS, cards_html

__all__ = [
    "Comparison",
    "DEFAULT_MODEL",
    "EXAMPLES_DIR",
    "VIDEO_MODEL",
    "ModelStore",
    "build_app",
    "examples",
    "launch",
    "preview_media",
    "preview_schedule",
    "run_demo",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-llava-shapes"
EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
# (file, question, bundled model it suits); the images come from the benchmarks the tiny models were trained on.
_EXAMPLES = (
    ("shapes-0.png", "what color is the square ?", "tiny-llava-shapes"),
    ("shapes-1.png", "what shape is the cyan object ?", "tiny-llava-shapes"),
    ("shapes-3.png", "how many yellow objects are there ?", "tiny-llava-shapes"),
    ("docs-0.png", "what digit is in the cyan box ?", "tiny-llava-next-docs"),
    ("docs-wide-2.png", "what digit is in the yellow box ?", "tiny-llava-next-docs"),
    ("docs-0.png", "what digit is in the cyan box ?", "tiny-internvl-docs"),
    # `video` test-split clips 0 and 1 (seed 0); tiny-llava-video answers both right at baseline ("left", "red").
    ("video-0.mp4", "which way does the blue cross move ?", "tiny-llava-video"),
    ("video-1.mp4", "what color does the triangle turn ?", "tiny-llava-video"),
)
#: The bundled model a video goes to when the chosen model was not trained on clips (and the store has it).
VIDEO_MODEL = "tiny-llava-video"
_LIMITS = {"warmup": (0, 3), "repeats": (1, 5), "max_new_tokens": (1, 32)}


# A path starting at "/" (or a drive letter) after a quote, space or bracket, e.g. '/srv/models/x/config.json'.
_ABSOLUTE_PATH = re.compile(r"""(^|[\s'"(=])((?:/|[A-Za-z]:\\)[^\s'"),]+)""")
_IMAGE_ONLY = ("tiny-llava-shapes", "tiny-llava-next-docs", "tiny-internvl-docs")


class ModelStore:
    """The models the app may load, by display name, each loaded once on first use (offline, no remote code)."""

    def __init__(self, default: str | os.PathLike = DEFAULT_MODEL, include_bundled: bool = True):
        from mmreduce.eval.tiny_models import CHECKPOINT_DIR, TINY_MODELS, resolve_checkpoint

        # Only the registered VLM recipes: other folders (a visual tokenizer's checkpoint) are not models the
        # comparison can run.
        self.paths: dict[str, Path] = {}
        if include_bundled:
            for name in TINY_MODELS:
                if (CHECKPOINT_DIR / name / "config.json").is_file():
                    self.paths[name] = CHECKPOINT_DIR / name
        self.default = str(default)
        if self.default not in self.paths:
            path = resolve_checkpoint(default)  # ValueError naming the bad --model
            # Shown by its folder name: the browser never sees a server path.
            self.default = path.name if path.name not in self.paths else f"{path.name} (--model)"
            self.paths[self.default] = path
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def scrub(self, message: str) -> str:
        """`message` with every server path replaced: a model's folder by the model's name, any other absolute
        path by its last part (what the browser may see)."""
        for name, path in sorted(self.paths.items(), key=lambda item: -len(str(item[1]))):
            message = message.replace(str(path), name)
        return _ABSOLUTE_PATH.sub(lambda match: match.group(1) + Path(match.group(2)).name, message)

    def model_for(self, name: str | None, kind: str) -> str:
        """The model a comparison runs on: `name`, except that a video goes to `VIDEO_MODEL` when `name` is an
        image-only bundled model (a model trained on single images answers clips with a colour)."""
        name = name or self.default
        if kind == "video" and name != VIDEO_MODEL and VIDEO_MODEL in self.paths and name in _IMAGE_ONLY:
            return VIDEO_MODEL
        return name

    def get(self, name: str | None):
        """(model, processor) for a name listed in `names`; DemoInputError for anything else."""
        name = name or self.default
        if name not in self.paths:
            raise DemoInputError(f"unknown model {name!r}; this demo serves {self.names}")
        with self._lock:
            if name not in self._loaded:
                from mmreduce.eval.tiny_models import load_tiny

                self._loaded[name] = load_tiny(self.paths[name])  # local files only; never trust_remote_code
            return self._loaded[name]


@dataclass
class Comparison:
    """Everything one comparison shows."""

    question: str
    kind: str
    results: list[MethodResult]
    model: str = ""
    overlays: list[tuple[Any, str]] = field(default_factory=list)
    overlay_note: str = ""

    def figures(self):
        curves = [(r.label, r.planned) for r in self.results if r.planned]
        return tokens_chart(self.results), latency_chart(self.results), schedule_chart(curves)

    def html(self) -> str:
        return cards_html(self.results, self.question)

    def to_dict(self) -> dict:
        return {"model": self.model, "question": self.question, "input": self.kind, "results": [r.to_dict() for r in self.results],
                "overlay_note": self.overlay_note}


def _bounded(name: str, value: Any) -> int:
    low, high = _LIMITS[name]
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a whole number in [{low}, {high}], got {value!r}") from None
    if number != value or not low <= number <= high:
        raise DemoInputError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return number


def run_demo(store: ModelStore, model_name: str | None, media: str | None, question: str | None,
             methods: list[str] | None, *, warmup: int = 1, repeats: int = 2, max_new_tokens: int = 4,
             **method_params: Any) -> Comparison:
    """Loads the input, builds the methods (`method_params`: see `build_methods`), runs the comparison and draws
    the kept tokens. Raises DemoInputError for any bad input, before the model runs."""
    if media is None or str(media).strip() == "":
        raise DemoInputError("no image given: upload an image (or a short video) or pick an example, "
                             "then ask the question")
    images, kind = load_media(media)
    text = check_question(question)
    settings = {name: _bounded(name, value) for name, value in
                (("warmup", warmup), ("repeats", repeats), ("max_new_tokens", max_new_tokens))}
    model_name = store.model_for(model_name, kind)
    model, processor = store.get(model_name)
    inputs = prepare_inputs(processor, images, text)
    adapter = get_adapter(model)
    vision_tokens = int(adapter.count_vision_tokens(inputs["input_ids"][:1])[0])
    choices = build_methods(methods, num_layers=adapter.num_layers, vision_tokens=vision_tokens, **method_params)
    results = run_comparison(model, processor, inputs, choices, **settings)
    comparison = Comparison(text, kind, results, model=model_name)
    positions = results[0].vision_positions  # where the text model saw them (placeholders expanded or not)
    for result in results[1:]:
        try:
            comparison.overlays += draw_kept_tokens(adapter, processor, inputs, positions,
                                                    result.kept_positions, result.label)
        except ValueError as error:  # an unknown packing: the numbers stay valid, only the picture is missing
            comparison.overlay_note = str(error)
    return comparison


def preview_media(media: str | None):
    """The first image of an upload (a video's first sampled frame) for the preview pane."""
    if media is None:
        return None
    images, _ = load_media(media)
    return images[0]


def preview_schedule(store: ModelStore, model_name: str | None, schedule_file: str | None):
    """The uploaded schedule as a curve, checked against the chosen model's depth."""
    if schedule_file is None:
        return None
    import mmreduce

    model, _ = store.get(model_name)
    try:
        schedule = mmreduce.Schedule(path=str(schedule_file))
        schedule.check_stages(get_adapter(model).num_layers)
    except ValueError as error:
        raise DemoInputError(f"schedule file {Path(str(schedule_file)).name!r}: {error}") from None
    full = schedule.keep[0]
    counts = [round(100 * value / full) for value in schedule.keep]  # as % so that count and fraction units agree
    return schedule_chart([(Path(str(schedule_file)).name, counts)], title="Uploaded schedule")


def examples(store: ModelStore) -> list[list[str]]:
    """[file, question, model] rows for the examples the store can serve."""
    rows = [[str(EXAMPLES_DIR / file), question, model] for file, question, model in _EXAMPLES
            if (EXAMPLES_DIR / file).is_file()]
    return [[file, question, model if model in store.paths else store.default] for file, question, model in rows]


def _ui_errors(function):
    """Shows DemoInputError as a UI error and any other failure as a short message (logged in full)."""
    import functools

    import gradio as gr

    @functools.wraps(function)
    def wrapper(*args):
        try:
            return function(*args)
        except DemoInputError as error:
            raise gr.Error(str(error), title="Input error") from None
        except Exception as error:  # the browser gets a sentence, the server log the traceback
            log.exception("demo request failed")
            raise gr.Error(f"{type(error).__name__}: {error}", title="Internal error") from None

    return wrapper


_INTRO = """# mmreduce: fewer vision tokens, side by side
Pick an image (or a short video), ask a question, choose methods. Each method runs after a warm-up; the baseline
is the unreduced model. {limits}"""


def build_app(store: ModelStore):
    """The Blocks UI; its API endpoints are `/compare`, `/preview_media` and `/preview_schedule`."""
    import gradio as gr

    with gr.Blocks(title="mmreduce demo", analytics_enabled=False) as app:
        gr.Markdown(_INTRO.format(limits=LIMITS_TEXT))
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(store.names, value=store.default, label="Model", elem_id="model")
                media = gr.File(label="Image or short video", type="filepath", elem_id="media")
                preview = gr.Image(label="Input", interactive=False, height=200, elem_id="preview")
                question = gr.Textbox(label="Question", placeholder="what color is the square ?", elem_id="question")
                methods = gr.CheckboxGroup(list(UI_METHODS), value=["fastv", "pdrop"], label="Methods",
                                           elem_id="methods")
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
                    schedule_file = gr.File(label="Schedule JSON (from `mmreduce tune`)", type="filepath",
                                            elem_id="schedule_file")
                    extra_specs = gr.Textbox("", lines=2, label="More methods: one SPEC per line",
                                             placeholder="fastv:layer=3,equivalent=0.3")
                with gr.Accordion("Timing", open=False):
                    warmup = gr.Slider(*_LIMITS["warmup"], 1, step=1, label="warm-up runs")
                    repeats = gr.Slider(*_LIMITS["repeats"], 2, step=1, label="timed runs (median)")
                    max_new_tokens = gr.Slider(*_LIMITS["max_new_tokens"], 4, step=1, label="max new tokens")
                run = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column(scale=2):
                cards = gr.HTML(elem_id="cards")
                with gr.Row():
                    tokens_plot = gr.Plot(label="Vision tokens per layer", elem_id="tokens_plot", min_width=200)
                    latency_plot = gr.Plot(label="Latency", elem_id="latency_plot", min_width=200)
                    schedule_plot = gr.Plot(label="Schedule", elem_id="schedule_plot", min_width=200)
                overlays = gr.Gallery(label="Kept tokens per drop stage (dark: dropped, grey: padding; "
                                            "green bars: newline tokens)", columns=3, height="auto",
                                      object_fit="contain", elem_id="overlays")
                with gr.Accordion("Raw numbers", open=False):
                    details = gr.JSON(elem_id="details")
        gr.Examples(examples(store), inputs=[media, question, model], label="Examples")

        params = [fastv_layer, fastv_keep, pdrop_layers, pdrop_keep, random_layer, random_keep, random_seed,
                  schedule_file, extra_specs]
        names = ["fastv_layer", "fastv_keep", "pdrop_layers", "pdrop_keep", "random_layer", "random_keep",
                 "random_seed", "schedule_file", "extra_specs"]

        @_ui_errors
        def compare(model_name, media_path, text, selected, warmup_n, repeats_n, new_tokens, *values):
            comparison = run_demo(store, model_name, media_path, text, selected, warmup=warmup_n,
                                  repeats=repeats_n, max_new_tokens=new_tokens, **dict(zip(names, values)))
            tokens, latency, schedule = comparison.figures()
            return comparison.html(), tokens, latency, schedule, comparison.overlays, comparison.to_dict()

        run.click(compare, [model, media, question, methods, warmup, repeats, max_new_tokens, *params],
                  [cards, tokens_plot, latency_plot, schedule_plot, overlays, details], api_name="compare")
        media.change(_ui_errors(preview_media), media, preview, api_name="preview_media")
        schedule_file.change(_ui_errors(lambda name, path: preview_schedule(store, name, path)),
                             [model, schedule_file], schedule_plot, api_name="preview_schedule")
    app.mmreduce_css = CARDS_CSS  # launch() takes the CSS in Gradio 6
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Starts the server with the demo's safe defaults (no share link, upload size capped, no SSR/MCP)."""
    from .inputs import MAX_VIDEO_BYTES

    return app.launch(server_name=host, server_port=port, share=False, css=getattr(app, "mmreduce_css", None),
                      max_file_size=MAX_VIDEO_BYTES, ssr_mode=False, mcp_server=False, **kwargs)
