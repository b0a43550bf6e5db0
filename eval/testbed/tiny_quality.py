"""Quality bars of a tiny checkpoint: unreduced test accuracy and masked-reference token-dropping accuracies.

    python -m mmreduce.eval.testbed.tiny_quality tiny-llava-shapes --samples 300 --seed 0

Reports, on the benchmark's `test` split:
- `unreduced`: greedy accuracy of the plain model;
- `random_keep{r}_layer{l}`: the vision keys of a random (1 - r) share masked from layer l on (a masked stand-in
  for the `random` method with its own seeding, see `masked_drop.random_vision_mask`);
- `target_keep{r}_layer{l}` (LLaVA-1.5 models only): the same budget, but the patches under the objects the
  answer depends on are kept first (an oracle selection: what a perfect attention-guided method could keep); for
  `tiny-llava-video`, the actor's patches in every frame where it is visible.
and writes `eval/results/<name>-quality.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..accuracy import evaluate
from .grounding import is_clip, video_frames
from .masked_drop import random_vision_mask, scored_vision_mask
from ..benchmarks import load_benchmark
from ..tiny_models import TINY_MODELS, load_tiny, recipe_name, resolve_checkpoint

__all__ = ["quality_report", "target_scores"]

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def _per_qtype(samples, predictions) -> dict[str, float]:
    hits, totals = defaultdict(int), defaultdict(int)
    for s, p in zip(samples, predictions):
        totals[s.meta["qtype"]] += 1
        hits[s.meta["qtype"]] += p == s.answer
    return {q: round(hits[q] / totals[q], 4) for q in sorted(totals)}


def target_scores(samples, grid: int, patch: int, seed: int) -> torch.Tensor:
    """(B, F*grid*grid) scores: 1 + noise for patches overlapping a target box, noise in [0, 1) elsewhere.

    Patches are row-major over the `grid x grid` LLaVA-1.5 feature map, `patch` pixels each; a `video` clip has F
    such maps, frame after frame, each with the boxes of its frame (F = 1 for one image).
    """
    generator = torch.Generator().manual_seed(seed)
    scenes = [video_frames(s) if is_clip(s) else [s] for s in samples]
    frames = len(scenes[0])
    if any(len(f) != frames for f in scenes):
        raise ValueError("every sample of a batch must have the same number of frames")
    scores = torch.rand(len(samples), frames, grid, grid, generator=generator)  # (B, F, gh, gw)
    for b, per_frame in enumerate(scenes):
        for k, scene in enumerate(per_frame):
            for x0, y0, x1, y1 in scene.meta["target_boxes"]:
                rows = slice(max(0, y0 // patch), min(grid, y1 // patch + 1))
                cols = slice(max(0, x0 // patch), min(grid, x1 // patch + 1))
                scores[b, k, rows, cols] += 1
    return scores.reshape(len(samples), frames * grid * grid)  # (B, N) row-major, frame after frame


def _target_eval(model, processor, samples, keep_ratio, layer, batch_size, seed):
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    predictions = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        per_patch = target_scores(batch, grid, model.config.vision_config.patch_size, seed + start)

        def score(input_ids, vision, per_patch=per_patch):
            scores = torch.zeros(vision.shape)  # (B, T)
            scores[vision] = per_patch.reshape(-1)  # vision positions are the patches in row-major order
            return scores

        with scored_vision_mask(model, keep_ratio, layer, score):
            predictions += evaluate(model, processor, batch, batch_size=len(batch), max_new_tokens=2)[1]
    accuracy = sum(p == s.answer for p, s in zip(predictions, samples)) / len(samples)
    return accuracy, predictions


def quality_report(name_or_path: str, samples: int = 300, seed: int = 0, keep_ratio: float = 0.25, layer: int = 2,
                   batch_size: int = 25, out: str | None = None) -> dict:
    """Measure the bars (see the module docstring) and write them as JSON; returns the record."""
    torch.set_num_threads(1)  # see train.TrainConfig.threads
    path = resolve_checkpoint(name_or_path)
    model, processor = load_tiny(path)
    name = recipe_name(path)
    recipe = TINY_MODELS.get(name) if name is not None else None
    if recipe is None:
        raise ValueError(f"{path.name!r} is not a registered tiny model; its benchmark is unknown")
    test = load_benchmark(recipe.benchmark, "test", samples, seed=seed, **recipe.benchmark_options)
    record = dict(model=path.name, benchmark=recipe.benchmark, split="test", samples=samples, seed=seed)
    start = time.time()
    acc, preds = evaluate(model, processor, test, batch_size=batch_size, max_new_tokens=2, progress=True)
    record["unreduced"] = dict(accuracy=round(acc, 4), per_qtype=_per_qtype(test, preds))
    with random_vision_mask(model, keep_ratio, layer=layer, seed=seed):
        acc, preds = evaluate(model, processor, test, batch_size=batch_size, max_new_tokens=2, progress=True)
    record[f"random_keep{keep_ratio}_layer{layer}"] = dict(accuracy=round(acc, 4), per_qtype=_per_qtype(test, preds))
    if recipe.arch == "llava":
        acc, preds = _target_eval(model, processor, test, keep_ratio, layer, batch_size, seed)
        record[f"target_keep{keep_ratio}_layer{layer}"] = dict(accuracy=round(acc, 4),
                                                                per_qtype=_per_qtype(test, preds))
    record["eval_wall_s"] = round(time.time() - start, 1)
    out_path = Path(out) if out else RESULTS_DIR / f"{path.name}-quality.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.testbed.tiny_quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", help="bundled tiny model name or checkpoint directory")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    record = quality_report(args.model, args.samples, args.seed, args.keep_ratio, args.layer, args.batch_size, args.out)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
