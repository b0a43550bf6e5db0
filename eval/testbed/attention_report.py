"""Where a tiny VLM's answer position looks: attention mass per layer and head on the asked object(s), on every
object, on the whole image and on the text (a training diagnostic).

    python -m mmreduce.eval.testbed.attention_report tiny-llava-shapes --samples 60 --qtype color_of_shape

FastV and PyramidDrop rank image tokens by exactly this attention (last prompt token, mean over heads), so a model
on which it does not single out the asked object cannot separate the methods from `random`. The report shows which
stage is missing: "all objects ≈ 1, target ≈ 1 / objects per image" means the model finds objects but not the
asked one; "text ≈ 1" in a layer means that layer reads the question.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from .grounding import object_boxes, target_positions
from ..benchmarks import load_benchmark
from ..tiny_models import TINY_MODELS, load_tiny, prompt_for

__all__ = ["attention_mass", "main"]


@torch.inference_mode()
def attention_mass(model, processor, samples) -> list[dict[str, list[float]]]:
    """Per decoder layer, {"target", "objects", "image", "text"}: mean attention mass per head of the last prompt
    token on the asked objects' tokens, on all objects' tokens, on all image tokens and on the text tokens."""
    if model.config._attn_implementation != "eager":
        raise ValueError("attention_mass needs attention weights: load the model with attn_implementation='eager'")
    inputs = processor(images=[s.image for s in samples], text=[prompt_for(processor, s.question) for s in samples],
                       return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    attentions = model(**inputs, output_attentions=True).attentions  # per layer (B, H, T, T)
    image = ids == model.config.image_token_id  # (B, T)
    report = []
    for weights in attentions:
        last = weights[:, :, -1]  # (B, H, T): the answer position's attention
        sums = {key: torch.zeros(last.shape[1]) for key in ("target", "objects", "image", "text")}
        for b, sample in enumerate(samples):
            vision = image[b].nonzero().squeeze(1)
            everything = replace(sample, meta={**sample.meta, "target_boxes": object_boxes(sample)})
            sums["target"] += last[b][:, target_positions(sample, vision, model.config)].sum(-1)
            sums["objects"] += last[b][:, target_positions(everything, vision, model.config)].sum(-1)
            sums["image"] += last[b][:, vision].sum(-1)
            sums["text"] += last[b][:, ~image[b]].sum(-1)
        report.append({key: [round(float(v) / len(samples), 3) for v in value] for key, value in sums.items()})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.testbed.attention_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="bundled tiny model name or checkpoint directory")
    parser.add_argument("--dataset", default=None, help="benchmark (default: the model's own, else shapes)")
    parser.add_argument("--split", default="calibration", choices=["train", "calibration", "test"])
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--qtype", default="", help="only this question type")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset = args.dataset or (TINY_MODELS[args.model].benchmark if args.model in TINY_MODELS else "shapes")
    model, processor = load_tiny(args.model, attn_implementation="eager")
    options = {"qtypes": (args.qtype,)} if args.qtype else {}
    samples = load_benchmark(dataset, args.split, args.samples, seed=args.seed, **options)
    report = attention_mass(model, processor, samples)
    for layer, row in enumerate(report):
        print(f"layer {layer}: " + "  ".join(f"{key} {row[key]}" for key in ("target", "objects", "image", "text")))
    print(json.dumps({"model": args.model, "dataset": dataset, "samples": len(samples), "layers": report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
