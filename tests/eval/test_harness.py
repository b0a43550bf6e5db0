"""`mmreduce bench` (mmreduce.eval.harness): the results schema, resuming from the cache, data-parallel shards.

The SPEC parser and budget fitting it uses are tested in tests/core/test_spec.py.
"""

from __future__ import annotations

import json

import pytest

from mmreduce.eval.harness import RESULT_FIELDS, BenchConfig, run_bench


def test_results_schema_and_resume(tmp_path, untrained_tiny_checkpoint):
    checkpoint = untrained_tiny_checkpoint
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


@pytest.mark.slow  # two torchrun processes: about 9 s
def test_data_parallel_shards_give_the_same_results(tmp_path, untrained_tiny_checkpoint):
    """Two processes (torchrun, gloo on CPU) evaluate half the batches each; rank 0 gathers identical results."""
    import os
    import subprocess
    import sys

    checkpoint = untrained_tiny_checkpoint
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
