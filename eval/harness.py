"""The side-by-side harness: accuracy, tokens, FLOPs, latency and memory for each method on one benchmark.

    rows = run_bench(BenchConfig(model="tiny-llava-shapes", dataset="shapes", specs=["baseline", "fastv"],
                                 samples=200, seed=0, out="runs/shapes"))

Under `torchrun --nproc_per_node N` (or `accelerate launch`), the batches are sharded across the N processes
(data parallel) and gathered on rank 0, which writes the results.

For every spec, batches are evaluated with greedy `generate()` through `mmreduce.wrap`; each finished batch is
appended to `OUT/cache/<spec>.jsonl`, so an interrupted run resumes where it stopped. `OUT/results.json`,
`OUT/results.md` and `OUT/accuracy_vs_flops.png` are written at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import mmreduce

from .spec import MethodSpec, parse_spec

__all__ = ["BenchConfig", "RESULT_FIELDS", "plot_results", "results_markdown", "run_bench"]

#: Every record of results.json carries at least these fields.
RESULT_FIELDS = ("method", "spec", "accuracy", "samples", "equivalent_vision_tokens", "vision_tokens",
                 "prefill_flops", "baseline_prefill_flops", "flops_ratio", "prefill_ms", "decode_ms_per_token",
                 "peak_mem_mb", "kv_cache_mb", "note")


@dataclass
class BenchConfig:
    """One `mmreduce bench` run.

    model: a bundled tiny checkpoint name or a local checkpoint directory; dataset: a benchmark name;
    specs: method specs (`eval/spec.py`); samples / seed / split: which items; batch_size; out: output directory;
    max_new_tokens: answer length; device: "cpu", "cuda" or "auto".
    """

    model: str
    dataset: str
    specs: Sequence[str]
    samples: int = 200
    seed: int = 0
    split: str = "test"
    batch_size: int = 16
    out: str = "runs/bench"
    max_new_tokens: int = 3
    device: str = "auto"
    progress: bool = True
    benchmark_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.specs:
            raise ValueError("BenchConfig.specs must name at least one method (e.g. baseline)")
        if self.samples < 1:
            raise ValueError(f"BenchConfig.samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"BenchConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"BenchConfig.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class _Shard:
    """This process's share of the batches under `torchrun` / `accelerate launch` (data parallel)."""

    rank: int = 0
    world: int = 1
    state: object = None

    @classmethod
    def detect(cls, device: str) -> "_Shard":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu")
        return cls(state.process_index, state.num_processes, state)

    def gather(self, items: list) -> list:
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def _resolve_device(config: BenchConfig) -> str:
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _load(config: BenchConfig, device: str):
    from .tiny_models import load_tiny

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, processor = load_tiny(config.model, dtype=dtype)
    return model.to(device), processor


def _samples(config: BenchConfig):
    from .benchmarks import load_benchmark

    return load_benchmark(config.dataset, config.split, config.samples, seed=config.seed, **config.benchmark_options)


def _batch_inputs(processor, samples, device: str):
    """The processor batch of `samples` (prompts left-padded, as `accuracy.generate_answers` builds it) on `device`."""
    from .accuracy import _batch_inputs as build

    return {k: v.to(device) for k, v in build(processor, samples).items()}


def _checkpoint_fingerprint(model: str) -> str:
    """Changes whenever the checkpoint's weights do, so a retrained model never reuses stale cached batches."""
    from .tiny_models import resolve_checkpoint

    try:
        folder = resolve_checkpoint(model)
    except ValueError:
        return model
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cache_path(out: Path, config: BenchConfig, spec: MethodSpec, shard: "_Shard") -> Path:
    key = json.dumps([config.model, _checkpoint_fingerprint(config.model), config.dataset, config.split, config.seed,
                      config.samples, config.batch_size, config.max_new_tokens, spec.text, config.benchmark_options],
                     sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() else "_" for c in spec.text)[:40]
    suffix = f".rank{shard.rank}of{shard.world}" if shard.world > 1 else ""
    return out / "cache" / f"{safe}-{digest}{suffix}.jsonl"


def _vision_tokens_per_image(model, processor, sample, device) -> int:
    inputs = _batch_inputs(processor, [sample], device)
    token_id = model.config.image_token_id
    return int((inputs["input_ids"] == token_id).sum())


def _evaluate_spec(model, processor, samples, spec: MethodSpec, method, config: BenchConfig, device: str,
                   cache_file: Path, shard: _Shard, log: Callable[[str], None]) -> list[dict]:
    from tqdm.auto import tqdm

    from .accuracy import normalize_answer

    done = []
    if cache_file.exists():
        done = [json.loads(line) for line in cache_file.read_text().splitlines() if line.strip()]
        if done:
            log(f"  {spec.text}: resuming after {len(done)} cached batch(es)")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(samples), config.batch_size))[shard.rank::shard.world]
    pad = processor.tokenizer.pad_token_id
    with open(cache_file, "a") as sink:
        for start in tqdm(starts[len(done):], desc=spec.text, disable=not config.progress, leave=False):
            batch = samples[start:start + config.batch_size]
            inputs = _batch_inputs(processor, batch, device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            target = mmreduce.wrap(model, method) if method is not None else mmreduce.wrap(model, "schedule",
                                                                                           keep=[1.0] * _depth(model))
            try:
                with torch.inference_mode():
                    out = target.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False,
                                          pad_token_id=pad, return_dict_in_generate=True)
                stats = target.stats
            finally:
                target.unwrap()
            new = out.sequences[:, inputs["input_ids"].shape[1]:]
            answers = [normalize_answer(t) for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers) if cache else 0
            flops, baseline_flops = stats.flops()
            record = {
                "start": start,
                "correct": [a == s.answer for a, s in zip(answers, batch)],
                "answers": answers,
                "equivalent_vision_tokens": stats.equivalent_vision_tokens,
                "vision_tokens": statistics.mean(stats.initial_vision_tokens),
                "prefill_flops": flops / len(batch),
                "baseline_prefill_flops": baseline_flops / len(batch),
                "prefill_ms": stats.prefill_ms,
                "decode_ms_per_token": stats.decode_ms_per_token,
                "kv_cache_mb": kv_bytes / 2**20,
                "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done.append(record)
    return done


def _depth(model) -> int:
    return model.config.text_config.num_hidden_layers


def _summarise(spec: MethodSpec, method, batches: list[dict], note: str = "") -> dict:
    correct = [c for b in batches for c in b["correct"]]
    weights = [len(b["correct"]) for b in batches]

    def mean(key):
        values = [(b[key], w) for b, w in zip(batches, weights) if b[key] is not None]
        return sum(v * w for v, w in values) / sum(w for _, w in values) if values else None

    flops, baseline = mean("prefill_flops"), mean("baseline_prefill_flops")
    return {
        "method": spec.name if method is None else method.describe(),
        "spec": spec.text,
        "accuracy": sum(correct) / len(correct),
        "samples": len(correct),
        "equivalent_vision_tokens": mean("equivalent_vision_tokens"),
        "vision_tokens": mean("vision_tokens"),
        "prefill_flops": flops,
        "baseline_prefill_flops": baseline,
        "flops_ratio": flops / baseline if baseline else None,
        "prefill_ms": statistics.median(b["prefill_ms"] for b in batches),
        "decode_ms_per_token": statistics.median(
            [b["decode_ms_per_token"] for b in batches if b["decode_ms_per_token"] is not None] or [0.0]),
        "peak_mem_mb": max(b["peak_mem_mb"] for b in batches),
        "kv_cache_mb": mean("kv_cache_mb"),
        "note": note,
        "predictions": [a for b in batches for a in b["answers"]],
    }


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Evaluates every spec; returns the result records (also written to `config.out`)."""
    specs = [parse_spec(text) for text in config.specs]
    from .seed_vlm import is_seed_vlm, run_seed_bench

    if is_seed_vlm(config.model):  # a SEED-token VLM has no vision tower to wrap: eval/seed_vlm.py evaluates it
        return run_seed_bench(config, specs, log)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(config)
    shard = _Shard.detect(device)
    if shard.rank != 0:
        log = lambda message: None  # noqa: E731 - one process speaks
    model, processor = _load(config, device)
    samples = _samples(config)
    depth = _depth(model)
    vision = _vision_tokens_per_image(model, processor, samples[0], device)
    log(f"{config.model} on {config.dataset}/{config.split}: {len(samples)} samples, {depth} layers, "
        f"{vision} vision tokens per prompt, batch {config.batch_size}, {device}"
        + (f", {shard.world} processes" if shard.world > 1 else ""))
    rows = []
    for spec in specs:
        try:
            method = spec.build(depth, vision)
        except ValueError as error:
            log(f"  {spec.text}: skipped ({error})")
            rows.append({**{key: None for key in RESULT_FIELDS}, "method": spec.name, "spec": spec.text,
                         "samples": 0, "note": f"skipped: {error}"})
            continue
        start = time.perf_counter()
        batches = _evaluate_spec(model, processor, samples, spec, method, config, device,
                                 _cache_path(out, config, spec, shard), shard, log)
        batches = sorted(shard.gather(batches), key=lambda batch: batch["start"])
        row = _summarise(spec, method, batches)
        rows.append(row)
        log(f"  {spec.text}: accuracy {row['accuracy']:.3f}, {row['equivalent_vision_tokens']:.1f} eq. tokens, "
            f"FLOPs {row['flops_ratio']:.0%} ({time.perf_counter() - start:.0f} s)")
    if shard.rank != 0:
        return rows
    meta = {"config": {k: v for k, v in asdict(config).items() if k != "progress"}, "device": device,
            "processes": shard.world}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "results.md").write_text(results_markdown(rows) + "\n")
    plot_results(rows, out / "accuracy_vs_flops.png", title=f"{config.model} on {config.dataset}")
    return rows


def results_markdown(rows: list[dict]) -> str:
    lines = ["| spec | method | accuracy | eq. vision tokens | prefill FLOPs (vs baseline) | prefill ms / batch "
             "| decode ms/token | KV cache MB | peak mem MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["accuracy"] is None:
            lines.append(f"| {r['spec']} | — | — | — | — | — | — | — | {r['note']} |")
            continue
        lines.append(
            f"| {r['spec']} | {r['method']} | {100 * r['accuracy']:.1f}% | {r['equivalent_vision_tokens']:.1f} | "
            f"{r['prefill_flops'] / 1e9:.3f} G ({100 * r['flops_ratio']:.0f}%) | {r['prefill_ms']:.1f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['kv_cache_mb']:.2f} | {r['peak_mem_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot_results(rows: list[dict], path: os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    families: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        if r["accuracy"] is None:
            continue
        family = r["spec"].split(":")[0]
        families.setdefault(family, []).append((100 * r["flops_ratio"], 100 * r["accuracy"], r["spec"]))
    for family, points in sorted(families.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    ax.set_xlabel("prefill FLOPs (% of baseline)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
