"""`mmreduce bench`: spec parsing, budget fitting, the results schema and resuming from the cache."""

from __future__ import annotations

import json

import pytest

from mmreduce.eval.harness import RESULT_FIELDS, BenchConfig, run_bench
from mmreduce import Baseline, fit_equivalent, parse_spec


def test_spec_parsing():
    spec = parse_spec("pdrop:layers=2+4+6,keep_ratio=0.5")
    assert spec.name == "pdrop" and dict(spec.kwargs) == {"layers": (2, 4, 6), "keep_ratio": 0.5}
    assert isinstance(parse_spec("baseline").build(), Baseline)  # the unreduced model is a registered method
    assert parse_spec("random:seed=3,layer=1").build().seed == 3
    for bad, message in [("fastv:ratio=1", "no field 'ratio'"), ("nope", "unknown method"),
                         ("fastv:layer", "not key=value"), ("baseline:x=1", "no parameters"),
                         ("fastv:keep_ratio=0.5,equivalent=0.3", "either keep_ratio or equivalent"),
                         ("schedule:equivalent=0.3", "needs a method with a keep_ratio")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


def test_equivalent_budget_is_met_or_refused():
    method = fit_equivalent("pdrop", {"layers": (1, 3, 5)}, 0.25, 8, 256)
    assert sum(method.planned_counts(8, 256)) / 8 == pytest.approx(64, abs=0.5)
    method = fit_equivalent("fastv", {"layer": 2}, 100, 32, 576)  # an absolute count
    assert sum(method.planned_counts(32, 576)) / 32 == pytest.approx(100, abs=0.5)
    with pytest.raises(ValueError, match="cannot reach .* its minimum is"):
        fit_equivalent("fastv", {"layer": 2}, 0.2, 8, 256)  # layers 0-1 alone are 25%


def _tiny_checkpoint(tmp_path):
    from mmreduce.eval.tiny_models import build_tiny, save_tiny

    model, processor = build_tiny("tiny-llava-shapes", seed=0)
    return str(save_tiny(model, processor, tmp_path / "untrained"))


def test_results_schema_and_resume(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path)
    config = BenchConfig(model=checkpoint, dataset="shapes", samples=6, batch_size=3, out=str(tmp_path / "run"),
                         specs=["baseline", "fastv:layer=2,keep_ratio=0.25", "pdrop:layers=1+3+5,equivalent=0.05"],
                         progress=False)
    rows = run_bench(config, log=lambda message: None)
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert [r["spec"] for r in results] == config.specs
    for record in results:
        assert set(RESULT_FIELDS) <= set(record)
    baseline, fastv, skipped = results
    assert baseline["flops_ratio"] == 1.0 and baseline["samples"] == 6
    assert fastv["equivalent_vision_tokens"] == pytest.approx((2 * 256 + 6 * 64) / 8)
    assert fastv["prefill_flops"] < baseline["prefill_flops"]
    assert skipped["accuracy"] is None and "cannot reach" in skipped["note"]
    assert (tmp_path / "run" / "results.md").read_text().count("\n| ") == 3  # one line per spec
    assert (tmp_path / "run" / "accuracy_vs_flops.png").stat().st_size > 1000

    # A second run with one batch of FastV missing from the cache recomputes only that batch.
    cache_file = next((tmp_path / "run" / "cache").glob("fastv*.jsonl"))
    lines = cache_file.read_text().splitlines()
    cache_file.write_text(lines[0] + "\n")
    logged = []
    again = run_bench(config, log=logged.append)
    assert any("resuming after 1 cached batch" in line for line in logged)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert len(cache_file.read_text().splitlines()) == 2


def test_data_parallel_shards_give_the_same_results(tmp_path):
    """Two processes (torchrun, gloo on CPU) evaluate half the batches each; rank 0 gathers identical results."""
    import os
    import subprocess
    import sys

    checkpoint = _tiny_checkpoint(tmp_path)
    specs = ["baseline", "pdrop:layers=1+3+5,keep_ratio=0.5"]
    single = run_bench(BenchConfig(model=checkpoint, dataset="shapes", samples=8, batch_size=2, specs=specs,
                                   out=str(tmp_path / "single"), progress=False), log=lambda message: None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "-m", "mmreduce.cli", "bench", "--model", checkpoint,
               "--dataset", "shapes", "--samples", "8", "--batch-size", "2", "--no-progress",
               "--out", str(tmp_path / "sharded"), "--methods", *specs]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    sharded = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert sharded["meta"]["processes"] == 2
    for alone, parallel in zip(single, sharded["results"]):
        assert parallel["samples"] == alone["samples"] == 8
        assert parallel["accuracy"] == alone["accuracy"]
        assert parallel["predictions"] == alone["predictions"]
        assert parallel["equivalent_vision_tokens"] == pytest.approx(alone["equivalent_vision_tokens"])
    caches = sorted(p.name for p in (tmp_path / "sharded" / "cache").iterdir())
    assert any(".rank0of2" in name for name in caches) and any(".rank1of2" in name for name in caches)


def test_compare_writes_rank_schedules_and_an_equal_budget_table(tmp_path):
    from mmreduce.eval.compare import run_compare
    from mmreduce.methods.schedule import Schedule

    checkpoint = _tiny_checkpoint(tmp_path)
    summary = run_compare(checkpoint, "shapes", str(tmp_path / "cmp"), budgets=(0.5, 0.1), calibration_samples=4,
                          samples=4, grid=4, trials=3, batch_size=4, progress=False)
    out = tmp_path / "cmp"
    assert (out / "rank" / "kendall_tau.png").stat().st_size > 1000
    assert "below 1/8" in summary["skipped_budgets"]["0.1"]
    for name in ("gsearch", "gsearch-0.5", "psigmoid-0.5"):
        schedule = Schedule(path=str(out / "schedules" / f"{name}.json"))
        assert len(schedule.keep) == 8 and schedule.keep[0] == 1.0
        assert (out / "schedules" / f"{name}.log.json").is_file()
    assert sum(Schedule(path=str(out / "schedules" / "gsearch-0.5.json")).keep) / 8 <= 0.5
    specs = [row["spec"] for row in summary["results"]]
    assert specs[0] == "baseline" and len(specs) == 2 + 5  # baseline, own G-Search, then 5 rows for budget 0.5
    assert all(row["samples"] == 4 for row in summary["results"])
    reduced = [row for row in summary["results"][2:] if not row["spec"].endswith("psigmoid-0.5.json")]
    assert all(row["equivalent_vision_tokens"] <= 0.5 * 256 + 1 for row in reduced)
    assert json.loads((out / "summary.json").read_text())["searches"]["gsearch-0.5"]["evaluations"] >= 1
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].split("|")[2:7] == [" random ", " fastv ", " pdrop ", " gsearch ", " psigmoid "]
    assert table[4].startswith("| 50.0% |") and table[4].count("% FLOPs") == 5
    assert table[5].startswith("| 10.0% | skipped")
    from mmreduce.eval.compare import _family

    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000
    assert [_family(spec) for spec in specs] == ["baseline", "gsearch", "random", "fastv", "pdrop", "gsearch",
                                                 "psigmoid"]
