"""`mmreduce compare` (mmreduce.eval.compare): rank analysis, G-Search and P-Sigmoid schedules, and the
equal-budget table and figure, on an untrained tiny model."""

from __future__ import annotations

import json

import pytest

from mmreduce.eval.compare import _family, run_compare
from mmreduce.methods.schedule import Schedule


@pytest.mark.slow  # rank analysis, three searches, five evaluations and two figures: about 3 s
def test_compare_writes_rank_schedules_and_an_equal_budget_table(tmp_path, untrained_tiny_checkpoint):
    checkpoint = untrained_tiny_checkpoint
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
    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000
    assert [_family(spec) for spec in specs] == ["baseline", "gsearch", "random", "fastv", "pdrop", "gsearch",
                                                 "psigmoid"]
