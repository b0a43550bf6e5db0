"""The `train-tiny` loop: train a bundled tiny VLM on its synthetic benchmark, on the CPU, reproducibly.

Batches are drawn from the benchmark's `train` split by index (step s uses indices (offset + s) * B ..
(offset + s) * B + B - 1), so a run is a pure function of its arguments and never sees a sample twice. The loss is
cross-entropy on the answer word and `</s>`, plus an auxiliary per-patch loss: a throw-away linear head on the
projector output predicts, for every vision token, what the generator drew under it (colour and shape for
`shapes` and for every frame of a `video` clip; mark colour, digit or line for `docs`). The dense target teaches the tiny CLIP tower from scratch in
minutes and keeps each object's information in its own tokens, which is exactly what makes token selection
matter. The optional losses of `TrainConfig` add more such heads; none of them is saved.

Phases of `train`: `_setup` (model, heads, probes, optimizer; it runs `_vision_warmup`, the image-only steps,
before the optimizer of the language steps exists), then per step `_training_step` and `_report_step`, and
`_evaluate_and_save` every `eval_every` steps, at the last step and when a time or step limit stops the run;
`_finish` writes `train_config.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ...accuracy import evaluate
from ...benchmarks import load_benchmark
from ...benchmarks.draw import COLORS, SHAPES
from ...tiny_models import TINY_MODELS, TinyVLMConfig, build_tiny, format_prompt, load_tiny, prompt_for, save_tiny
from ..extra_questions import extra_questions
from ..grounding import GroundingProbe, target_positions
from ..optim import WarmupCosine, WarmupCosineAdamW
from .config import TrainConfig
from .losses import aux_loss, match_loss, patch_accuracy, patch_loss
from .targets import (
    aux_targets,
    class_layout,
    colour_word_roles,
    frame_targets,
    named_classes,
    other_object_positions,
    relevance_targets,
    sequence_targets,
)

__all__ = ["train"]

#: The cosine of both stages (image-only and language steps) ends at 5% of the peak learning rate.
LR_FLOOR = 0.05
#: Images of the image-only steps come from this index of the train split on, far past the language steps' range.
VISION_DATA_START = 5_000_000


@dataclass
class _Heads:
    """The throw-away heads trained beside the model (none is saved); an empty ModuleList = that loss is off."""

    patch: torch.nn.Linear  # per-patch classes (+ row and column with position_aux)
    value: torch.nn.ModuleList  # the same classes from each grounded layer's value vectors
    question: torch.nn.ModuleList  # which words the question holds, at the answer position
    match: torch.nn.ModuleList  # one attribute read-out shared by image tokens and the answer position
    relevance: torch.nn.ModuleList  # image token roles: none / asked / reference
    copy: torch.nn.ModuleList  # the classes the question names, at every image token
    word_role: torch.nn.ModuleList  # asked / reference role of the question's colour words
    frame: torch.nn.ModuleList  # which frame of a clip an image token belongs to

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.patch.parameters(), *self.value.parameters(), *self.question.parameters(),
                *self.match.parameters(), *self.relevance.parameters(), *self.copy.parameters(),
                *self.word_role.parameters(), *self.frame.parameters()]


@dataclass
class _Run:
    """Everything the steps of one run share."""

    cfg: TrainConfig
    recipe: TinyVLMConfig
    model: torch.nn.Module
    processor: object
    heads: _Heads
    grid: int  # side of the row/column targets of position_aux (0 = off)
    log: logging.Logger
    captured: dict  # "f": the projector output of the last forward, (B, N, D) or (sum of crops, n, D)
    hook: torch.utils.hooks.RemovableHandle
    options: dict  # benchmark generator options (the question-type subset included)
    probe: GroundingProbe | None  # answer position onto the asked objects
    question_probe: GroundingProbe | None  # answer position onto the question's naming words
    naming_ids: torch.Tensor  # token ids of colour, shape and digit words
    colour_ids: torch.Tensor
    assistant_id: int
    colon_id: int
    calibration: list
    optimizer: WarmupCosineAdamW

    @property
    def vocab(self) -> int:
        return self.model.config.text_config.vocab_size


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.model` from scratch, save it to `cfg.out`, return a summary (accuracies, wall time)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run, vision_wall_time = _setup(cfg, _open_log(cfg, out))
    start = time.time()
    history = []
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.model}", dynamic_ncols=True)
    for step in bar:
        _report_step(run, bar, step, _training_step(run, step), start)
        last = step == cfg.steps - 1
        over_time = bool(cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes)
        over_time |= bool(cfg.stop_at and step + 1 >= cfg.stop_at)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last or over_time:
            _evaluate_and_save(run, step, start, history, out)
        if over_time:
            run.log.info("stopping at step %d (max_minutes=%s, stop_at=%s)", step + 1, cfg.max_minutes, cfg.stop_at)
            break
    return _finish(run, out, start, vision_wall_time, history)


# Setup ----------------------------------------------------------------------------------------------------------


def _open_log(cfg: TrainConfig, out: Path) -> logging.Logger:
    """The run's log `<out>.train.log`; a second stage (init_from) appends to the first stage's."""
    log = logging.getLogger("mmreduce.eval.testbed.train")
    log.setLevel(logging.INFO)
    log.handlers = [logging.FileHandler(out.parent / f"{out.name}.train.log", mode="a" if cfg.init_from else "w")]
    log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.info("config %s", json.dumps(asdict(cfg)))
    return log


def _setup(cfg: TrainConfig, log: logging.Logger) -> tuple[_Run, float]:
    """Model, heads, probes and optimizer of a run, after the image-only steps (their wall time is returned).

    The order fixes the random streams: the model is built from `cfg.seed`, the heads from `cfg.seed + 1`.
    """
    recipe, model, processor = _model(cfg)
    heads, grid = _make_heads(cfg, recipe, model)
    if cfg.tie_qk_init and not cfg.init_from:
        _tie_keys_to_queries(model, cfg.grounding_layers)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: captured.__setitem__("f", o))
    # An optional question-type subset (a curriculum stage) applies to training and calibration alike.
    options = {**recipe.benchmark_options, **({"qtypes": tuple(cfg.qtypes)} if cfg.qtypes else {})}
    vision_start = time.time()
    if cfg.vision_steps:
        _vision_warmup(cfg, recipe, model, processor, heads.patch, captured, options, log, grid)
    vision_wall_time = time.time() - vision_start
    probe = GroundingProbe(model, cfg.grounding_layers, cfg.grounding_heads) if cfg.grounding_layers else None
    # The answer position must first read the question's naming words (colour, shape, digit) before it can look
    # for the object they name; in shallow layers the 256 image tokens otherwise take all of its attention.
    question_probe = (GroundingProbe(model, cfg.question_grounding_layers, cfg.grounding_heads)
                      if cfg.question_grounding_layers else None)
    tokenizer = processor.tokenizer
    naming_ids = torch.tensor(sorted(tokenizer.convert_tokens_to_ids(w) for w in (*COLORS, *SHAPES, *"0123456789")
                                     if w in tokenizer.get_vocab()))
    optimizer = WarmupCosineAdamW([*model.parameters(), *heads.parameters()],
                                  WarmupCosine(cfg.lr, cfg.warmup, cfg.steps, floor=LR_FLOOR), cfg.weight_decay)
    run = _Run(cfg=cfg, recipe=recipe, model=model, processor=processor, heads=heads, grid=grid, log=log,
               captured=captured, hook=hook, options=options, probe=probe, question_probe=question_probe,
               naming_ids=naming_ids, colour_ids=torch.tensor(tokenizer.convert_tokens_to_ids(list(COLORS))),
               assistant_id=tokenizer.convert_tokens_to_ids("ASSISTANT"),
               colon_id=tokenizer.convert_tokens_to_ids(":"),
               calibration=load_benchmark(recipe.benchmark, "calibration", cfg.eval_samples, seed=cfg.seed, **options),
               optimizer=optimizer)
    return run, vision_wall_time


def _model(cfg: TrainConfig) -> tuple[TinyVLMConfig, torch.nn.Module, object]:
    """The recipe (with the run's prompt order), and the model and processor: fresh from `cfg.seed`, or the
    weights of `cfg.init_from` (a second stage: same architecture, fresh optimizer)."""
    recipe = TINY_MODELS[cfg.model]
    layer_options = dict(grounding_layers=cfg.grounding_layers, deep_layers=cfg.deep_layers,
                         question_grounding_layers=cfg.question_grounding_layers,
                         question_aux_layer=(cfg.question_aux_layer,), match_layer=(cfg.match_layer,),
                         relevance_layer=(cfg.relevance_layer,), copy_layer=(cfg.copy_layer,),
                         frame_layer=(cfg.frame_layer,))
    for name, layers in layer_options.items():
        if any(i >= recipe.text_layers for i in layers):
            raise ValueError(f"{name}={layers!r} names a layer past the last of {cfg.model}'s {recipe.text_layers}")
    if cfg.question_first:
        recipe = replace(recipe, question_first=True)
    # Built also with init_from: the same random numbers are drawn, and the processor is the recipe's.
    model, processor = build_tiny(recipe, seed=cfg.seed)
    if cfg.init_from:
        model, earlier = load_tiny(cfg.init_from)
        if _question_first(earlier) != cfg.question_first:
            raise ValueError(f"init_from={cfg.init_from!r} was trained with the other prompt order "
                             f"(question_first={not cfg.question_first})")
        if type(model).__name__ != {"llava": "LlavaForConditionalGeneration",
                                    "llava_next": "LlavaNextForConditionalGeneration",
                                    "internvl": "InternVLForConditionalGeneration"}[recipe.arch]:
            raise ValueError(f"init_from={cfg.init_from!r} holds a {type(model).__name__}, not a {cfg.model}")
    return recipe, model, processor


def _question_first(processor) -> bool:
    """Whether a checkpoint's own prompt puts the question before the image."""
    return not prompt_for(processor, "?").startswith("USER: <image>")


def _make_heads(cfg: TrainConfig, recipe: TinyVLMConfig, model) -> tuple[_Heads, int]:
    """The heads of the losses `cfg` turns on, drawn from `cfg.seed + 1` in a fixed order; and the row/column grid
    of position_aux (0 = off)."""
    _, n_col, n_other = class_layout(recipe.benchmark)
    n_match = n_col + n_other  # the colour and shape / digit classes
    grid = recipe.image_size // recipe.patch_size if recipe.arch == "llava" and cfg.position_aux else 0
    n_classes = n_match + 2 * grid  # the per-patch head also predicts row and column with --position-aux
    text = model.config.text_config
    width = text.hidden_size

    def heads(out_features: int, on: bool, count: int = 1) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([torch.nn.Linear(width, out_features) for _ in range(count)] if on else [])

    torch.manual_seed(cfg.seed + 1)
    patch = torch.nn.Linear(width, n_classes)
    # Value heads: the same per-patch targets read from each grounded layer's value vectors, so that what the
    # answer position's attention fetches from an object's token says what the object is (training only).
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads  # Qwen2: no field
    value_width = text.num_key_value_heads * head_dim
    value = torch.nn.ModuleList([torch.nn.Linear(value_width, n_classes) for _ in cfg.grounding_layers]
                                if cfg.value_aux_weight else [])
    # Question head: which words the first question holds, read off the answer position at the input of decoder
    # layer `question_aux_layer`: the query that finds the asked object needs the asked words there first.
    question = heads(text.vocab_size, bool(cfg.question_aux_layer))
    match = heads(n_match, bool(cfg.match_layer))
    relevance = heads(3, bool(cfg.relevance_layer))
    copy = heads(n_match * (2 if cfg.copy_roles else 1), bool(cfg.copy_layer))
    # With roles, the question's colour words tell at the layer below the copy layer whether they name the asked
    # object or the reference, so that the image tokens have an ordered question to copy from.
    word_role = heads(2, cfg.copy_roles)
    # Frame index: image tokens of a clip learn which frame they are in (drawn last, so the other recipes' heads
    # and their random streams are unchanged).
    frame = heads(recipe.frames, bool(cfg.frame_layer))
    return _Heads(patch, value, question, match, relevance, copy, word_role, frame), grid


def _tie_keys_to_queries(model, layers: tuple[int, ...]) -> None:
    """Keys start equal to queries in `layers`: q.k is then >= 0 for matching content."""
    for index in layers:
        attn = model.model.language_model.layers[index].self_attn
        with torch.no_grad():
            attn.k_proj.weight.copy_(attn.q_proj.weight[:attn.k_proj.weight.shape[0]])


def _vision_warmup(cfg: TrainConfig, recipe: TinyVLMConfig, model, processor, head, captured: dict, options: dict,
                   log: logging.Logger, grid: int = 0) -> None:
    """Train the vision tower, projector and per-patch head alone (no language model) for `cfg.vision_steps` steps.

    An image-only step costs a fraction of a full one, and what the language model later needs first, every
    object's colour and shape in its own tokens, is exactly what the per-patch targets teach. Images come from the
    train split far past the range the language steps use (`VISION_DATA_START` on), so the two never share one.
    A `video` step takes every frame of its `vision_batch_size` clips. With `grid` (position_aux) the head also
    predicts each token's row and column.
    """
    from tqdm.auto import tqdm

    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *head.parameters()]
    schedule = WarmupCosine(cfg.lr, min(cfg.warmup, cfg.vision_steps), cfg.vision_steps, floor=LR_FLOOR)
    optimizer = WarmupCosineAdamW(params, schedule, cfg.weight_decay, decay_matrices_only=False)
    bar = tqdm(range(cfg.vision_steps), desc=f"vision {cfg.model}", dynamic_ncols=True)
    for step in bar:
        samples = load_benchmark(recipe.benchmark, "train", cfg.vision_batch_size, seed=cfg.seed,
                                 start=VISION_DATA_START + step * cfg.vision_batch_size, **options)
        inputs = processor.image_processor([image for s in samples for image in s.images], return_tensors="pt")
        sizes = inputs.get("image_sizes")
        if recipe.arch in ("llava", "internvl"):  # internvl: every image's tiles, concatenated
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=sizes)
        features, targets = captured.pop("f"), aux_targets(samples, recipe, sizes)
        loss = patch_loss(head, features, targets, recipe.benchmark, grid, object_focus=True)
        lr = optimizer.step(loss, step)
        colour, other = patch_accuracy(head, features, targets, recipe.benchmark)
        bar.set_postfix(loss=f"{loss.item():.3f}", colour=f"{colour:.2f}", shape=f"{other:.2f}")
        log.info("vision step %d patch_loss %.4f object_colour_acc %.3f object_shape_acc %.3f lr %.2e", step,
                 loss.item(), colour, other, lr)


# One language step ----------------------------------------------------------------------------------------------


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


def _dialogue(sample, cfg: TrainConfig) -> str:
    """The sample's own question first (the test format; one image placeholder per image), then extra turns about
    the same image."""
    text = f"{format_prompt(sample.question, len(sample.images), cfg.question_first)} {sample.answer}</s>"
    for question, answer in extra_questions(sample, cfg.extra_questions, cfg.seed) if cfg.extra_questions else ():
        text += f"USER: {question} ASSISTANT: {answer}</s>"
    return text


def _batch(run: _Run, step: int) -> tuple[list, dict]:
    """The samples of `step` (train split by index) and the processor's inputs for their dialogues."""
    cfg = run.cfg
    samples = load_benchmark(run.recipe.benchmark, "train", cfg.batch_size, seed=cfg.seed,
                             start=(cfg.data_offset + step) * cfg.batch_size,
                             **run.options, **_crowding(cfg, run.recipe, step))
    texts = [_dialogue(s, cfg) for s in samples]
    images = [image for s in samples for image in s.images]  # a clip's frames in order
    inputs = run.processor(images=images, text=texts, return_tensors="pt", padding=True)
    return samples, inputs


def _aim_probes(run: _Run, samples, inputs: dict, colon_at: torch.Tensor) -> None:
    """Point the grounding probes of the coming forward at this batch's answer positions and targets."""
    ids = inputs["input_ids"]
    if run.probe is not None:
        probe, config = run.probe, run.model.config
        probe.query, probe.key_valid = colon_at, inputs["attention_mask"]
        image_id = config.image_token_id
        probe.targets = [target_positions(s, (ids[b] == image_id).nonzero().squeeze(1), config)
                         for b, s in enumerate(samples)]
        if run.cfg.grounding_contrast:
            probe.negatives = [other_object_positions(s, (ids[b] == image_id).nonzero().squeeze(1), config,
                                                      probe.targets[b]) for b, s in enumerate(samples)]
    if run.question_probe is not None:
        naming = torch.isin(ids, run.naming_ids) & (torch.arange(ids.shape[1])[None] < colon_at[:, None])  # (B, T)
        run.question_probe.query, run.question_probe.key_valid = colon_at, inputs["attention_mask"]
        run.question_probe.targets = [row.nonzero().squeeze(1) for row in naming]


def _answer_loss(run: _Run, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy on every answer word and the </s> after it, predicted from the ":" after "ASSISTANT" and from
    the answer word itself; and the accuracy of those predictions. logits: (B, T, V); ids: (B, T)."""
    colon = (ids[:, :-1] == run.assistant_id) & (ids[:, 1:] == run.colon_id)  # (B, T-1): "ASSISTANT" at t
    src = torch.zeros_like(ids, dtype=torch.bool)
    src[:, 1:] |= colon  # the ":" position predicts the answer
    src[:, 2:] |= colon[:, :-1]  # the answer position predicts </s>
    src[:, -1] = False
    pred = logits[:, :-1][src[:, :-1]]  # (n_targets, V)
    targets = ids[:, 1:][src[:, :-1]]  # (n_targets,)
    loss = torch.nn.functional.cross_entropy(pred, targets)
    return loss, (pred.argmax(-1) == targets).float().mean().item()


def _value_aux_loss(run: _Run, samples, ids: torch.Tensor) -> torch.Tensor:
    """Per-patch targets read from the grounded layers' value vectors (mean over layers); 0 when off."""
    value_aux = torch.zeros(())
    if not len(run.heads.value):
        return value_aux
    recipe, image_id = run.recipe, run.model.config.image_token_id
    targets_seq = sequence_targets(samples, recipe)
    for value_head, values in zip(run.heads.value, run.probe.values):  # values: (B, T, Hkv * hd)
        if recipe.arch == "llava":
            feats = values[ids == image_id].view(len(samples), -1, values.shape[-1])  # (B, N, Dv)
            value_aux = value_aux + aux_loss(value_head, feats, torch.stack(targets_seq), recipe.benchmark, run.grid)
        else:
            feats = values[ids == image_id]  # (sum n_b, Dv), samples in batch order
            value_aux = value_aux + aux_loss(value_head, feats, torch.cat(targets_seq), recipe.benchmark)
    return value_aux / len(run.heads.value)


def _deep_loss(run: _Run, hidden_states, ids: torch.Tensor, colon_at: torch.Tensor) -> torch.Tensor:
    """The first answer read off intermediate layers through the final norm and head (deep supervision)."""
    if not run.cfg.deep_layers:
        return torch.zeros(())
    rows = torch.arange(ids.shape[0])
    answer_ids = ids[rows, colon_at + 1]  # (B,)
    model = run.model
    language = model.model.language_model
    return torch.stack([torch.nn.functional.cross_entropy(
        model.lm_head(language.norm(hidden_states[layer][rows, colon_at])), answer_ids)
        for layer in run.cfg.deep_layers]).mean()


def _question_aux_loss(run: _Run, hidden_states, inputs: dict, colon_at: torch.Tensor) -> torch.Tensor:
    """Which text tokens the first turn holds (multi-hot), read off the answer position at `question_aux_layer`."""
    if not len(run.heads.question):
        return torch.zeros(())
    ids = inputs["input_ids"]
    first_turn = torch.arange(ids.shape[1])[None] < colon_at[:, None]  # (B, T)
    image_or_pad = (ids == run.model.config.image_token_id) | (inputs["attention_mask"] == 0)
    words = torch.zeros(ids.shape[0], run.vocab)  # (B, V) multi-hot of the first turn's text tokens
    words.scatter_(1, torch.where(first_turn & ~image_or_pad, ids, 0), 1.0)
    words[:, 0] = 0.0  # id 0 (<pad>) stood in for the masked positions
    rows = torch.arange(ids.shape[0])
    guess = run.heads.question[0](hidden_states[run.cfg.question_aux_layer][rows, colon_at])  # (B, V)
    return torch.nn.functional.binary_cross_entropy_with_logits(guess, words)


def _match_term(run: _Run, hidden_states, samples, ids: torch.Tensor, colon_at: torch.Tensor) -> torch.Tensor:
    """`match_loss` at the attention input of `match_layer` (what its q/k projections read); 0 when off."""
    if not len(run.heads.match):
        return torch.zeros(())
    layer = run.cfg.match_layer
    normed = run.model.model.language_model.layers[layer].input_layernorm(hidden_states[layer])  # (B, T, D)
    rows = torch.arange(ids.shape[0])
    return match_loss(run.heads.match[0], normed[ids == run.model.config.image_token_id],
                      torch.cat(sequence_targets(samples, run.recipe)), normed[rows, colon_at],
                      named_classes(samples, run.recipe.benchmark), run.recipe.benchmark)


def _role_losses(run: _Run, hidden_states, samples, ids: torch.Tensor, colon_at: torch.Tensor
                 ) -> tuple[torch.Tensor, float]:
    """Image tokens' roles at `relevance_layer`, the named classes at `copy_layer` (by role with copy_roles), the
    colour words' roles one layer below it and the image tokens' frame index at `frame_layer`, summed (0 when all
    are off); and the accuracy of the frame index (NaN when off)."""
    cfg, heads = run.cfg, run.heads
    relevance = torch.zeros(())
    image_mask = ids == run.model.config.image_token_id  # (B, T)
    if len(heads.relevance):
        states = hidden_states[cfg.relevance_layer][image_mask]  # (sum n_b, D), samples in batch order
        roles = torch.cat([relevance_targets(s, int(image_mask[b].sum()), run.model.config)
                           for b, s in enumerate(samples)])  # (sum n_b,)
        # Asked objects cover ~1% of the tokens: weight the roles up so "never relevant" is not a cheap optimum.
        relevance = torch.nn.functional.cross_entropy(heads.relevance[0](states), roles,
                                                      weight=torch.tensor([1.0, 20.0, 20.0]))
    if len(heads.copy):
        named = named_classes(samples, run.recipe.benchmark, cfg.copy_roles)  # (B, C), or (B, 2C) by role
        guess = heads.copy[0](hidden_states[cfg.copy_layer])  # (B, T, C)
        copy_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            guess[image_mask], named[:, None].expand(-1, ids.shape[1], -1)[image_mask])
        relevance = relevance + copy_loss * named.shape[1] / 2
    if len(heads.word_role):
        colour_words, word_roles = colour_word_roles(samples, ids, run.colour_ids, colon_at)
        guess = heads.word_role[0](hidden_states[cfg.copy_layer - 1][colour_words])  # (n_words, 2)
        relevance = relevance + torch.nn.functional.cross_entropy(guess, word_roles)
    frame_accuracy = float("nan")
    if len(heads.frame):
        guess = heads.frame[0](hidden_states[cfg.frame_layer][image_mask])  # (sum n_b, frames)
        frames = frame_targets(image_mask.sum(1), run.recipe.frames)  # (sum n_b,)
        relevance = relevance + torch.nn.functional.cross_entropy(guess, frames)
        frame_accuracy = (guess.argmax(-1) == frames).float().mean().item()
    return relevance, frame_accuracy


def _grounding_loss(run: _Run) -> torch.Tensor:
    """The grounding probes' losses of the last forward (it also resets them for the next one)."""
    grounding = run.probe.loss() if run.probe is not None else torch.zeros(())
    if run.question_probe is not None:
        grounding = grounding + run.question_probe.loss()
    return grounding


def _training_step(run: _Run, step: int) -> dict[str, float]:
    """One language step: forward, every loss `run.cfg` turns on, one optimizer step; returns what is logged.

    The losses are computed in a fixed order (the backward pass sums gradients in the order they were recorded).
    """
    cfg, model = run.cfg, run.model
    model.train()
    samples, inputs = _batch(run, step)
    ids = inputs["input_ids"]
    colon_at = ((ids[:, :-1] == run.assistant_id) & (ids[:, 1:] == run.colon_id)).int().argmax(1) + 1  # (B,)
    _aim_probes(run, samples, inputs, colon_at)
    output = model(**inputs, output_hidden_states=bool(cfg.deep_layers or cfg.question_aux_layer or cfg.match_layer
                                                       or cfg.relevance_layer or cfg.copy_layer or cfg.frame_layer))
    answer_loss, first_acc = _answer_loss(run, output.logits, ids)
    patch_targets = aux_targets(samples, run.recipe, inputs.get("image_sizes"))
    features = run.captured.pop("f")
    aux = patch_loss(run.heads.patch, features, patch_targets, run.recipe.benchmark, run.grid,
                     object_focus=bool(cfg.vision_steps))
    patch_colour, patch_shape = patch_accuracy(run.heads.patch, features, patch_targets, run.recipe.benchmark)
    hidden = output.hidden_states
    value_aux = _value_aux_loss(run, samples, ids)
    deep = _deep_loss(run, hidden, ids, colon_at)
    question_aux = _question_aux_loss(run, hidden, inputs, colon_at)
    match = _match_term(run, hidden, samples, ids, colon_at)
    relevance, frame_accuracy = _role_losses(run, hidden, samples, ids, colon_at)
    grounding = _grounding_loss(run)
    loss = (relevance + match + answer_loss + cfg.aux_weight * aux + cfg.grounding_weight * grounding
            + cfg.value_aux_weight * value_aux + deep + question_aux * run.vocab / 8)
    lr = run.optimizer.step(loss, step)
    terms = dict(loss=answer_loss, aux=aux, ground=grounding, vaux=value_aux, deep=deep, q=question_aux, match=match,
                 rel=relevance)
    return {**{k: v.item() for k, v in terms.items()}, "acc": first_acc, "patch_colour": patch_colour,
            "patch_shape": patch_shape, "lr": lr, "frame_acc": frame_accuracy}


# Reporting, evaluation, end of run -------------------------------------------------------------------------------


def _report_step(run: _Run, bar, step: int, m: dict[str, float], start: float) -> None:
    """The progress bar's postfix and the log line of one language step."""
    bar.set_postfix(loss=f"{m['loss']:.3f}", aux=f"{m['aux']:.3f}", ground=f"{m['ground']:.3f}",
                    vaux=f"{m['vaux']:.3f}", deep=f"{m['deep']:.3f}", q=f"{m['q']:.3f}", match=f"{m['match']:.3f}",
                    rel=f"{m['rel']:.3f}", acc=f"{m['acc']:.2f}")
    run.log.info("step %d loss %.4f aux %.4f batch_acc %.3f ground %.4f value_aux %.4f deep %.4f question_aux %.4f "
                 "match %.4f relevance %.4f object_colour_acc %.3f object_shape_acc %.3f lr %.2e elapsed %.0fs%s", step,
                 m["loss"], m["aux"], m["acc"], m["ground"], m["vaux"], m["deep"], m["q"], m["match"], m["rel"],
                 m["patch_colour"], m["patch_shape"], m["lr"], time.time() - start,
                 "" if m["frame_acc"] != m["frame_acc"] else f" frame_acc {m['frame_acc']:.3f}")


def _evaluate_and_save(run: _Run, step: int, start: float, history: list, out: Path) -> None:
    """Calibration accuracy after `step` (into `history` and the log), and the weights saved to `out`."""
    from tqdm.auto import tqdm

    run.model.eval()
    acc, _ = evaluate(run.model, run.processor, run.calibration, batch_size=25)
    history.append(dict(step=step + 1, calibration_accuracy=acc, elapsed_s=round(time.time() - start, 1)))
    run.log.info("eval step %d calibration_accuracy %.3f", step + 1, acc)
    tqdm.write(f"step {step + 1}: calibration accuracy {acc:.3f} ({time.time() - start:.0f}s)")
    save_tiny(run.model, run.processor, out)


def _finish(run: _Run, out: Path, start: float, vision_wall_time: float, history: list) -> dict:
    """Remove the hooks and write `train_config.json` (with the previous stage's record, if any); the summary."""
    run.hook.remove()
    for grounding_probe in (run.probe, run.question_probe):
        if grounding_probe is not None:
            grounding_probe.remove()
    cfg = run.cfg
    # wall_time_s covers the language steps (their `elapsed_s` counts from the same start); the vision stage apart.
    summary = dict(config=asdict(cfg), wall_time_s=round(time.time() - start, 1),
                   vision_wall_time_s=round(vision_wall_time, 1), history=history)
    previous = Path(cfg.init_from) / "train_config.json" if cfg.init_from else None
    if previous is not None and previous.is_file():
        summary["previous_stage"] = json.loads(previous.read_text())
    (out / "train_config.json").write_text(json.dumps(summary, indent=2))
    run.log.info("done in %.0fs", time.time() - start)
    return summary
