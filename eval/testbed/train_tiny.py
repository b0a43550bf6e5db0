"""Train a bundled tiny VLM on its synthetic benchmark, on the CPU, reproducibly.

    python -m mmreduce.eval.testbed.train_tiny tiny-llava-shapes --steps 1200 --batch-size 16 --seed 0 \
        --out eval/checkpoints/tiny-llava-shapes
    mmreduce train-tiny ...        # the same, once the lead wires `add_subparser` into the console script

Batches are drawn from the benchmark's `train` split by index (step s uses indices s*B .. s*B+B-1), so a run is
a pure function of its arguments and never sees a sample twice. The loss is cross-entropy on the answer word and
`</s>`, plus an auxiliary per-patch loss: a throw-away linear head on the projector output predicts, for every
vision token, what the generator drew under it (colour and shape for `shapes`; mark colour, digit or line for
`docs`). The dense target teaches the tiny CLIP tower from scratch in minutes and keeps each object's
information in its own tokens, which is exactly what makes token selection matter. The head is not saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .extra_questions import extra_questions
from .grounding import GroundingProbe, object_boxes, target_positions
from ..accuracy import evaluate
from ..benchmarks import load_benchmark
from ..benchmarks.draw import COLORS, SHAPES, draw_shape
from ..tiny_models import CHECKPOINT_DIR, TINY_MODELS, TinyVLMConfig, build_tiny, format_prompt, load_tiny, prompt_for, save_tiny

__all__ = ["TrainConfig", "add_subparser", "finishing_stage", "main", "patch_labels", "train"]

_COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # 0 = background
_SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}


def _class_layout(benchmark: str) -> tuple[int, int, int]:
    """(packing base, colour classes, shape / digit classes) of the per-patch ids (see `_label_map`): ids pack
    (colour, shape) as colour * 8 + shape on `shapes` and (mark colour, digit) as colour * 16 + digit on `docs`;
    both class counts include "none"."""
    if benchmark == "shapes":
        return 8, 1 + len(COLORS), 1 + len(SHAPES)
    return 16, 1 + len(COLORS), 1 + 10


@dataclass
class TrainConfig:
    """Training run settings (all of them go into the log and `train_config.json`)."""

    model: str = "tiny-llava-shapes"
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup: int = 60
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    extra_questions: int = 4
    grounding_layers: tuple[int, ...] = ()
    qtypes: tuple[str, ...] = ()
    grounding_weight: float = 1.0
    value_aux_weight: float = 0.0
    deep_layers: tuple[int, ...] = ()
    question_aux_layer: int = 0
    match_layer: int = 0
    tie_qk_init: bool = False
    question_grounding_layers: tuple[int, ...] = ()
    curriculum: tuple[tuple[int, int], ...] = ()
    grounding_heads: int = 0
    position_aux: bool = False
    grounding_contrast: bool = False
    question_first: bool = False
    relevance_layer: int = 0
    copy_layer: int = 0
    copy_roles: bool = False
    vision_steps: int = 0
    vision_batch_size: int = 32
    seed: int = 0
    eval_every: int = 200
    eval_samples: int = 100
    threads: int = 1  # one thread: on the shared 2 cores two threads stall on each other (measured 1.8x slower)
    max_minutes: float = 0.0
    stop_at: int = 0
    init_from: str = ""
    data_offset: int = 0
    out: str = ""

    def __post_init__(self) -> None:
        if self.model not in TINY_MODELS:
            raise ValueError(f"model must be one of {sorted(TINY_MODELS)}, got {self.model!r}")
        for name in ("steps", "batch_size", "threads", "eval_samples", "vision_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("warmup", "eval_every", "aux_weight", "max_minutes", "stop_at", "data_offset", "extra_questions",
                     "vision_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        self.grounding_layers = tuple(int(i) for i in self.grounding_layers)
        self.deep_layers = tuple(int(i) for i in self.deep_layers)
        self.question_grounding_layers = tuple(int(i) for i in self.question_grounding_layers)
        self.curriculum = tuple((int(a), int(b)) for a, b in self.curriculum)
        starts = [a for a, _ in self.curriculum]
        if self.curriculum and (starts != sorted(starts) or starts[0] != 0 or min(b for _, b in self.curriculum) < 1):
            raise ValueError(f"curriculum must be (start_step, max_objects) pairs with increasing steps from 0 and "
                             f"max_objects >= 1, got {self.curriculum!r}")
        if any(i < 0 for i in self.question_grounding_layers):
            raise ValueError(f"question_grounding_layers must be >= 0, got {self.question_grounding_layers!r}")
        if self.value_aux_weight < 0 or (self.value_aux_weight and not self.grounding_layers):
            raise ValueError(f"value_aux_weight must be >= 0 and needs grounding_layers (its layers), got "
                             f"{self.value_aux_weight!r} with grounding_layers={self.grounding_layers!r}")
        if self.grounding_contrast and not self.grounding_layers:
            raise ValueError("grounding_contrast needs grounding_layers")
        if self.grounding_heads < 0:
            raise ValueError(f"grounding_heads must be >= 0 (0 = all heads), got {self.grounding_heads!r}")
        if self.question_first and self.extra_questions:
            raise ValueError("question_first needs extra_questions=0: the image tokens can only read the question "
                             "before them, so later turns would ask about an image conditioned on another question")
        if self.relevance_layer < 0 or self.copy_layer < 0:
            raise ValueError(f"relevance_layer and copy_layer must be >= 0 (0 = off), got {self.relevance_layer!r}, "
                             f"{self.copy_layer!r}")
        if self.copy_roles and self.copy_layer < 2:
            raise ValueError(f"copy_roles needs copy_layer >= 2 (the question's colour words learn their role one "
                             f"layer below it), got copy_layer={self.copy_layer!r}")
        if (self.relevance_layer or self.copy_layer) and not self.question_first:
            raise ValueError("relevance_layer and copy_layer need question_first: with the image first its tokens "
                             "cannot see the question")
        if self.match_layer < 0:
            raise ValueError(f"match_layer must be >= 0 (0 = off), got {self.match_layer!r}")
        if self.question_aux_layer < 0:
            raise ValueError(f"question_aux_layer must be >= 0 (0 = off), got {self.question_aux_layer!r}")
        if any(i < 1 for i in self.deep_layers):
            raise ValueError(f"deep_layers must be >= 1 (outputs of decoder layers), got {self.deep_layers!r}")
        if any(i < 0 for i in self.grounding_layers) or self.grounding_weight < 0:
            raise ValueError(f"grounding_layers must be >= 0 and grounding_weight >= 0, got "
                             f"{self.grounding_layers!r}, {self.grounding_weight!r}")
        if not self.out:
            self.out = str(CHECKPOINT_DIR / self.model)


def _label_map(sample, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel class ids, (H, W) int64, of what the generator drew (see `patch_labels`)."""
    width, height = size
    meta = sample.meta
    if meta["benchmark"] == "shapes":
        # Two label planes packed in one id: colour * 8 + shape (ids < 8).
        canvas = Image.new("I", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for o in meta["objects"]:
            draw_shape(draw, o["shape"], o["cx"], o["cy"], o["radius"], _COLOR_IDS[o["color"]] * 8 + _SHAPE_IDS[o["shape"]])
        return np.asarray(canvas, dtype=np.int64)
    # Two label planes packed in one id: box colour * 16 + digit (1-10; 0 = none). Text lines stay background.
    canvas = np.zeros((height, width), dtype=np.int64)
    for f in meta["fields"]:
        x0, y0, x1, y1 = f["box"]
        canvas[y0:y1 + 1, x0:x1 + 1] = _COLOR_IDS[f["color"]] * 16  # the coloured box
        canvas[y0 + 2:y1 - 1, x0 + 2:x1 - 1] += 1 + int(f["digit"])  # the digit inside its 2 px margin
    return canvas


def patch_labels(label_map: np.ndarray, patch: int, min_pixels: int) -> np.ndarray:
    """Most frequent non-background id per `patch` x `patch` cell if it covers >= `min_pixels`, else 0.

    label_map: (H, W) ids -> (H / patch, W / patch) ids.
    """
    h, w = label_map.shape
    cells = label_map.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)  # (gh, gw, p, p)
    cells = cells.reshape(h // patch, w // patch, patch * patch)  # (gh, gw, p*p)
    counts = (cells[..., None] == np.arange(int(label_map.max()) + 1)).sum(2)  # (gh, gw, ids)
    counts[..., 0] = 0  # background never wins
    best = counts.argmax(-1)  # (gh, gw); ties go to the smallest id
    return np.where(np.take_along_axis(counts, best[..., None], -1)[..., 0] >= max(1, min_pixels), best, 0)


def _planes(label_map: np.ndarray, base: int, patch: int) -> np.ndarray:
    """Patch labels of each packed plane (id = high * base + low) separately, packed again."""
    high = patch_labels(label_map // base, patch, min_pixels=6)
    low = patch_labels(label_map % base, patch, min_pixels=6)
    return high * base + low


def _aux_targets(samples, recipe: TinyVLMConfig, image_sizes) -> torch.Tensor:
    """Per-vision-token targets in the projector's output order; -100 where there is no target.

    llava: (B, N) for N = (image_size / patch)^2. llava_next: (sum of crops, n) with the base image first
    per sample (ignored: it is a down-scaled view) and then the grid crops in row-major order.
    """
    p, side = recipe.patch_size, recipe.image_size
    rows = []
    for k, s in enumerate(samples):
        if recipe.arch == "llava":
            rows.append(patch_labels(_label_map(s, (side, side)), p, min_pixels=6).reshape(-1))
            continue
        width, height = s.image.size
        grid = _planes(_label_map(s, (width, height)), 16, p)  # (H/p, W/p)
        rows.append(np.full(grid.shape[0] * 0 + (side // p) ** 2, -100))  # base image
        per = side // p
        for r in range(height // side):
            for c in range(width // side):
                rows.append(grid[r * per:(r + 1) * per, c * per:(c + 1) * per].reshape(-1))  # (per*per,)
        # Pinpoints larger than the page would add padded crops; configs keep pages equal to a pinpoint.
        expected = 1 + (height // side) * (width // side)
        if image_sizes is not None and tuple(image_sizes[k].tolist()) != (height, width):
            raise RuntimeError(f"processor resized a {width}x{height} page; pages must equal a pinpoint")
        del expected
    return torch.from_numpy(np.stack(rows))


def _sequence_targets(samples, recipe: TinyVLMConfig) -> list[torch.Tensor]:
    """Per sample, the per-patch ids of `_aux_targets` in the order of the image tokens in the prompt; (n_b,).

    llava: the grid in row-major order. llava_next (page equal to a pinpoint, no unpadding): the base view
    (-100, a down-scaled copy), then the full-resolution grid row by row, each row followed by its newline (-100).
    """
    p, side = recipe.patch_size, recipe.image_size
    out = []
    for s in samples:
        if recipe.arch == "llava":
            out.append(torch.from_numpy(patch_labels(_label_map(s, (side, side)), p, min_pixels=6).reshape(-1)))
            continue
        width, height = s.image.size
        grid = _planes(_label_map(s, (width, height)), 16, p)  # (H/p, W/p)
        newline = np.full((grid.shape[0], 1), -100)
        rows = np.concatenate([grid, newline], axis=1).reshape(-1)  # (H/p * (W/p + 1),)
        out.append(torch.from_numpy(np.concatenate([np.full((side // p) ** 2, -100), rows])))
    return out


def _asked(sample, benchmark: str) -> tuple[list[int], list[int]]:
    """Class ids (as in `_label_map`'s two planes) of the colours and of the shapes / digits the question names."""
    words = sample.question.split()
    colours = [_COLOR_IDS[w] for w in words if w in _COLOR_IDS]
    if benchmark == "shapes":
        return colours, [_SHAPE_IDS[w] for w in words if w in _SHAPE_IDS]
    return colours, [1 + int(w) for w in words if w.isdigit()]


def _match_loss(head: torch.nn.Linear, vision: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
                named: torch.Tensor, benchmark: str) -> torch.Tensor:
    """One attribute read-out shared by the image tokens and the answer position, at one layer's attention input.

    vision: (M, D) normalised image-token states with (M,) packed per-patch ids (-100 = none); query: (B, D) the
    answer position's; named: (B, C) multi-hot of the classes each question names (`_named_classes`). Sharing the
    head puts "square" in the same directions on the square's token and on a question about the square, which is
    what a query-key match needs (with `tie_qk_init`, the keys start as the queries).
    """
    loss = _aux_loss(head, vision, targets, benchmark)  # the image tokens' own classes
    guess = head(query)[:, :named.shape[1]]  # (B, C)
    return loss + torch.nn.functional.binary_cross_entropy_with_logits(guess, named) * named.shape[1] / 2


def _aux_loss(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, benchmark: str,
              grid: int = 0) -> torch.Tensor:
    """features: (..., N, D) projector output; targets: (..., N) ids.

    With `grid` > 0 (LLaVA-1.5, N = grid * grid in row-major order) the head also predicts every token's row and
    column, so that the tokens carry where they are (the `position` questions compare two objects' places).
    """
    logits = head(features)  # (..., N, C)
    base, n_col, n_other = _class_layout(benchmark)
    colour = torch.where(targets >= 0, targets // base, -100)
    other = torch.where(targets >= 0, targets % base, -100)
    ce = torch.nn.functional.cross_entropy
    loss = (ce(logits[..., :n_col].flatten(0, -2), colour.flatten(), ignore_index=-100)
            + ce(logits[..., n_col:n_col + n_other].flatten(0, -2), other.flatten(), ignore_index=-100))
    if grid:
        cells = torch.arange(grid * grid)
        where = logits[..., n_col + n_other:].flatten(0, -2)  # (B*N, 2 * grid)
        rows, cols = (cells // grid).repeat(features.shape[0]), (cells % grid).repeat(features.shape[0])
        loss = loss + ce(where[:, :grid], rows) + ce(where[:, grid:], cols)
    return loss


def _names_a_reference(sample) -> bool:
    """Whether the question names a reference object after the asked one: `position` ("where is the A object
    relative to the B object ?"), whose second target box and second colour word are the reference's."""
    return sample.meta.get("qtype") == "position"


def _relevance_targets(sample, n_vision: int, config) -> torch.Tensor:
    """Per image token, its role for the question: 0 none, 1 under an asked object, 2 under the reference object
    of a `position` question ("relative to the X object"); (n_vision,) long, in the prompt's image-token order.

    With the question before the image, every image token can work out its own role from the question and its own
    content (a local test), so the answer position only has to find the tokens that flagged themselves. Boxes are
    `meta["target_boxes"]` in the generator's order (for `position`, the asked object first).
    """
    roles = torch.zeros(n_vision, dtype=torch.long)
    reference = 1 if _names_a_reference(sample) else None
    for i, box in enumerate(sample.meta["target_boxes"]):
        one = replace(sample, meta={**sample.meta, "target_boxes": [box]})
        roles[target_positions(one, torch.arange(n_vision), config)] = 2 if i == reference else 1
    return roles


def _named_classes(samples, benchmark: str, by_role: bool = False) -> torch.Tensor:
    """(B, C) multi-hot of the colour and shape / digit classes each question names (`_aux_loss`'s class layout).

    by_role: (B, 2C), the classes named for the asked object, then those named for the reference object of a
    `position` question ("where is the A object relative to the B object ?": A asked, B reference). Without the
    split both colours of a `position` question land in one multi-hot, and an image token cannot tell from it
    whether it is the asked object or the reference (measured: a linear probe told the two roles apart for 76% of
    the tokens, and `position` answers had the right axis but a chance sign).
    """
    _, n_col, n_other = _class_layout(benchmark)
    width = n_col + n_other
    wanted = torch.zeros(len(samples), 2 * width if by_role else width)
    for b, sample in enumerate(samples):
        colours, others = _asked(sample, benchmark)
        if by_role and _names_a_reference(sample):
            asked, reference = colours  # the question names exactly two colours, the asked one first
            wanted[b, width + reference] = 1.0
            colours = [asked]
        wanted[b, colours] = 1.0
        wanted[b, [n_col + o for o in others]] = 1.0
    return wanted


def _colour_word_roles(samples, ids: torch.Tensor, colour_ids: torch.Tensor, colon_at: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's colour words and their roles: ((B, T) bool mask, (n_words,) long with 0 = names the asked
    object, 1 = names the reference of a `position` question, its second colour word), in row-major order."""
    words = torch.isin(ids, colour_ids) & (torch.arange(ids.shape[1])[None] < colon_at[:, None])  # (B, T)
    roles = []
    for b, sample in enumerate(samples):
        n = int(words[b].sum())
        role = torch.zeros(n, dtype=torch.long)
        if _names_a_reference(sample):
            if n != 2:
                raise RuntimeError(f"a position question names two colours, found {n} in {sample.question!r}")
            role[1] = 1
        roles.append(role)
    return words, torch.cat(roles)


def _patch_loss(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, benchmark: str, grid: int,
                object_focus: bool) -> torch.Tensor:
    """`_aux_loss`, plus (with `object_focus`) the same loss over the object tokens alone.

    Objects cover ~5% of the tokens, so in the plain mean the easy background dominates; a shape, unlike a colour,
    is not readable from one patch and is learnt only when the object tokens carry their own weight.
    """
    loss = _aux_loss(head, features, targets, benchmark, grid)
    if object_focus:
        on_object = targets > 0  # (..., N)
        if on_object.any():
            loss = loss + _aux_loss(head, features[on_object], targets[on_object], benchmark)
    return loss


def _patch_accuracy(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor, benchmark: str
                    ) -> tuple[float, float]:
    """Per-patch accuracy on object tokens of the colour plane and of the shape / digit plane."""
    on_object = targets > 0
    base, n_col, n_other = _class_layout(benchmark)
    with torch.no_grad():
        logits = head(features[on_object])  # (M, C)
        wanted = targets[on_object]
        colour = (logits[:, :n_col].argmax(-1) == wanted // base).float().mean().item()
        other = (logits[:, n_col:n_col + n_other].argmax(-1) == wanted % base).float().mean().item()
    return colour, other


def _vision_warmup(cfg: TrainConfig, recipe: TinyVLMConfig, model, processor, head, captured: dict, options: dict,
                   log: logging.Logger) -> None:
    """Train the vision tower, projector and per-patch head alone (no language model) for `cfg.vision_steps` steps.

    An image-only step costs a fraction of a full one, and what the language model later needs first, every
    object's colour and shape in its own tokens, is exactly what the per-patch targets teach. Images come from the
    train split far past the range the language steps use (index 5,000,000 on), so the two stages never share one.
    """
    from tqdm.auto import tqdm

    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *head.parameters()]
    optim = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    warm = TrainConfig(model=cfg.model, steps=cfg.vision_steps, lr=cfg.lr, warmup=min(cfg.warmup, cfg.vision_steps))
    bar = tqdm(range(cfg.vision_steps), desc=f"vision {cfg.model}", dynamic_ncols=True)
    for step in bar:
        samples = load_benchmark(recipe.benchmark, "train", cfg.vision_batch_size, seed=cfg.seed,
                                 start=5_000_000 + step * cfg.vision_batch_size, **options)
        inputs = processor.image_processor([s.image for s in samples], return_tensors="pt")
        sizes = inputs.get("image_sizes")
        if recipe.arch == "llava":
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=sizes)
        features, targets = captured.pop("f"), _aux_targets(samples, recipe, sizes)
        loss = _patch_loss(head, features, targets, recipe.benchmark, 0, object_focus=True)
        _optimizer_step(optim, params, loss, _lr_at(step, warm))
        colour, other = _patch_accuracy(head, features, targets, recipe.benchmark)
        bar.set_postfix(loss=f"{loss.item():.3f}", colour=f"{colour:.2f}", shape=f"{other:.2f}")
        log.info("vision step %d patch_loss %.4f object_colour_acc %.3f object_shape_acc %.3f lr %.2e", step,
                 loss.item(), colour, other, _lr_at(step, warm))


def _question_first(processor) -> bool:
    """Whether a checkpoint's own prompt puts the question before the image."""
    return not prompt_for(processor, "?").startswith("USER: <image>")


def _dialogue(sample, cfg: TrainConfig, step: int) -> str:
    """The sample's own question first (the test format), then extra turns about the same image."""
    text = f"{format_prompt(sample.question, question_first=cfg.question_first)} {sample.answer}</s>"
    for question, answer in extra_questions(sample, cfg.extra_questions, cfg.seed):
        text += f"USER: {question} ASSISTANT: {answer}</s>"
    return text


def _other_objects(sample, vision_positions: torch.Tensor, config, targets: torch.Tensor) -> torch.Tensor:
    """Positions of the image tokens under objects that are not the asked ones (distractors); (k,) long."""
    from dataclasses import replace

    everything = target_positions(replace(sample, meta={**sample.meta, "target_boxes": object_boxes(sample)}),
                                  vision_positions, config)
    return everything[~torch.isin(everything, targets)]


def _crowding(cfg: TrainConfig, recipe: TinyVLMConfig, step: int) -> dict:
    """Generator options of the object-count curriculum at `step` (none once it is over or when there is none).

    Few objects first: with one or two objects the answer can be read before the model has learnt to pick the asked
    object among many, and that read-out is what later teaches the picking.
    """
    current = [most for start, most in cfg.curriculum if start <= step]
    if not current:
        return {}
    if recipe.benchmark == "shapes":
        return {"min_objects": 1, "max_objects": min(8, current[-1])}
    return {"min_fields": 2, "max_fields": min(6, max(2, current[-1]))}


def _optimizer_step(optim: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1."""
    for group in optim.param_groups:
        group["lr"] = lr
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 5%


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.model` from scratch, save it to `cfg.out`, return a summary (accuracies, wall time)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("mmreduce.train_tiny")
    log.setLevel(logging.INFO)
    # A second stage (init_from) appends to the first stage's log instead of replacing it.
    log.handlers = [logging.FileHandler(out.parent / f"{out.name}.train.log", mode="a" if cfg.init_from else "w")]
    log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.info("config %s", json.dumps(asdict(cfg)))

    recipe = TINY_MODELS[cfg.model]
    layer_options = dict(grounding_layers=cfg.grounding_layers, deep_layers=cfg.deep_layers,
                         question_grounding_layers=cfg.question_grounding_layers,
                         question_aux_layer=(cfg.question_aux_layer,), match_layer=(cfg.match_layer,),
                         relevance_layer=(cfg.relevance_layer,), copy_layer=(cfg.copy_layer,))
    for name, layers in layer_options.items():
        if any(i >= recipe.text_layers for i in layers):
            raise ValueError(f"{name}={layers!r} names a layer past the last of {cfg.model}'s {recipe.text_layers}")
    if cfg.question_first:
        recipe = replace(recipe, question_first=True)
    model, processor = build_tiny(recipe, seed=cfg.seed)
    if cfg.init_from:  # a second stage: same architecture, weights of an earlier run (fresh optimizer)
        model, earlier = load_tiny(cfg.init_from)
        if _question_first(earlier) != cfg.question_first:
            raise ValueError(f"init_from={cfg.init_from!r} was trained with the other prompt order "
                             f"(question_first={not cfg.question_first})")
        if type(model).__name__ != {"llava": "LlavaForConditionalGeneration",
                                    "llava_next": "LlavaNextForConditionalGeneration"}[recipe.arch]:
            raise ValueError(f"init_from={cfg.init_from!r} holds a {type(model).__name__}, not a {cfg.model}")
    _, n_col, n_other = _class_layout(recipe.benchmark)
    n_match = n_col + n_other  # the colour and shape / digit classes
    grid = recipe.image_size // recipe.patch_size if recipe.arch == "llava" and cfg.position_aux else 0
    n_classes = n_match + 2 * grid  # the per-patch head also predicts row and column with --position-aux
    torch.manual_seed(cfg.seed + 1)
    head = torch.nn.Linear(model.config.text_config.hidden_size, n_classes)
    # Value heads: the same per-patch targets read from each grounded layer's value vectors, so that what the
    # answer position's attention fetches from an object's token says what the object is (training only).
    value_width = model.config.text_config.num_key_value_heads * model.config.text_config.head_dim
    value_heads = torch.nn.ModuleList([torch.nn.Linear(value_width, n_classes) for _ in cfg.grounding_layers]) \
        if cfg.value_aux_weight else torch.nn.ModuleList()
    # Question head: which words the first question holds, read off the answer position at the input of decoder
    # layer `question_aux_layer`: the query that finds the asked object needs the asked words there first.
    vocab = model.config.text_config.vocab_size
    question_head = torch.nn.ModuleList(
        [torch.nn.Linear(model.config.text_config.hidden_size, vocab)] if cfg.question_aux_layer else [])
    match_head = torch.nn.ModuleList(
        [torch.nn.Linear(model.config.text_config.hidden_size, n_match)] if cfg.match_layer else [])
    width = model.config.text_config.hidden_size
    relevance_head = torch.nn.ModuleList([torch.nn.Linear(width, 3)] if cfg.relevance_layer else [])
    copy_head = torch.nn.ModuleList([torch.nn.Linear(width, n_match * (2 if cfg.copy_roles else 1))]
                                    if cfg.copy_layer else [])
    # With roles, the question's colour words tell at the layer below the copy layer whether they name the asked
    # object or the reference, so that the image tokens have an ordered question to copy from.
    word_role_head = torch.nn.ModuleList([torch.nn.Linear(width, 2)] if cfg.copy_roles else [])
    if cfg.tie_qk_init and not cfg.init_from:
        for index in cfg.grounding_layers:  # keys start equal to queries: q.k is then >= 0 for matching content
            attn = model.model.language_model.layers[index].self_attn
            with torch.no_grad():
                attn.k_proj.weight.copy_(attn.q_proj.weight[:attn.k_proj.weight.shape[0]])
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: captured.__setitem__("f", o))
    # An optional question-type subset (a curriculum stage) applies to training and calibration alike.
    options = {**recipe.benchmark_options, **({"qtypes": tuple(cfg.qtypes)} if cfg.qtypes else {})}
    vision_start = time.time()
    if cfg.vision_steps:
        _vision_warmup(cfg, recipe, model, processor, head, captured, options, log)
    vision_wall_time = time.time() - vision_start
    probe = GroundingProbe(model, cfg.grounding_layers, cfg.grounding_heads) if cfg.grounding_layers else None
    # The answer position must first read the question's naming words (colour, shape, digit) before it can look
    # for the object they name; in shallow layers the 256 image tokens otherwise take all of its attention.
    question_probe = (GroundingProbe(model, cfg.question_grounding_layers, cfg.grounding_heads)
                      if cfg.question_grounding_layers else None)
    naming_ids = torch.tensor(sorted(processor.tokenizer.convert_tokens_to_ids(w)
                                     for w in (*COLORS, *SHAPES, *"0123456789")
                                     if w in processor.tokenizer.get_vocab()))
    params = [*model.parameters(), *head.parameters(), *value_heads.parameters(), *question_head.parameters(),
              *match_head.parameters(), *relevance_head.parameters(), *copy_head.parameters(),
              *word_role_head.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    colour_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(COLORS)))
    assistant_id = processor.tokenizer.convert_tokens_to_ids("ASSISTANT")
    colon_id = processor.tokenizer.convert_tokens_to_ids(":")
    calib = load_benchmark(recipe.benchmark, "calibration", cfg.eval_samples, seed=cfg.seed, **options)

    start = time.time()
    history = []
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.model}", dynamic_ncols=True)
    for step in bar:
        model.train()
        samples = load_benchmark(recipe.benchmark, "train", cfg.batch_size, seed=cfg.seed,
                                 start=(cfg.data_offset + step) * cfg.batch_size,
                                 **options, **_crowding(cfg, recipe, step))
        texts = [_dialogue(s, cfg, step) for s in samples]
        inputs = processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
        ids = inputs["input_ids"]
        rows = torch.arange(ids.shape[0])
        colon_at = ((ids[:, :-1] == assistant_id) & (ids[:, 1:] == colon_id)).int().argmax(1) + 1  # (B,) first ":"
        if probe is not None:
            probe.query, probe.key_valid = colon_at, inputs["attention_mask"]
            image_id = model.config.image_token_id
            probe.targets = [target_positions(s, (ids[b] == image_id).nonzero().squeeze(1), model.config)
                             for b, s in enumerate(samples)]
            if cfg.grounding_contrast:
                probe.negatives = [_other_objects(s, (ids[b] == image_id).nonzero().squeeze(1), model.config,
                                                  probe.targets[b]) for b, s in enumerate(samples)]
        if question_probe is not None:
            naming = torch.isin(ids, naming_ids) & (torch.arange(ids.shape[1])[None] < colon_at[:, None])  # (B, T)
            question_probe.query, question_probe.key_valid = colon_at, inputs["attention_mask"]
            question_probe.targets = [row.nonzero().squeeze(1) for row in naming]
        output = model(**inputs, output_hidden_states=bool(cfg.deep_layers or cfg.question_aux_layer
                                                           or cfg.match_layer or cfg.relevance_layer
                                                           or cfg.copy_layer))
        logits = output.logits  # (B, T, V)
        # Loss on every answer word and the </s> after it: predicted from the ":" after "ASSISTANT" and from
        # the answer word itself.
        colon = (ids[:, :-1] == assistant_id) & (ids[:, 1:] == colon_id)  # (B, T-1): "ASSISTANT" at t
        src = torch.zeros_like(ids, dtype=torch.bool)
        src[:, 1:] |= colon  # the ":" position predicts the answer
        src[:, 2:] |= colon[:, :-1]  # the answer position predicts </s>
        src[:, -1] = False
        pred = logits[:, :-1][src[:, :-1]]  # (n_targets, V)
        targets = ids[:, 1:][src[:, :-1]]  # (n_targets,)
        answer_loss = torch.nn.functional.cross_entropy(pred, targets)
        patch_targets = _aux_targets(samples, recipe, inputs.get("image_sizes"))
        features = captured.pop("f")
        aux = _patch_loss(head, features, patch_targets, recipe.benchmark, grid, object_focus=bool(cfg.vision_steps))
        patch_colour, patch_shape = _patch_accuracy(head, features, patch_targets, recipe.benchmark)
        value_aux = torch.zeros(())
        if len(value_heads):
            image_id = model.config.image_token_id
            targets_seq = _sequence_targets(samples, recipe)
            for value_head, values in zip(value_heads, probe.values):  # values: (B, T, Hkv * hd)
                if recipe.arch == "llava":
                    feats = values[ids == image_id].view(len(samples), -1, values.shape[-1])  # (B, N, Dv)
                    value_aux = value_aux + _aux_loss(value_head, feats, torch.stack(targets_seq), recipe.benchmark,
                                                      grid)
                else:
                    feats = values[ids == image_id]  # (sum n_b, Dv), samples in batch order
                    value_aux = value_aux + _aux_loss(value_head, feats, torch.cat(targets_seq), recipe.benchmark)
            value_aux = value_aux / len(value_heads)
        deep = torch.zeros(())
        if cfg.deep_layers:
            # The first answer read off intermediate layers through the final norm and head (deep supervision).
            answer_ids = ids[rows, colon_at + 1]  # (B,)
            language = model.model.language_model
            deep = torch.stack([torch.nn.functional.cross_entropy(
                model.lm_head(language.norm(output.hidden_states[layer][rows, colon_at])), answer_ids)
                for layer in cfg.deep_layers]).mean()
        question_aux = torch.zeros(())
        if len(question_head):
            first_turn = torch.arange(ids.shape[1])[None] < colon_at[:, None]  # (B, T)
            image_or_pad = (ids == model.config.image_token_id) | (inputs["attention_mask"] == 0)
            words = torch.zeros(ids.shape[0], vocab)  # (B, V) multi-hot of the first turn's text tokens
            words.scatter_(1, torch.where(first_turn & ~image_or_pad, ids, 0), 1.0)
            words[:, 0] = 0.0  # id 0 (<pad>) stood in for the masked positions
            guess = question_head[0](output.hidden_states[cfg.question_aux_layer][rows, colon_at])  # (B, V)
            question_aux = torch.nn.functional.binary_cross_entropy_with_logits(guess, words)
        match = torch.zeros(())
        if len(match_head):
            normed = model.model.language_model.layers[cfg.match_layer].input_layernorm(
                output.hidden_states[cfg.match_layer])  # (B, T, D): what that layer's q/k projections read
            match = _match_loss(match_head[0], normed[ids == model.config.image_token_id],
                                torch.cat(_sequence_targets(samples, recipe)), normed[rows, colon_at],
                                _named_classes(samples, recipe.benchmark), recipe.benchmark)
        relevance = torch.zeros(())
        image_mask = ids == model.config.image_token_id  # (B, T)
        if len(relevance_head):
            states = output.hidden_states[cfg.relevance_layer][image_mask]  # (sum n_b, D), samples in batch order
            roles = torch.cat([_relevance_targets(s_, int(image_mask[b].sum()), model.config)
                               for b, s_ in enumerate(samples)])  # (sum n_b,)
            # Asked objects cover ~1% of the tokens: weight the roles up so "never relevant" is not a cheap optimum.
            relevance = torch.nn.functional.cross_entropy(relevance_head[0](states), roles,
                                                          weight=torch.tensor([1.0, 20.0, 20.0]))
        if len(copy_head):
            states = output.hidden_states[cfg.copy_layer]  # (B, T, D)
            named = _named_classes(samples, recipe.benchmark, cfg.copy_roles)  # (B, C), or (B, 2C) by role
            guess = copy_head[0](states)  # (B, T, C)
            copy_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                guess[image_mask], named[:, None].expand(-1, ids.shape[1], -1)[image_mask])
            relevance = relevance + copy_loss * named.shape[1] / 2
        if len(word_role_head):
            colour_words, word_roles = _colour_word_roles(samples, ids, colour_ids, colon_at)
            guess = word_role_head[0](output.hidden_states[cfg.copy_layer - 1][colour_words])  # (n_words, 2)
            relevance = relevance + torch.nn.functional.cross_entropy(guess, word_roles)
        grounding = probe.loss() if probe is not None else torch.zeros(())
        if question_probe is not None:
            grounding = grounding + question_probe.loss()
        loss = (relevance + match + answer_loss + cfg.aux_weight * aux + cfg.grounding_weight * grounding
                + cfg.value_aux_weight * value_aux + deep + question_aux * vocab / 8)
        _optimizer_step(optim, params, loss, _lr_at(step, cfg))

        first_acc = (pred.argmax(-1) == targets).float().mean().item()  # over all answer and </s> targets
        bar.set_postfix(loss=f"{answer_loss.item():.3f}", aux=f"{aux.item():.3f}", ground=f"{grounding.item():.3f}",
                        vaux=f"{value_aux.item():.3f}", deep=f"{deep.item():.3f}", q=f"{question_aux.item():.3f}",
                        match=f"{match.item():.3f}", rel=f"{relevance.item():.3f}",
                        acc=f"{first_acc:.2f}")
        log.info("step %d loss %.4f aux %.4f batch_acc %.3f ground %.4f value_aux %.4f deep %.4f question_aux %.4f "
                 "match %.4f relevance %.4f object_colour_acc %.3f object_shape_acc %.3f lr %.2e elapsed %.0fs", step,
                 answer_loss.item(), aux.item(), first_acc, grounding.item(), value_aux.item(), deep.item(),
                 question_aux.item(), match.item(), relevance.item(), patch_colour, patch_shape, _lr_at(step, cfg),
                 time.time() - start)
        last = step == cfg.steps - 1
        over_time = bool(cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes)
        over_time |= bool(cfg.stop_at and step + 1 >= cfg.stop_at)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last or over_time:
            model.eval()
            acc, _ = evaluate(model, processor, calib, batch_size=25)
            history.append(dict(step=step + 1, calibration_accuracy=acc, elapsed_s=round(time.time() - start, 1)))
            log.info("eval step %d calibration_accuracy %.3f", step + 1, acc)
            tqdm.write(f"step {step + 1}: calibration accuracy {acc:.3f} ({time.time() - start:.0f}s)")
            save_tiny(model, processor, out)
        if over_time:
            log.info("stopping at step %d (max_minutes=%s, stop_at=%s)", step + 1, cfg.max_minutes, cfg.stop_at)
            break
    hook.remove()
    for grounding_probe in (probe, question_probe):
        if grounding_probe is not None:
            grounding_probe.remove()
    # wall_time_s covers the language steps (their `elapsed_s` counts from the same start); the vision stage apart.
    summary = dict(config=asdict(cfg), wall_time_s=round(time.time() - start, 1),
                   vision_wall_time_s=round(vision_wall_time, 1), history=history)
    previous = Path(cfg.init_from) / "train_config.json" if cfg.init_from else None
    if previous is not None and previous.is_file():
        summary["previous_stage"] = json.loads(previous.read_text())
    (out / "train_config.json").write_text(json.dumps(summary, indent=2))
    log.info("done in %.0fs", time.time() - start)
    return summary


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add the `train-tiny` sub-command to an argparse `subparsers` object (sets `func`)."""
    parser = subparsers.add_parser("train-tiny", help="train a bundled tiny VLM on its synthetic benchmark (CPU)")
    defaults = TrainConfig()
    parser.add_argument("model", choices=sorted(TINY_MODELS), help="which tiny model to train")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--extra-questions", type=int, default=defaults.extra_questions,
                        help="extra question turns per training image")
    parser.add_argument("--grounding-layers", default="", help="comma-separated decoder layers whose answer-position "
                        "attention is trained onto the target objects' tokens (e.g. 2,3,4,5); empty = off")
    parser.add_argument("--qtypes", default="", help="comma-separated question types to train on (default: all)")
    parser.add_argument("--grounding-weight", type=float, default=defaults.grounding_weight)
    parser.add_argument("--value-aux-weight", type=float, default=defaults.value_aux_weight,
                        help="weight of the per-patch targets read from the grounded layers' value vectors; 0 = off")
    parser.add_argument("--question-aux-layer", type=int, default=defaults.question_aux_layer,
                        help="train the answer position's input to this decoder layer to tell which words the "
                        "question holds (multi-hot); 0 = off")
    parser.add_argument("--match-layer", type=int, default=defaults.match_layer,
                        help="one attribute read-out shared by the image tokens and the answer position at this "
                        "layer's attention input (see _match_loss); 0 = off")
    parser.add_argument("--question-grounding-layers", default="", help="comma-separated decoder layers whose "
                        "answer-position attention is trained onto the question's colour/shape/digit words")
    parser.add_argument("--curriculum", default="", help="object-count curriculum as STEP:MAX pairs, e.g. "
                        "0:1,150:2,300:4,450:8 (shapes: max_objects; docs: max_fields); empty = off")
    parser.add_argument("--grounding-heads", type=int, default=defaults.grounding_heads, help="ground only the "
                        "mean of the first N heads of each grounded layer (0 = all heads)")
    parser.add_argument("--position-aux", action="store_true", help="the per-patch heads also predict each image "
                        "token's row and column (LLaVA-1.5 models)")
    parser.add_argument("--grounding-contrast", action="store_true", help="grounded layers also score the asked "
                        "objects above every other object (softplus margin), not only mass on the asked ones")
    parser.add_argument("--question-first", action="store_true", help="train with the question before the image "
                        "(the checkpoint ships that prompt order in its chat template); needs --extra-questions 0")
    parser.add_argument("--relevance-layer", type=int, default=defaults.relevance_layer, help="train the image "
                        "tokens' input to this decoder layer to tell their role for the question (not asked / asked "
                        "object / reference object); needs --question-first; 0 = off")
    parser.add_argument("--copy-layer", type=int, default=defaults.copy_layer, help="train the image tokens' input "
                        "to this decoder layer to tell which colours and shapes the question names; 0 = off")
    parser.add_argument("--copy-roles", action="store_true", help="the --copy-layer target tells the asked "
                        "object's named classes apart from the reference object's (position questions)")
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps, help="image-only steps that "
                        "train the vision tower, projector and per-patch head before the language steps (and weight "
                        "the object tokens in the per-patch loss throughout); 0 = off")
    parser.add_argument("--vision-batch-size", type=int, default=defaults.vision_batch_size)
    parser.add_argument("--tie-qk-init", action="store_true", help="start the grounded layers' keys equal to "
                        "their queries")
    parser.add_argument("--deep-layers", default="", help="comma-separated decoder layers whose output at the answer "
                        "position is also trained to give the first answer (deep supervision); empty = off")
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this long; 0 = never")
    parser.add_argument("--stop-at", type=int, default=0, help="stop (and save) after this many steps; the LR "
                        "schedule still follows --steps; 0 = run all steps")
    parser.add_argument("--finish-steps", type=int, default=0, help="then a finishing stage of this many steps from "
                        "the weights just trained (fresh optimizer, no image-only steps, the data after the first "
                        "stage's), the same as a second command with --init-from OUT --data-offset STEPS")
    parser.add_argument("--finish-qtypes", default="", help="question types of the finishing stage (default: as above)")
    parser.add_argument("--finish-lr", type=float, default=None, help="learning rate of the finishing stage (5e-4)")
    parser.add_argument("--finish-warmup", type=int, default=None, help="warm-up steps of the finishing stage (20)")
    parser.add_argument("--init-from", default="", help="start from the weights of this checkpoint directory")
    parser.add_argument("--data-offset", type=int, default=0,
                        help="skip this many batches of the train stream (a second stage sees new samples)")
    parser.add_argument("--out", default="", help="output directory (default: eval/checkpoints/<model>)")
    parser.set_defaults(func=_run)
    return parser


def _items(text: str) -> list[str]:
    """The non-empty items of a comma-separated option value."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the arguments of the same names (fields without an option, e.g. weight_decay, keep their
    defaults); list-valued fields arrive comma-separated."""
    from dataclasses import fields

    lists = dict(
        grounding_layers=tuple(int(i) for i in _items(args.grounding_layers)),
        deep_layers=tuple(int(i) for i in _items(args.deep_layers)),
        question_grounding_layers=tuple(int(i) for i in _items(args.question_grounding_layers)),
        qtypes=tuple(_items(args.qtypes)),
        curriculum=tuple(tuple(int(v) for v in pair.split(":")) for pair in _items(args.curriculum)),
    )
    plain = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in lists and hasattr(args, f.name)}
    return TrainConfig(**plain, **lists)


def finishing_stage(cfg: TrainConfig, steps: int, qtypes: tuple[str, ...] = (), lr: float | None = None,
                    warmup: int | None = None) -> TrainConfig:
    """The second stage of a two-stage command: from `cfg.out`'s weights, on the training data after `cfg`'s, with
    a fresh optimizer and no image-only steps (so the per-patch loss is the plain mean), into the same folder.
    Question types default to `cfg`'s, the learning rate to 5e-4 and the warm-up to 20 steps."""
    if steps < 1:
        raise ValueError(f"finish_steps must be >= 1, got {steps!r}")
    if qtypes:  # the generator rejects unknown question types here, not after the first stage's hour
        recipe = TINY_MODELS[cfg.model]
        load_benchmark(recipe.benchmark, "train", 1, seed=cfg.seed, **{**recipe.benchmark_options, "qtypes": qtypes})
    return replace(cfg, init_from=cfg.out, data_offset=cfg.data_offset + cfg.steps, steps=steps,
                   qtypes=tuple(qtypes) or cfg.qtypes, lr=5e-4 if lr is None else lr,
                   warmup=20 if warmup is None else warmup, vision_steps=0, max_minutes=0.0, stop_at=0)


def _run(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    stages = [cfg]
    finish_options = {"--finish-qtypes": args.finish_qtypes or None, "--finish-lr": args.finish_lr,
                      "--finish-warmup": args.finish_warmup}
    if not args.finish_steps and any(v is not None for v in finish_options.values()):
        given = [name for name, v in finish_options.items() if v is not None]
        raise ValueError(f"{', '.join(given)} need --finish-steps N (the finishing stage's length)")
    if args.finish_steps:  # validated before the first stage runs, so a typo does not cost a whole run
        stages.append(finishing_stage(cfg, args.finish_steps, tuple(_items(args.finish_qtypes)), args.finish_lr,
                                      args.finish_warmup))
    for stage in stages:
        summary = train(stage)
        print(json.dumps({k: summary[k] for k in ("wall_time_s", "history")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.testbed.train_tiny")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subparser(subparsers)
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if not argv or argv[0] != "train-tiny":
        argv = ["train-tiny", *argv]  # `python -m ... tiny-llava-shapes ...` works without the sub-command
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
