"""Settings of a `train-tiny` run (`TrainConfig`, validated on construction) and of its finishing stage."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...benchmarks import load_benchmark
from ...tiny_models import CHECKPOINT_DIR, TINY_MODELS

__all__ = ["TrainConfig", "finishing_stage"]


@dataclass
class TrainConfig:
    """Training run settings (all of them go into the log and `train_config.json`, flat, in this order).

    Run: model, steps, batch_size, lr, warmup (linear, then cosine to 5%), weight_decay, seed, threads.
    Data: extra_questions (turns per image), qtypes (question types, cycled: repeats weight a type), curriculum
    ((start_step, max_objects) pairs), question_first (prompt order), data_offset (batches of the train stream to
    skip), vision_steps / vision_batch_size (image-only steps first).
    Losses besides the answer's (0 / empty = off): aux_weight (per-patch targets), grounding_layers /
    grounding_weight / grounding_heads / grounding_contrast (answer-position attention onto the asked objects),
    value_aux_weight, deep_layers, question_aux_layer, match_layer, tie_qk_init, question_grounding_layers,
    position_aux, relevance_layer (image tokens' role), copy_layer / copy_roles (the question's named classes),
    frame_layer (which frame of a clip an image token is in).
    Stopping and saving: eval_every, eval_samples, max_minutes, stop_at, init_from, out.
    """

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
    frame_layer: int = 0
    vision_steps: int = 0
    vision_batch_size: int = 32
    seed: int = 0
    eval_every: int = 200
    eval_samples: int = 100
    threads: int = 1  # one thread: on 2 cores two threads stalled on each other (measured 1.8x slower)
    max_minutes: float = 0.0
    stop_at: int = 0
    init_from: str = ""
    data_offset: int = 0
    out: str = ""

    def __post_init__(self) -> None:
        self._check_counts()
        self._normalise_layer_lists()
        self._check_curriculum()
        self._check_losses()
        if not self.out:
            self.out = str(CHECKPOINT_DIR / self.model)

    def _check_counts(self) -> None:
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

    def _normalise_layer_lists(self) -> None:
        """Lists arrive as lists from JSON and as tuples from the CLI; they are kept as tuples of ints."""
        self.grounding_layers = tuple(int(i) for i in self.grounding_layers)
        self.deep_layers = tuple(int(i) for i in self.deep_layers)
        self.question_grounding_layers = tuple(int(i) for i in self.question_grounding_layers)
        self.curriculum = tuple((int(a), int(b)) for a, b in self.curriculum)

    def _check_curriculum(self) -> None:
        starts = [a for a, _ in self.curriculum]
        if self.curriculum and (starts != sorted(starts) or starts[0] != 0 or min(b for _, b in self.curriculum) < 1):
            raise ValueError(f"curriculum must be (start_step, max_objects) pairs with increasing steps from 0 and "
                             f"max_objects >= 1, got {self.curriculum!r}")

    def _check_losses(self) -> None:
        if any(i < 0 for i in self.question_grounding_layers):
            raise ValueError(f"question_grounding_layers must be >= 0, got {self.question_grounding_layers!r}")
        if self.value_aux_weight < 0 or (self.value_aux_weight and not self.grounding_layers):
            raise ValueError(f"value_aux_weight must be >= 0 and needs grounding_layers (its layers), got "
                             f"{self.value_aux_weight!r} with grounding_layers={self.grounding_layers!r}")
        if self.grounding_contrast and not self.grounding_layers:
            raise ValueError("grounding_contrast needs grounding_layers")
        if self.grounding_heads < 0:
            raise ValueError(f"grounding_heads must be >= 0 (0 = all heads), got {self.grounding_heads!r}")
        self._check_question_first_losses()
        if self.frame_layer < 0 or (self.frame_layer and TINY_MODELS[self.model].frames < 2):
            raise ValueError(f"frame_layer must be >= 0 (0 = off) and needs a model that reads several frames, got "
                             f"{self.frame_layer!r} for {self.model}")
        if TINY_MODELS[self.model].benchmark == "video" and (self.curriculum or self.extra_questions):
            raise ValueError("curriculum and extra_questions are for shapes and docs scenes; train a video model "
                             "with --extra-questions 0 and no --curriculum")
        if self.match_layer < 0:
            raise ValueError(f"match_layer must be >= 0 (0 = off), got {self.match_layer!r}")
        if self.question_aux_layer < 0:
            raise ValueError(f"question_aux_layer must be >= 0 (0 = off), got {self.question_aux_layer!r}")
        if any(i < 1 for i in self.deep_layers):
            raise ValueError(f"deep_layers must be >= 1 (outputs of decoder layers), got {self.deep_layers!r}")
        if any(i < 0 for i in self.grounding_layers) or self.grounding_weight < 0:
            raise ValueError(f"grounding_layers must be >= 0 and grounding_weight >= 0, got "
                             f"{self.grounding_layers!r}, {self.grounding_weight!r}")

    def _check_question_first_losses(self) -> None:
        """The losses that need the image tokens to see the question (question before the image)."""
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
