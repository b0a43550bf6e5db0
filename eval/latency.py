"""Latency benchmark on random-weight LLaVA models: baseline vs in-LLM reduction, measured and FLOPs-predicted.

    python -m mmreduce.eval.latency --preset cpu          # hidden 1024, 16 layers, 576 vision + 40 text tokens
    python -m mmreduce.eval.latency --preset llava-7b     # LLaVA-1.5-7B shapes, bf16, sdpa, needs a GPU
    python -m mmreduce.eval.latency --preset cpu --stage before   # before-the-LLM methods vs plain indexing

Prefill is timed as the median of `--repeats` forwards (after warm-up, methods interleaved so that machine noise
hits all of them alike); decode per token as (generate of 1 + N tokens − generate of 1 token) / N. Random weights
say nothing about accuracy; they do fix every shape, so the timings are those of the real architecture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import mmreduce
from mmreduce.flops import ModelDims

__all__ = ["BEFORE_METHODS", "PRESETS", "LatencyPreset", "add_subparser", "build_model", "main", "make_inputs",
           "run_before_benchmark", "run_benchmark"]


@dataclass(frozen=True)
class LatencyPreset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int = 336
    patch_size: int = 14  # (336 / 14)² = 576 vision tokens, as LLaVA-1.5
    text_tokens: int = 40
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 10
    decode_tokens: int = 16


PRESETS = {
    # Small enough for 2 CPU cores, large enough that the decoder dominates: hidden 1024, MHA like Vicuna; 16 layers
    # so that PyramidDrop's quarters (4, 8, 12) fall where they do in 32 (with 8, a third of the depth sits at layer
    # 2 and the scoring probe alone is ~3.7% of the FLOPs).
    "cpu": LatencyPreset(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=16, vocab=4096,
                         vision_hidden=64, vision_layers=1, vision_heads=2),
    # LLaVA-1.5-7B: Vicuna-7B (4096, 11008, 32 layers, 32 heads) behind CLIP ViT-L/14-336.
    "llava-7b": LatencyPreset(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064,
                              vision_hidden=1024, vision_layers=24, vision_heads=16, dtype="bfloat16",
                              device="cuda", repeats=20, decode_tokens=32),
}

METHODS = {
    "baseline": None,
    "fastv K=2 r=0.25": ("fastv", dict(layer=2, keep_ratio=0.25)),
    "pdrop λ=0.5": ("pdrop", dict(keep_ratio=0.5)),
}


#: Before-the-LLM methods timed end to end (vision tower included) against the same model with the same number of
#: features cut by plain indexing.
BEFORE_METHODS = {
    "stride r=0.25": ("stride", dict(keep_ratio=0.25)),
    "pool r=0.25": ("pool", dict(keep_ratio=0.25)),
    "tome r=0.25": ("tome", dict(keep_ratio=0.25)),
}


def build_model(preset: LatencyPreset, attn: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden,
            num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
            image_size=preset.image_size, patch_size=preset.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
            num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
            max_position_embeddings=4096,
        ),
        image_token_id=preset.vocab - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    dtype = getattr(torch, preset.dtype)
    with torch.device(preset.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    return model


def make_inputs(preset: LatencyPreset, batch: int = 1) -> dict:
    """Prompt = BOS + 5 text tokens + 576 image tokens + the remaining text (LLaVA's layout), all real tokens."""
    vision = (preset.image_size // preset.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, preset.vocab - 2, (5,), generator=generator)
    after = torch.randint(3, preset.vocab - 2, (preset.text_tokens - 6,), generator=generator)
    row = torch.cat([torch.tensor([1]), before, torch.full((vision,), preset.vocab - 1), after])
    input_ids = row.expand(batch, -1).contiguous()
    pixel_values = torch.randn(batch, 3, preset.image_size, preset.image_size, generator=generator)
    return {
        "input_ids": input_ids.to(preset.device),
        "attention_mask": torch.ones_like(input_ids).to(preset.device),
        "pixel_values": pixel_values.to(preset.device, getattr(torch, preset.dtype)),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def run_benchmark(preset: LatencyPreset, attn: str = "sdpa", methods=METHODS, log=print) -> list[dict]:
    model = build_model(preset, attn)
    inputs = make_inputs(preset)
    dims = ModelDims.from_config(model.config.text_config)
    wrapped = {name: (mmreduce.create_method(spec[0], **spec[1]) if spec else None) for name, spec in methods.items()}
    prefill = {name: [] for name in methods}
    selection = {name: [] for name in methods}
    decode = {name: [] for name in methods}
    stats = {}
    kv_bytes = {}

    def forward(name):
        method = wrapped[name]
        if method is None:
            return lambda: model(**inputs, logits_to_keep=1)
        return lambda: reduced[name](**inputs, logits_to_keep=1)

    reduced = {}
    with torch.inference_mode():
        for name, method in wrapped.items():
            if method is None:
                continue
            reduced[name] = mmreduce.wrap(model, method)
            reduced[name](**inputs, logits_to_keep=1)
            stats[name] = reduced[name].stats
            reduced[name].unwrap()
        log(f"warm-up and {preset.repeats} interleaved prefill repeats ...")
        for repeat in range(preset.repeats + 2):
            for name, method in wrapped.items():
                if method is not None:
                    reduced[name] = mmreduce.wrap(model, method)
                elapsed = _timed(forward(name), preset.device)
                if method is not None:
                    selection[name].append(reduced[name].stats.selection_ms)
                    reduced[name].unwrap()
                if repeat >= 2:
                    prefill[name].append(elapsed)
        log("decode ...")
        generate = dict(do_sample=False, pad_token_id=0)
        for repeat in range(3):
            for name, method in wrapped.items():
                target = mmreduce.wrap(model, method) if method is not None else model
                try:
                    one = _timed(lambda: target.generate(**inputs, max_new_tokens=1, **generate), preset.device)
                    out = {}

                    def many():
                        out["result"] = target.generate(**inputs, max_new_tokens=1 + preset.decode_tokens,
                                                        min_new_tokens=1 + preset.decode_tokens,
                                                        return_dict_in_generate=True, **generate)

                    total = _timed(many, preset.device)
                    cache = out["result"].cache if hasattr(out["result"], "cache") else out["result"].past_key_values
                    kv_bytes[name] = sum(
                        layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
                    )
                finally:
                    if method is not None:
                        target.unwrap()
                decode[name].append((total - one) / preset.decode_tokens)

    rows = []
    baseline_ms = statistics.median(prefill["baseline"])
    for name in methods:
        method_stats = stats.get(name)
        if method_stats is None:
            vision = (preset.image_size // preset.patch_size) ** 2
            flops = mmreduce.prefill_flops([vision + preset.text_tokens] * preset.layers, dims)
            baseline_flops, equivalent = flops, float(vision)
        else:
            flops, baseline_flops = method_stats.flops()
            equivalent = method_stats.equivalent_vision_tokens
        median = statistics.median(prefill[name])
        predicted = baseline_flops / flops
        measured = baseline_ms / median
        rows.append({
            "method": name,
            "equivalent_vision_tokens": equivalent,
            "prefill_flops": flops,
            "prefill_ms": median,
            "prefill_ms_all": prefill[name],
            "selection_ms": statistics.median(selection[name]) if selection[name] else 0.0,
            "selection_share": (statistics.median(selection[name]) / median) if selection[name] else 0.0,
            "decode_ms_per_token": statistics.median(decode[name]),
            "kv_cache_mb": kv_bytes.get(name, 0) / 2**20,
            "predicted_speedup": predicted,
            "measured_speedup": measured,
            "measured_over_predicted": measured / predicted,
        })
    return rows


def _cut_by_indexing(model, inputs: dict, kept: torch.Tensor):
    """The ideal a before-the-LLM method is measured against: the stock vision tower and projector, then only the
    `kept` (K,) feature rows written into a prompt with K placeholders, and the stock text model + LM head on it.
    Returns a callable that runs it once (last-token logits)."""
    inner = model.model
    image_id = model.config.image_token_id
    ids = inputs["input_ids"]  # (1, T)
    vision = ids[0] == image_id
    first = int(vision.nonzero()[0])
    short_ids = torch.cat([ids[:, :first], ids[:, first:first + kept.numel()], ids[:, first + int(vision.sum()):]],
                          dim=1)  # (1, T - N + K)
    short_mask = torch.ones_like(short_ids)
    short_vision = short_ids[0] == image_id

    def run():
        features = inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, -2)
        embeds = inner.get_input_embeddings()(short_ids)  # (1, T', D)
        embeds[0, short_vision] = features[kept].to(embeds.dtype)
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=short_mask).last_hidden_state
        return model.lm_head(hidden[:, -1:])

    return run


def run_before_benchmark(preset: LatencyPreset, attn: str = "sdpa", log=print) -> list[dict]:
    """Prefill (vision tower included) of before-the-LLM methods vs the baseline and vs plain indexing.

    `measured_over_ideal` = (baseline ms / method ms) / (baseline ms / ideal ms) = ideal ms / method ms: how close
    the hooked method comes to a model that was simply given fewer features (1.0 = no overhead)."""
    model = build_model(preset, attn)
    inputs = make_inputs(preset)
    methods = {name: (mmreduce.parse_spec(spec).build(preset.layers, (preset.image_size // preset.patch_size) ** 2)
                      if options is None else mmreduce.create_method(spec, **options))
               for name, (spec, options) in BEFORE_METHODS.items()}
    timings = {name: [] for name in ["baseline", *methods, *(f"ideal {n}" for n in methods)]}
    stats, ideals = {}, {}
    with torch.inference_mode():
        for name, method in methods.items():
            with mmreduce.wrap(model, method) as reduced:
                reduced(**inputs, logits_to_keep=1)
                stats[name] = reduced.stats
            kept = torch.tensor(stats[name].kept_positions[0][0]) - int(
                (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
            ideals[name] = _cut_by_indexing(model, inputs, kept)
        log(f"warm-up and {preset.repeats} interleaved prefill repeats (vision tower included) ...")
        for repeat in range(preset.repeats + 2):
            runs = [("baseline", lambda: model(**inputs, logits_to_keep=1))]
            for name, method in methods.items():
                runs.append((f"ideal {name}", ideals[name]))
                runs.append((name, method))
            for name, fn in runs:
                if isinstance(fn, mmreduce.ReductionMethod):
                    with mmreduce.wrap(model, fn) as reduced:
                        elapsed = _timed(lambda: reduced(**inputs, logits_to_keep=1), preset.device)
                else:
                    elapsed = _timed(fn, preset.device)
                if repeat >= 2:
                    timings[name].append(elapsed)
    baseline_ms = statistics.median(timings["baseline"])
    rows = [{"method": "baseline", "prefill_ms": baseline_ms, "prefill_ms_all": timings["baseline"],
             "equivalent_vision_tokens": float((preset.image_size // preset.patch_size) ** 2)}]
    for name in methods:
        method_ms, ideal_ms = statistics.median(timings[name]), statistics.median(timings[f"ideal {name}"])
        flops, baseline_flops = stats[name].flops()
        rows.append({
            "method": name,
            "equivalent_vision_tokens": stats[name].equivalent_vision_tokens,
            "prefill_flops": flops,
            "prefill_ms": method_ms,
            "prefill_ms_all": timings[name],
            "ideal_ms": ideal_ms,
            "ideal_ms_all": timings[f"ideal {name}"],
            "selection_ms": stats[name].selection_ms,
            "measured_speedup": baseline_ms / method_ms,
            "ideal_speedup": baseline_ms / ideal_ms,
            "measured_over_ideal": ideal_ms / method_ms,
        })
    return rows


def before_markdown(rows: list[dict]) -> str:
    lines = ["| method | eq. vision tokens | prefill ms (median, IQR) | plain-indexing ideal ms | speedup measured / "
             "ideal | measured ÷ ideal |", "|---|---|---|---|---|---|"]
    for r in rows:
        spread = statistics.quantiles(r["prefill_ms_all"], n=4) if len(r["prefill_ms_all"]) > 1 else [0, 0, 0]
        cells = f"{r['prefill_ms']:.1f} ({spread[0]:.1f}–{spread[2]:.1f})"
        if r["method"] == "baseline":
            lines.append(f"| baseline | {r['equivalent_vision_tokens']:.0f} | {cells} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['equivalent_vision_tokens']:.0f} | {cells} | {r['ideal_ms']:.1f} | "
                     f"{r['measured_speedup']:.2f}× / {r['ideal_speedup']:.2f}× | {r['measured_over_ideal']:.2f} |")
    return "\n".join(lines)


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| method | eq. vision tokens | prefill GFLOPs | prefill ms (median) | speedup measured / predicted (ratio) "
        "| scoring+selection | decode ms/token | KV cache MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['equivalent_vision_tokens']:.0f} | {r['prefill_flops'] / 1e9:.1f} | "
            f"{r['prefill_ms']:.1f} | {r['measured_speedup']:.2f}× / {r['predicted_speedup']:.2f}× "
            f"({100 * r['measured_over_predicted']:.0f}%) | {100 * r['selection_share']:.2f}% | "
            f"{r['decode_ms_per_token']:.1f} | {r['kv_cache_mb']:.1f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--stage", choices=["inside", "before"], default="inside",
                        help="inside: in-LLM methods (FastV, PyramidDrop); before: before-the-LLM methods, vision "
                             "tower included, against the same model given fewer features by plain indexing")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--repeats", type=int, default=None, help="prefill repeats (>= 10 recommended)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.set_defaults(func=run_from_args)
    return parser


def add_subparser(subparsers) -> None:
    """Adds `mmreduce latency` to the CLI."""
    add_arguments(subparsers.add_parser("latency", help="baseline vs reduced prefill/decode latency, random weights",
                                        description=__doc__))


def run_from_args(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit("--repeats must be >= 1")
        preset = LatencyPreset(**{**preset.__dict__, "repeats": args.repeats})
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset!r} needs a CUDA GPU; use --preset cpu here")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"preset {args.preset}: hidden {preset.hidden}, {preset.layers} layers, "
          f"{(preset.image_size // preset.patch_size) ** 2} vision + {preset.text_tokens} text tokens, "
          f"{preset.dtype} on {preset.device}, attn {args.attn}, torch threads {torch.get_num_threads()}")
    if args.stage == "before":
        rows = run_before_benchmark(preset, args.attn, log=lambda m: print(m, file=sys.stderr))
        print(before_markdown(rows))
    else:
        rows = run_benchmark(preset, args.attn, log=lambda m: print(m, file=sys.stderr))
        print(to_markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "attn": args.attn, "stage": args.stage, "device": _device_name(preset),
                       "rows": rows},
                      f, indent=2)
    return 0


def _device_name(preset: LatencyPreset) -> str:
    if preset.device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
