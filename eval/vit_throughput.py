"""CPU throughput of ToMe inside a ViT-B/16 (random weights, 224 px): images/s at several merge rates r.

    python -m mmreduce.eval.vit_throughput --out runs/vit-throughput.json

Builds `vit_base_patch16_224` with `pretrained=False` (nothing is downloaded), times the stock model and,
patched with `mmreduce.patch_vit(model, r)`, every r, under `torch.inference_mode()`. Each repeat runs one forward
per variant, the variants interleaved, so that noise from other processes hits all of them alike; the report
gives the median images/s and the spread (min-max) over repeats, the speedup against the stock model, the same
from the process's CPU time (which does not count waiting for a core on a shared machine), and the speedup the
FLOPs predict. Random weights fix every shape, so timings are those of the real architecture (the
tokens each block merges are chosen from random keys, which costs the same as with trained ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["ThroughputConfig", "block_flops", "main", "predicted_flops", "run_benchmark", "to_markdown",
           "token_schedule"]


@dataclass(frozen=True)
class ThroughputConfig:
    model_name: str = "vit_base_patch16_224"
    batch: int = 8            # large enough for matmul efficiency, small enough for 2 cores in a few seconds
    r_values: tuple[int, ...] = (0, 8, 16)
    warmup: int = 1           # forwards per r before timing (allocator and kernel selection)
    repeats: int = 5
    threads: int | None = None  # torch.set_num_threads; None keeps the environment's (OMP_NUM_THREADS)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.warmup < 0 or self.repeats < 1:
            raise ValueError("batch and repeats must be >= 1 and warmup >= 0")
        if not self.r_values or any(r < 0 for r in self.r_values):
            raise ValueError(f"r_values must be non-empty ints >= 0, got {self.r_values}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def token_schedule(num_tokens: int, merged_per_block: Sequence[int]) -> list[tuple[int, int]]:
    """(tokens entering, tokens leaving) each block, CLS included, given the tokens each block merges."""
    schedule, tokens = [], num_tokens
    for merged in merged_per_block:
        schedule.append((tokens, tokens - merged))
        tokens -= merged
    return schedule


def block_flops(tokens_in: int, tokens_out: int, width: int, mlp_hidden: int) -> int:
    """FLOPs (2 per multiply-add) of one pre-norm block that merges between attention and MLP.

    Attention runs on tokens_in: qkv 3·n·d², scores and weighted sum 2·n²·d, output projection n·d². The MLP
    runs on tokens_out: 2·n·d·h. Norms, softmax and the merge itself are left out (well under 1%).
    """
    attention = 3 * tokens_in * width ** 2 + 2 * tokens_in ** 2 * width + tokens_in * width ** 2
    mlp = 2 * tokens_out * width * mlp_hidden
    return 2 * (attention + mlp)


def predicted_flops(model: torch.nn.Module, merged_per_block: Sequence[int]) -> int:
    """FLOPs of one image through the patch embedding and the blocks of a timm ViT (`handle.r` gives the merges:
    an int r is clamped in the last blocks)."""
    width = model.embed_dim
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    patches = model.patch_embed.num_patches
    patch_pixels = model.patch_embed.proj.weight[0].numel()         # in_channels · patch² of the conv
    embedding = 2 * patches * patch_pixels * width
    schedule = token_schedule(patches + model.num_prefix_tokens, merged_per_block)
    return embedding + sum(block_flops(n_in, n_out, width, mlp_hidden) for n_in, n_out in schedule)


def run_benchmark(config: ThroughputConfig, log=print) -> dict:
    import timm

    import mmreduce

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = timm.create_model(config.model_name, pretrained=False).eval()
    size = model.patch_embed.img_size
    images = torch.randn(config.batch, 3, *size, generator=torch.Generator().manual_seed(config.seed))

    merged_per_block: dict[int | None, tuple[int, ...]] = {}
    tokens_per_block: dict[int | None, list[int]] = {}
    load_before = _load_average()

    def forward() -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one forward."""
        with torch.inference_mode():
            wall, cpu = time.perf_counter(), time.process_time()
            model(images)
            return time.perf_counter() - wall, time.process_time() - cpu

    def timed_forward(r: int | None) -> tuple[float, float]:
        if r is None:   # the stock model: the baseline, and what r=0 through the patch must match in speed
            return forward()
        # Patching and removing are outside the timed region: they only set instance attributes.
        with mmreduce.patch_vit(model, r) as handle:
            elapsed = forward()
        merged_per_block[r], tokens_per_block[r] = handle.r, handle.tokens_per_block
        return elapsed

    variants: list[int | None] = [None, *config.r_values]
    for r in variants:
        for _ in range(config.warmup):
            timed_forward(r)
    wall: dict[int | None, list[float]] = {r: [] for r in variants}
    cpu: dict[int | None, list[float]] = {r: [] for r in variants}
    for repeat in range(config.repeats):
        for r in variants:
            wall_s, cpu_s = timed_forward(r)
            wall[r].append(wall_s)
            cpu[r].append(cpu_s)
        log(f"repeat {repeat + 1}/{config.repeats}: "
            + ", ".join(f"{_label(r)} {config.batch / wall[r][-1]:.2f} img/s" for r in variants))

    depth = len(model.blocks)
    merged_per_block[None] = (0,) * depth
    tokens_per_block[None] = [model.patch_embed.num_patches + model.num_prefix_tokens] * depth
    base_rate = config.batch / statistics.median(wall[None])
    base_cpu_rate = config.batch / statistics.median(cpu[None])
    base_flops = predicted_flops(model, merged_per_block[None])
    rows = []
    for r in variants:
        rates = [config.batch / s for s in wall[r]]
        median = statistics.median(rates)
        # Images per CPU-second of this process: less sensitive than wall time to other processes on the
        # machine (it does not count time spent waiting for a core), though caches are still shared.
        cpu_rate = config.batch / statistics.median(cpu[r])
        flops = predicted_flops(model, merged_per_block[r])
        rows.append({
            "r": r,
            "label": _label(r),
            "merged_per_block": list(merged_per_block[r]),
            "tokens_after_last_block": tokens_per_block[r][-1],
            "images_per_s_median": median,
            "images_per_s_min": min(rates),
            "images_per_s_max": max(rates),
            "images_per_s_all": rates,
            "speedup_vs_unpatched": median / base_rate,
            "images_per_cpu_s_median": cpu_rate,
            "cpu_speedup_vs_unpatched": cpu_rate / base_cpu_rate,
            "gflops_per_image": flops / 1e9,
            "flops_predicted_speedup": base_flops / flops,
        })
    return {
        "config": asdict(config),
        "environment": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
        "rows": rows,
    }


def _label(r: int | None) -> str:
    return "unpatched" if r is None else f"r={r}"


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def to_markdown(result: dict) -> str:
    lines = [
        ("| model | tokens after the last block | images/s (median) | min-max | speedup vs unpatched "
         "| images per CPU-s | CPU-time speedup | FLOPs-predicted |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['label']} | {row['tokens_after_last_block']} | {row['images_per_s_median']:.2f} | "
            f"{row['images_per_s_min']:.2f}-{row['images_per_s_max']:.2f} | {row['speedup_vs_unpatched']:.2f}× | "
            f"{row['images_per_cpu_s_median']:.2f} | {row['cpu_speedup_vs_unpatched']:.2f}× | "
            f"{row['flops_predicted_speedup']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ThroughputConfig()
    parser.add_argument("--out", type=Path, default=Path("runs/vit-throughput.json"), help="JSON to write")
    parser.add_argument("--model", default=defaults.model_name, help="a timm ViT name (built with random weights)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--r", type=int, nargs="+", default=list(defaults.r_values), help="merge rates per block")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    try:
        config = ThroughputConfig(model_name=args.model, batch=args.batch, r_values=tuple(args.r),
                                  warmup=args.warmup, repeats=args.repeats, threads=args.threads)
    except ValueError as error:
        parser.error(str(error))
    result = run_benchmark(config, log=lambda message: print(message, file=sys.stderr))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(to_markdown(result))
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
