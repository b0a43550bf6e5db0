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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmreduce.adapters import get_adapter

from .charts import latency_chart, schedule_chart, tokens_chart
from .compare import DEFAULT_REPEATS, MethodResult, prepare_inputs, run_comparison
from .inputs import DemoInputError, check_question, load_media
from .methods import build_methods
from .overlay import draw_kept_tokens
from .summary import cards_html, latency_notes

__all__ = [
    "DEFAULT_MODEL",
    "EXAMPLES_DIR",
    "VIDEO_MODEL",
    "Comparison",
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
_LIMITS = {"warmup": (0, 3), "repeats": (1, 20), "max_new_tokens": (1, 32)}


# A path starting at "/" (or a drive letter) after a quote, space or bracket, e.g. a model folder's config.json.
_ABSOLUTE_PATH = re.compile(r"""(^|[\s'"(=])((?:/|[A-Za-z]:\\)[^\s'"),]+)""")
_IMAGE_ONLY = ("tiny-llava-shapes", "tiny-llava-next-docs", "tiny-internvl-docs")


class ModelStore:
    """The models the app may load, by display name, each loaded once on first use (offline, no remote code)."""

    def __init__(self, default: str | os.PathLike = DEFAULT_MODEL, include_bundled: bool = True):
        from mmreduce.eval.tiny_models import CHECKPOINT_DIR, TINY_MODELS, recipe_name, resolve_checkpoint

        # Only checkpoints of the registered VLM recipes (earlier versions included, after the current ones): other
        # folders (a visual tokenizer's checkpoint) are not models the comparison can run.
        self.paths: dict[str, Path] = {}
        if include_bundled:
            folders = [CHECKPOINT_DIR / name for name in TINY_MODELS]
            if CHECKPOINT_DIR.is_dir():
                folders += sorted(f for f in CHECKPOINT_DIR.iterdir() if f.name not in TINY_MODELS and recipe_name(f))
            for folder in folders:
                if (folder / "config.json").is_file():
                    self.paths[folder.name] = folder
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
        from mmreduce.eval.tiny_models import recipe_name

        if kind == "video" and VIDEO_MODEL in self.paths and recipe_name(name) in _IMAGE_ONLY:
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
        """(vision tokens per layer, latency) charts. The planned schedule is not drawn again: the measured
        counts per layer are the same curve."""
        return tokens_chart(self.results), latency_chart(self.results)

    @property
    def notes(self) -> list[str]:
        return latency_notes(self.results)

    def overlays_by_label(self) -> dict[str, list[tuple[Any, str]]]:
        grouped: dict[str, list[tuple[Any, str]]] = {}
        for picture, caption in self.overlays:
            label = next((r.label for r in self.results if caption.startswith(f"{r.label}: ")), "")
            grouped.setdefault(label, []).append((picture, caption))
        return grouped

    def html(self) -> str:
        heading = f"{self.question}  ·  {self.model}, {self.kind}" if self.model else self.question
        return cards_html(self.results, heading, self.overlays_by_label(), self.notes, self.overlay_note)

    def to_dict(self) -> dict:
        return {"model": self.model, "question": self.question, "input": self.kind,
                "results": [r.to_dict() for r in self.results], "notes": self.notes,
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
             methods: list[str] | None, *, warmup: int = 1, repeats: int = DEFAULT_REPEATS, max_new_tokens: int = 4,
             progress: Callable[[float, str], None] | None = None, **method_params: Any) -> Comparison:
    """Loads the input, builds the methods (`method_params`: see `build_methods`), runs the comparison and draws
    the kept tokens; `progress(fraction, message)` hears what runs. Raises DemoInputError for any bad input
    (before the model runs, or when a method refuses this input)."""
    if media is None or str(media).strip() == "":
        raise DemoInputError("no image given: upload an image (or a short video) or pick an example, "
                             "then ask the question")
    images, kind = load_media(media)
    text = check_question(question)
    settings = {name: _bounded(name, value) for name, value in
                (("warmup", warmup), ("repeats", repeats), ("max_new_tokens", max_new_tokens))}
    model_name = store.model_for(model_name, kind)
    if progress is not None:
        progress(0.0, f"loading {model_name}")
    model, processor = store.get(model_name)
    inputs = prepare_inputs(processor, images, text)
    adapter = get_adapter(model)
    vision_tokens = int(adapter.count_vision_tokens(inputs["input_ids"][:1])[0])
    choices = build_methods(methods, num_layers=adapter.num_layers, vision_tokens=vision_tokens, **method_params)
    results = run_comparison(model, processor, inputs, choices, progress=progress, **settings)
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


def build_app(store: ModelStore):
    """The Blocks UI (`ui.build_ui`); its API endpoints are `/compare`, `/preview_media` and `/preview_schedule`."""
    from .ui import build_ui

    return build_ui(store)


def launch(app, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Starts the server with the demo's safe defaults (no share link, upload size capped, no SSR/MCP)."""
    from .inputs import MAX_VIDEO_BYTES

    return app.launch(server_name=host, server_port=port, share=False, css=getattr(app, "mmreduce_css", None),
                      max_file_size=MAX_VIDEO_BYTES, ssr_mode=False, mcp_server=False, **kwargs)
