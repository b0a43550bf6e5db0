"""An interrupted bench loses nothing: a torn cache line is dropped with a warning, a killed run resumes to exactly
the answers of an uninterrupted one, and a changed run never reads another run's batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmreduce.eval.harness import BenchConfig, run_bench
from mmreduce.eval.runners import PeakMemory

ROOT = Path(__file__).resolve().parents[2]
SPECS = ["baseline", "random:layer=2,keep_ratio=0.5"]


def _predictions(out: Path) -> dict[str, list[str]]:
    rows = json.loads((out / "results.json").read_text())["results"]
    return {row["spec"]: row["predictions"] for row in rows}


def _tear_last_line(cache_file: Path) -> None:
    """What a kill during a write leaves: the last record cut in the middle, no newline."""
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])


def test_a_torn_cache_line_is_dropped_with_a_warning_and_its_batch_runs_again(untrained_tiny_checkpoint, tmp_path):
    config = BenchConfig(model=untrained_tiny_checkpoint, dataset="shapes", specs=["baseline"], samples=6,
                         batch_size=2, out=str(tmp_path / "run"), device="cpu", progress=False)
    first = run_bench(config, log=lambda message: None)
    (cache_file,) = (tmp_path / "run" / "cache").iterdir()
    _tear_last_line(cache_file)
    assert len(cache_file.read_bytes().split(b"\n")) == 3  # two whole records and half of the third
    messages: list[str] = []
    second = run_bench(config, log=messages.append)
    warnings = [m for m in messages if "warning" in m]
    assert len(warnings) == 1 and str(cache_file) in warnings[0] and "dropped 1 torn" in warnings[0]
    assert any("resuming after 2 cached batch(es)" in m for m in messages)
    assert second[0]["predictions"] == first[0]["predictions"]
    assert cache_file.read_text().endswith("\n") and len(cache_file.read_text().splitlines()) == 3
    third: list[str] = []
    run_bench(config, log=third.append)
    assert not [m for m in third if "warning" in m]  # the file was repaired, not warned about again


def test_a_changed_run_does_not_reuse_cached_batches(untrained_tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    common = dict(model=untrained_tiny_checkpoint, specs=["baseline"], samples=2, batch_size=2, out=str(out),
                  device="cpu", progress=False)
    run_bench(BenchConfig(dataset="shapes", **common), log=lambda message: None)
    run_bench(BenchConfig(dataset="shapes", benchmark_options={"image_size": 96}, **common), log=lambda m: None)
    run_bench(BenchConfig(dataset="shapes", max_new_tokens=2, **common), log=lambda message: None)
    assert len(list((out / "cache").iterdir())) == 3


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_answers_of_an_uninterrupted_run(untrained_tiny_checkpoint, tmp_path):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "mmreduce.cli", "bench", "--model", untrained_tiny_checkpoint, "--dataset",
                "shapes", "--samples", "40", "--batch-size", "2", "--device", "cpu", "--no-progress", "--out",
                str(out), "--methods", *SPECS]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a few batches are on disk, mid-run
        files = list((killed / "cache").glob("*.jsonl")) if (killed / "cache").exists() else []
        if files and len(files[0].read_bytes().split(b"\n")) > 4:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists()
    (cache_file,) = (killed / "cache").glob("*.jsonl")
    _tear_last_line(cache_file)

    resumed = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: {cache_file}: dropped 1 torn" in resumed.stdout
    whole = tmp_path / "whole"
    subprocess.run(command(whole), cwd=ROOT, env=env, capture_output=True, check=True, timeout=600)
    assert _predictions(killed) == _predictions(whole)
    assert all(len(predictions) == 40 for predictions in _predictions(whole).values())


def test_peak_memory_is_measured_per_block_not_over_the_process_lifetime():
    with PeakMemory("cpu") as big:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        block += 1
        del block
    with PeakMemory("cpu") as small:
        torch.ones(1000).sum()
    assert big.peak_mb >= 48
    if not small.lifetime:  # Linux: the peak is reset per block
        assert small.peak_mb < 16
