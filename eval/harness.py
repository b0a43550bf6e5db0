"""The side-by-side harness: accuracy, tokens, FLOPs, latency and memory for each method on one benchmark.

    rows = run_bench(BenchConfig(model="tiny-llava-shapes", dataset="shapes", specs=["baseline", "fastv"],
                                 samples=200, seed=0, out="runs/shapes"))

Under `torchrun --nproc_per_node N` (or `accelerate launch`), the batches are sharded across the N processes
(data parallel) and gathered on rank 0, which writes the results.

For every spec, batches are evaluated by the model's runner (`eval/runners.py`: greedy `generate()` through
`mmreduce.wrap` for a Hugging Face VLM); each finished batch is
appended to `OUT/cache/<spec>.jsonl`, so an interrupted run resumes where it stopped. `OUT/results.json`,
`OUT/results.md` and `OUT/accuracy_vs_flops.png` are written at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from mmreduce import Baseline, MethodSpec, parse_spec
from mmreduce.spec import BudgetUnreachable

from .accuracy import is_correct
from .runners import BATCH_FIELDS, Runner, load_runner

__all__ = ["BenchConfig", "RESULT_FIELDS", "plot_results", "results_markdown", "run_bench"]

#: Every record of results.json carries at least these fields. `peak_mem_mb` is the most memory one batch of the
#: method added on top of what was in use when it started (`runners.PeakMemory`), not the process's lifetime peak.
#: Every record also says whether it is a `reference` (the oracle's rows, eval/oracle.py: an upper bound, not a method).
RESULT_FIELDS = ("method", "spec", "accuracy", "samples", "equivalent_vision_tokens", "vision_tokens",
                 "prefill_flops", "baseline_prefill_flops", "flops_ratio", "prefill_ms", "decode_ms_per_token",
                 "peak_mem_mb", "kv_cache_mb", "note")


@dataclass
class BenchConfig:
    """One `mmreduce bench` run.

    model: a bundled tiny checkpoint name or a local checkpoint directory; dataset: a benchmark name;
    specs: method specs (`mmreduce.spec`); samples / seed / split: which items; batch_size; out: output directory;
    max_new_tokens: answer length; device: "cpu", "cuda" or "auto"; oracle: add an upper-reference row
    (eval/oracle.py) per `equivalent=F` budget of the specs, or per `oracle_budgets` entry when given.
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
    oracle: bool = False
    oracle_budgets: Sequence[float] = ()

    def __post_init__(self):
        if not self.specs:
            raise ValueError("BenchConfig.specs must name at least one method (e.g. baseline)")
        if self.samples < 1:
            raise ValueError(f"BenchConfig.samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"BenchConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"BenchConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"BenchConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for budget in self.oracle_budgets:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
                raise ValueError(f"BenchConfig.oracle_budgets must hold fractions in (0, 1] or token counts > 1, "
                                 f"got {budget!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out={self.out!r} is a file; give a folder for results.json, results.md and cache/")


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


def _samples(config: BenchConfig):
    from .benchmarks import load_benchmark

    return load_benchmark(config.dataset, config.split, config.samples, seed=config.seed, **config.benchmark_options)


#: Bumped whenever a cached batch record changes meaning, so old records are never read as new ones.
CACHE_FORMAT = 2


def _data_fingerprint(samples) -> str:
    """Changes whenever any sample's question, answer, choices or image pixels do."""
    digest = hashlib.sha1()
    for sample in samples:
        digest.update(json.dumps([sample.question, sample.answer, list(sample.choices)]).encode())
        for image in sample.images:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
    return digest.hexdigest()


def _cache_path(out: Path, config: BenchConfig, weights: str, data: str, spec: MethodSpec, method,
                device: str, shard: "_Shard") -> Path:
    """One file per (weights, data, method, options): a changed run never reads another run's batches."""
    key = json.dumps([CACHE_FORMAT, config.model, weights, data, config.dataset, config.split,
                      config.seed, config.samples, config.batch_size, config.max_new_tokens, spec.text,
                      method.describe(), device.split(":")[0], config.benchmark_options],
                     sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() else "_" for c in spec.text)[:40]
    suffix = f".rank{shard.rank}of{shard.world}" if shard.world > 1 else ""
    return out / "cache" / f"{safe}-{digest}{suffix}.jsonl"


def _read_cache(cache_file: Path, starts: list[int], log: Callable[[str], None]) -> dict[int, dict]:
    """The finished batches recorded in `cache_file`, by start index.

    A record is one line ending in a newline, written with a single write and fsync'ed. A line without its
    newline, or one that does not parse as a record of this run, is what an interrupted write leaves: it is
    dropped with a warning naming the file, the file is rewritten without it, and its batch runs again.
    """
    if not cache_file.exists():
        return {}
    data = cache_file.read_bytes()
    lines = data.split(b"\n")
    complete, torn = lines[:-1], lines[-1]  # the last piece lacks its newline (b"" when the file ends cleanly)
    records: dict[int, dict] = {}
    bad = 1 if torn.strip() else 0
    for line in complete:
        record = _parse_record(line, starts)
        if record is None:
            bad += bool(line.strip())
            continue
        records[record["start"]] = record
    if bad:
        log(f"  warning: {cache_file}: dropped {bad} torn or unreadable line(s) left by an interrupted run; "
            "their batches run again")
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
        os.replace(tmp, cache_file)
    return records


def _parse_record(line: bytes, starts: list[int]) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    needed = {"start", "correct", *BATCH_FIELDS}
    if not isinstance(record, dict) or not needed <= set(record) or record["start"] not in starts:
        return None
    return record


def _append_record(cache_file: Path, record: dict) -> None:
    """Appends one record as one line in one write, then fsyncs, so a kill leaves at most a torn last line."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    descriptor = os.open(cache_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _evaluate_spec(runner: Runner, samples, spec: MethodSpec, method, config: BenchConfig, cache_file: Path,
                   shard: _Shard, log: Callable[[str], None]) -> list[dict]:
    """Batch records of `method` on this process's share of `samples`; finished batches come from `cache_file`."""
    from tqdm.auto import tqdm

    starts = list(range(0, len(samples), config.batch_size))[shard.rank::shard.world]
    done = _read_cache(cache_file, starts, log)
    if done:
        log(f"  {spec.text}: resuming after {len(done)} cached batch(es)")
    for start in tqdm([s for s in starts if s not in done], desc=spec.text, disable=not config.progress,
                      leave=False):
        batch = samples[start:start + config.batch_size]
        result = runner.run_batch(batch, method, config.max_new_tokens)
        record = {"start": start,
                  "correct": [is_correct(a, s.answer) for a, s in zip(result["answers"], batch)], **result}
        _append_record(cache_file, record)
        done[start] = record
    return [done[start] for start in starts]


def _summarise(spec: MethodSpec, method, batches: list[dict], note: str = "", reference: bool = False) -> dict:
    correct = [c for b in batches for c in b["correct"]]
    weights = [len(b["correct"]) for b in batches]

    def mean(key):
        values = [(b[key], w) for b, w in zip(batches, weights) if b[key] is not None]
        return sum(v * w for v, w in values) / sum(w for _, w in values) if values else None

    flops, baseline = mean("prefill_flops"), mean("baseline_prefill_flops")
    return {
        "method": method.describe(),
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
        "reference": reference,
        "predictions": [a for b in batches for a in b["answers"]],
    }


def _skipped_row(spec: MethodSpec, reason: str) -> dict:
    return {**{key: None for key in RESULT_FIELDS}, "method": spec.name, "spec": spec.text, "samples": 0,
            "note": f"skipped: {reason}", "reference": spec.name == "oracle"}


def _plan(specs: list[MethodSpec], runner: Runner, depth: int, vision: int, model: str) -> list[tuple]:
    """(spec, method, None) for each spec the model can run, (spec, None, reason) for a budget it cannot reach
    or a method its runner does not serve; raises ValueError, before anything runs, for a method that does not
    fit the model at all (e.g. a drop layer out of range)."""
    plan = []
    for spec in specs:
        try:
            method = spec.build(depth, vision)
        except BudgetUnreachable as error:
            plan.append((spec, None, str(error)))
            continue
        reason = runner.unsupported(method)
        if reason is not None:
            plan.append((spec, None, reason))
            continue
        try:
            method.check_stages(depth)
            method.check_inputs(torch.tensor([vision]))
        except ValueError as error:
            raise ValueError(f"method {spec.text!r} does not fit {model} ({depth} layers, {vision} vision tokens): "
                             f"{error}") from None
        plan.append((spec, method, None))
    return plan


def _oracle_plan(config: BenchConfig, specs: list[MethodSpec], runner: Runner, vision: int, samples) -> list[tuple]:
    """(spec, OracleKeep, None) per oracle budget (`oracle_budgets`, else every `equivalent=F` among the specs), or
    (spec, None, reason) where the runner cannot hand the oracle its samples. The oracle reads the samples' target
    boxes (the answer's location): its rows are an upper reference, not a method."""
    from .oracle import OracleKeep, oracle_keep_ratio

    budgets = list(config.oracle_budgets)
    if config.oracle and not budgets:
        budgets = list(dict.fromkeys(spec.equivalent for spec in specs if spec.equivalent is not None))
        if not budgets:
            raise ValueError("--oracle adds one row per equivalent=F budget of the specs, and none has one; give "
                             "the budgets with --oracle-budgets F...")
    if budgets and any("target_boxes" not in sample.meta for sample in samples):
        raise ValueError(f"the oracle reads each sample's meta['target_boxes'] (the asked objects' pixel boxes), "
                         f"which {config.dataset} does not give; drop --oracle")
    plan = []
    for budget in budgets:
        spec = MethodSpec("oracle", (), budget, f"oracle@{budget:g} (upper reference)")
        if not runner.binds_samples:
            plan.append((spec, None, f"the {runner.kind} runner cannot hand the oracle its samples"))
            continue
        plan.append((spec, OracleKeep(keep_ratio=oracle_keep_ratio(budget, vision), seed=config.seed), None))
    return plan


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Evaluates every spec; returns the result records (also written to `config.out`)."""
    specs = [parse_spec(text) for text in config.specs]  # syntax and field types, before anything loads
    out = Path(config.out)
    device = _resolve_device(config)
    shard = _Shard.detect(device)
    if shard.rank != 0:
        log = lambda message: None  # noqa: E731 - one process speaks
    runner = load_runner(config.model, device)
    samples = _samples(config)
    depth = runner.num_layers
    vision = runner.vision_tokens(samples[0])
    log(f"{config.model} on {config.dataset}/{config.split}: {len(samples)} samples, {depth} layers, "
        f"{vision} vision tokens per prompt, batch {config.batch_size}, {device}"
        + (f", {shard.world} processes" if shard.world > 1 else ""))
    plan = _plan(specs, runner, depth, vision, config.model)  # every method checked before any batch runs
    plan += _oracle_plan(config, specs, runner, vision, samples)  # reference rows last
    weights, data = runner.fingerprint(), _data_fingerprint(samples)  # read once, not once per method
    if any(method is not None for _, method, _ in plan):
        # Untimed and unrecorded: first-call allocations and lazy set-up would otherwise be charged to whichever
        # method runs first (its prefill time and peak memory).
        runner.run_batch(samples[:config.batch_size], Baseline(), config.max_new_tokens)
    rows = []
    for spec, method, reason in plan:
        if method is None:
            log(f"  {spec.text}: skipped: {reason}")
            rows.append(_skipped_row(spec, reason))
            continue
        start = time.perf_counter()
        cache_file = _cache_path(out, config, weights, data, spec, method, device, shard)
        batches = _evaluate_spec(runner, samples, spec, method, config, cache_file, shard, log)
        batches = sorted(shard.gather(batches), key=lambda batch: batch["start"])
        row = _summarise(spec, method, batches, note=runner.note(batches), reference=spec.name == "oracle")
        rows.append(row)
        log(f"  {spec.text}: accuracy {row['accuracy']:.3f}, {row['equivalent_vision_tokens']:.1f} eq. tokens, "
            f"FLOPs {row['flops_ratio']:.0%} ({time.perf_counter() - start:.0f} s)")
    if shard.rank != 0:
        return rows
    meta = {"config": {k: v for k, v in asdict(config).items() if k != "progress"}, "device": device,
            "processes": shard.world, "runner": runner.kind}
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / "results.json", json.dumps({"meta": meta, "results": rows}, indent=2))
    _write_atomically(out / "results.md", results_markdown(rows) + "\n")
    plot_results(rows, out / "accuracy_vs_flops.png", title=f"{config.model} on {config.dataset}")
    return rows


def _write_atomically(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path` and renames it: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def results_markdown(rows: list[dict]) -> str:
    lines = ["| spec | method | accuracy | eq. vision tokens | prefill FLOPs (vs baseline) | prefill ms / batch "
             "| decode ms/token | KV cache MB | peak mem MB (batch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    references = [r for r in rows if r.get("reference")]
    for r in [r for r in rows if not r.get("reference")] + references:  # reference rows last
        if r["accuracy"] is None:
            lines.append(f"| {r['spec']} | — | — | — | — | — | — | — | {r['note']} |")
            continue
        lines.append(
            f"| {r['spec']} | {r['method']} | {100 * r['accuracy']:.1f}% | {r['equivalent_vision_tokens']:.1f} | "
            f"{r['prefill_flops'] / 1e9:.3f} G ({100 * r['flops_ratio']:.0f}%) | {r['prefill_ms']:.1f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['kv_cache_mb']:.2f} | {r['peak_mem_mb']:.0f} |"
        )
    if references:
        lines.append("\noracle rows keep the tokens under the asked objects first (they read where the answer is): "
                     "an upper reference, not a method.")
    return "\n".join(lines)


def plot_results(rows: list[dict], path: os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    families: dict[str, list[tuple[float, float, str]]] = {}
    references = []
    for r in rows:
        if r["accuracy"] is None:
            continue
        if r.get("reference"):
            references.append((100 * r["flops_ratio"], 100 * r["accuracy"]))
            continue
        family = r["spec"].split(":")[0]
        families.setdefault(family, []).append((100 * r["flops_ratio"], 100 * r["accuracy"], r["spec"]))
    for family, points in sorted(families.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    if references:
        references.sort()
        ax.plot([p[0] for p in references], [p[1] for p in references], marker="*", markersize=11, linestyle="--",
                color="black", label="oracle (upper reference)")
    ax.set_xlabel("prefill FLOPs (% of baseline)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
