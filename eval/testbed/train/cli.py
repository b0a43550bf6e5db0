"""The `train-tiny` command: its options, the `TrainConfig` they make, and the optional finishing stage.

    mmreduce train-tiny tiny-llava-shapes --steps 1200 --batch-size 16 --seed 0 --out runs/shapes
    python -m mmreduce.eval.testbed.train tiny-llava-shapes ...      # the same without the console script

The commands that made the bundled checkpoints are in docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ...tiny_models import TINY_MODELS
from .config import TrainConfig, finishing_stage
from .loop import train

__all__ = ["add_subparser", "main"]


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add the `train-tiny` sub-command to an argparse `subparsers` object (sets `func`)."""
    parser = subparsers.add_parser("train-tiny", help="train a bundled tiny VLM on its synthetic benchmark (CPU)")
    defaults = TrainConfig()
    _add_run_options(parser.add_argument_group("run"), defaults)
    _add_loss_options(parser.add_argument_group("losses"), defaults)
    _add_stop_and_save_options(parser.add_argument_group("evaluation and saving"), defaults)
    _add_finishing_options(parser.add_argument_group("finishing stage"), defaults)
    parser.set_defaults(func=_run)
    return parser


def _add_run_options(group, defaults: TrainConfig) -> None:
    """The model, the schedule and the data stream."""
    group.add_argument("model", choices=sorted(TINY_MODELS), help="which tiny model to train")
    group.add_argument("--steps", type=int, default=defaults.steps)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--warmup", type=int, default=defaults.warmup)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--threads", type=int, default=defaults.threads)
    group.add_argument("--qtypes", default="", help="comma-separated question types to train on (default: all)")
    group.add_argument("--extra-questions", type=int, default=defaults.extra_questions,
                       help="extra question turns per training image")
    group.add_argument("--curriculum", default="", help="object-count curriculum as STEP:MAX pairs, e.g. "
                       "0:1,150:2,300:4,450:8 (shapes: max_objects; docs: max_fields); empty = off")
    group.add_argument("--question-first", action="store_true", help="train with the question before the image "
                       "(the checkpoint ships that prompt order in its chat template); needs --extra-questions 0")
    group.add_argument("--vision-steps", type=int, default=defaults.vision_steps, help="image-only steps that "
                       "train the vision tower, projector and per-patch head before the language steps (and weight "
                       "the object tokens in the per-patch loss throughout); 0 = off")
    group.add_argument("--vision-batch-size", type=int, default=defaults.vision_batch_size)
    group.add_argument("--init-from", default="", help="start from the weights of this checkpoint directory")
    group.add_argument("--data-offset", type=int, default=0,
                       help="skip this many batches of the train stream (a second stage sees new samples)")


def _add_loss_options(group, defaults: TrainConfig) -> None:
    """The losses besides the answer's (all off by default except the per-patch one)."""
    group.add_argument("--aux-weight", type=float, default=defaults.aux_weight)
    group.add_argument("--grounding-layers", default="", help="comma-separated decoder layers whose answer-position "
                       "attention is trained onto the target objects' tokens (e.g. 2,3,4,5); empty = off")
    group.add_argument("--grounding-weight", type=float, default=defaults.grounding_weight)
    group.add_argument("--grounding-heads", type=int, default=defaults.grounding_heads, help="ground only the "
                       "mean of the first N heads of each grounded layer (0 = all heads)")
    group.add_argument("--grounding-contrast", action="store_true", help="grounded layers also score the asked "
                       "objects above every other object (softplus margin), not only mass on the asked ones")
    group.add_argument("--value-aux-weight", type=float, default=defaults.value_aux_weight,
                       help="weight of the per-patch targets read from the grounded layers' value vectors; 0 = off")
    group.add_argument("--question-aux-layer", type=int, default=defaults.question_aux_layer,
                       help="train the answer position's input to this decoder layer to tell which words the "
                       "question holds (multi-hot); 0 = off")
    group.add_argument("--match-layer", type=int, default=defaults.match_layer,
                       help="one attribute read-out shared by the image tokens and the answer position at this "
                       "layer's attention input (see losses.match_loss); 0 = off")
    group.add_argument("--question-grounding-layers", default="", help="comma-separated decoder layers whose "
                       "answer-position attention is trained onto the question's colour/shape/digit words")
    group.add_argument("--position-aux", action="store_true", help="the per-patch heads also predict each image "
                       "token's row and column (LLaVA-1.5 models)")
    group.add_argument("--relevance-layer", type=int, default=defaults.relevance_layer, help="train the image "
                       "tokens' input to this decoder layer to tell their role for the question (not asked / asked "
                       "object / reference object); needs --question-first; 0 = off")
    group.add_argument("--copy-layer", type=int, default=defaults.copy_layer, help="train the image tokens' input "
                       "to this decoder layer to tell which colours and shapes the question names; 0 = off")
    group.add_argument("--copy-roles", action="store_true", help="the --copy-layer target tells the asked "
                       "object's named classes apart from the reference object's (position questions)")
    group.add_argument("--frame-layer", type=int, default=defaults.frame_layer, help="train the image tokens' "
                       "input to this decoder layer to tell which frame of a clip they belong to (models reading "
                       "several frames); 0 = off")
    group.add_argument("--tie-qk-init", action="store_true", help="start the grounded layers' keys equal to "
                       "their queries")
    group.add_argument("--deep-layers", default="", help="comma-separated decoder layers whose output at the answer "
                       "position is also trained to give the first answer (deep supervision); empty = off")


def _add_stop_and_save_options(group, defaults: TrainConfig) -> None:
    """Evaluation, stopping and the output folder."""
    group.add_argument("--eval-every", type=int, default=defaults.eval_every)
    group.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    group.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this long; 0 = never")
    group.add_argument("--stop-at", type=int, default=0, help="stop (and save) after this many steps; the LR "
                       "schedule still follows --steps; 0 = run all steps")
    group.add_argument("--out", default="", help="output directory (default: eval/checkpoints/<model>)")


def _add_finishing_options(group, defaults: TrainConfig) -> None:
    """The optional finishing stage of the same command (`config.finishing_stage`)."""
    group.add_argument("--finish-steps", type=int, default=0, help="then a finishing stage of this many steps from "
                       "the weights just trained (fresh optimizer, no image-only steps, the data after the first "
                       "stage's), the same as a second command with --init-from OUT --data-offset STEPS")
    group.add_argument("--finish-qtypes", default="", help="question types of the finishing stage (default: as above)")
    group.add_argument("--finish-lr", type=float, default=None, help="learning rate of the finishing stage (5e-4)")
    group.add_argument("--finish-warmup", type=int, default=None, help="warm-up steps of the finishing stage (20)")


def _items(text: str) -> list[str]:
    """The non-empty items of a comma-separated option value."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the arguments of the same names (fields without an option, e.g. weight_decay, keep their
    defaults); list-valued fields arrive comma-separated."""
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
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.testbed.train")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subparser(subparsers)
    argv = list(argv) if argv is not None else sys.argv[1:]
    if not argv or argv[0] != "train-tiny":
        argv = ["train-tiny", *argv]  # `python -m ... tiny-llava-shapes ...` works without the sub-command
    args = parser.parse_args(argv)
    return args.func(args)
