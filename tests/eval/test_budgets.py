"""Budgets are promises: a P-Sigmoid schedule over its budget is refused by `mmreduce tune` (or written marked
`"budget_met": false` with a warning), and `mmreduce compare` never shows it as an equal-budget result."""

from __future__ import annotations

import argparse
import json
import re

import pytest

import mmreduce
from mmreduce.eval.compare import budget_check, comparison_markdown
from mmreduce.eval.tune import add_subparser
from mmreduce.methods.schedule import Schedule
from mmreduce.schedules import Budget, psigmoid_schedule, tune_psigmoid


def _middle_layers(keep: list[float]) -> float:  # a toy objective: tokens in the middle layers help
    return sum(keep[2:6]) / 4


# ----- tune_psigmoid and the schedule it gives -----
def test_a_missed_budget_is_flagged_not_hidden():
    # Two random trials cannot reach a mean keep of 0.14 on 8 layers (layer 0 alone is 0.125).
    result = tune_psigmoid(8, _middle_layers, Budget("equivalent", 0.14), trials=2, init_points=2, seed=0,
                           progress=False)
    assert result.cost > 0.14 and not result.budget_met
    assert re.fullmatch(r"P-Sigmoid found no schedule within the budget: the cheapest of 2 trials costs "
                        r"0\.\d{3} > equivalent budget 0\.14", result.over_budget_message())
    assert result.budget_fields() == {"budget_met": False, "cost": round(result.cost, 6),
                                      "budget_kind": "equivalent", "budget_value": 0.14}
    note = psigmoid_schedule(result, "toy", Budget("equivalent", 0.14)).budget
    assert note.endswith(f"OVER BUDGET (cost {result.cost:.4f})")


def test_a_met_budget_says_so():
    result = tune_psigmoid(8, _middle_layers, Budget("equivalent", 1.0), trials=2, init_points=2, seed=0,
                           progress=False)
    assert result.budget_met and result.over_budget_message() == ""
    assert result.budget_fields()["budget_met"] is True
    assert "OVER BUDGET" not in psigmoid_schedule(result, "toy", Budget("equivalent", 1.0)).budget


# ----- mmreduce tune -----
def _tune_args(checkpoint: str, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tune", "--model", checkpoint, "--samples", "2", "--batch-size", "2",
                              "--method", "psigmoid", "--out", str(out), *extra])


def test_tune_refuses_a_schedule_over_its_budget(untrained_tiny_checkpoint, tmp_path):
    out = tmp_path / "psig.json"
    args = _tune_args(untrained_tiny_checkpoint, out, "--budget", "0.14", "--trials", "1")
    with pytest.raises(ValueError) as caught:
        args.func(args)
    message = str(caught.value)
    assert re.fullmatch(
        r"P-Sigmoid found no schedule within the budget: the cheapest of 1 trials costs 0\.\d{3} > equivalent "
        r"budget 0\.14; nothing written to \S+psig\.json\. To fix: run more --trials \(now 1\), loosen --budget, or "
        r"pass --allow-over-budget to write it marked \"budget_met\": false", message), message
    assert not out.exists() and not out.with_suffix(".log.json").exists()


def test_tune_writes_an_over_budget_schedule_only_when_allowed_and_marks_it(untrained_tiny_checkpoint, tmp_path,
                                                                            capsys):
    out = tmp_path / "psig.json"
    args = _tune_args(untrained_tiny_checkpoint, out, "--budget", "0.14", "--trials", "1", "--allow-over-budget")
    assert args.func(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "costs" in warnings[0] and "> equivalent budget 0.14" in warnings[0]
    data = json.loads(out.read_text())
    assert data["budget_met"] is False and data["cost"] > 0.14 and data["budget_value"] == 0.14
    assert data["cost"] == pytest.approx(sum(data["keep"]) / len(data["keep"]), abs=1e-6)
    schedule = Schedule(path=str(out))  # the extra keys stay readable
    assert len(schedule.keep) == 8 and "OVER BUDGET" in schedule.budget
    assert json.loads(out.with_suffix(".log.json").read_text())["budget_met"] is False


def test_tune_marks_a_schedule_within_budget(untrained_tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "psig.json"
    args = _tune_args(untrained_tiny_checkpoint, out, "--budget", "1.0", "--trials", "1")
    assert args.func(args) == 0
    assert "WARNING" not in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["budget_met"] is True and data["cost"] <= 1.0
    assert Schedule(path=str(out)).keep[0] == 1.0


@pytest.mark.parametrize("extra, pattern", [
    ((), r"^--budget is required for --method psigmoid \(e\.g\. --budget 0\.22 or --budget flops=0\.4\)$"),
    (("--budget", "tokens=3"), r"^cannot read budget 'tokens=3': Budget\.kind must be"),
    (("--budget", "0.2", "--trials", "0"), r"^--trials must be >= 1, got 0$"),
    (("--budget", "0.2", "--out", "."),  # the last --out wins
     r"^--out '\.' is a folder; give the schedule file to write \(e\.g\. 'psigmoid\.json'\)$"),
])
def test_tune_refuses_bad_arguments_before_loading_anything(tmp_path, extra, pattern):
    args = _tune_args("no-such-model", tmp_path / "x.json", *extra)  # the model is never loaded
    with pytest.raises(ValueError, match=pattern):
        args.func(args)


def test_tune_refuses_a_budget_below_one_layer(untrained_tiny_checkpoint, tmp_path):
    args = _tune_args(untrained_tiny_checkpoint, tmp_path / "x.json", "--budget", "0.05", "--trials", "1")
    with pytest.raises(ValueError, match=r"^--budget 0\.05 is below 1/8 = 0\.125: layer 0 keeps every vision token"):
        args.func(args)


# ----- compare: the equal-budget table and summary -----
def _row(spec: str, accuracy: float, tokens: float, flops: float) -> dict:
    return {"spec": spec, "accuracy": accuracy, "equivalent_vision_tokens": tokens, "flops_ratio": flops}


def _summary(psigmoid_keep: list[float], flops: float) -> dict:
    """A compare summary at one budget (0.333) whose P-Sigmoid schedule keeps `psigmoid_keep` (`flops` measured)."""
    gsearch_keep = [1.0, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.0]
    return {
        "budgets_run": [0.333], "skipped_budgets": {},
        "searches": {
            "gsearch": {"epsilon": 0.01, "keep": [1.0] * 8},
            "gsearch-0.333": {"budget": 0.333, "keep": gsearch_keep},
            "psigmoid-0.333": {"budget": 0.333, "keep": psigmoid_keep},
        },
        "results": [
            _row("baseline", 0.935, 256, 1.0),
            _row("schedule:path=run/schedules/gsearch.json", 0.92, 144, 0.54),
            _row("random:layer=1,equivalent=0.333", 0.69, 84, 0.31),
            _row("fastv:layer=1,equivalent=0.333", 0.29, 84, 0.31),
            _row("pdrop:layers=1+3+5,equivalent=0.333", 0.68, 85, 0.32),
            _row("schedule:path=run/schedules/gsearch-0.333.json", 0.72, 82, 0.31),
            _row("schedule:path=run/schedules/psigmoid-0.333.json", 0.70, 256 * sum(psigmoid_keep) / 8, flops),
        ],
    }


OVER = [1.0, 0.6, 0.4, 0.4, 0.3, 0.3, 0.1, 0.18]  # mean 0.41
WITHIN = [1.0, 0.5, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1]  # mean 0.325


def test_an_over_budget_schedule_is_marked_in_its_cell_and_named_under_the_table():
    lines = comparison_markdown(_summary(OVER, 0.41)).splitlines()
    row = next(line for line in lines if line.startswith("| 33.3% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "**70.0%** (105 tok, 41% FLOPs; over budget: 0.41 > 0.333)"
    assert all("over budget" not in c for c in cells[:5])  # random, fastv, pdrop, G-Search stay as they were
    assert lines[-1] == ("**Over budget, not an equal-budget result:** `psigmoid-0.333` keeps 0.41 of the vision "
                         "tokens on average, over its budget of 0.333.")


def test_schedules_within_budget_keep_the_plain_table():
    text = comparison_markdown(_summary(WITHIN, 0.32))
    assert "over budget" not in text.lower()
    row = next(line for line in text.splitlines() if line.startswith("| 33.3% |"))
    assert row.endswith("| **70.0%** (83 tok, 32% FLOPs) |")


def test_budget_check_of_each_row():
    summary = _summary(OVER, 0.41)
    checks = [budget_check(row, summary) for row in summary["results"]]
    assert checks[:5] == [None] * 5  # baseline, own-point G-Search (no budget), fitted random / FastV / PyramidDrop
    assert checks[5] == {"budget": 0.333, "mean_keep": 0.3125, "budget_met": True}
    assert checks[6] == {"budget": 0.333, "mean_keep": 0.41, "budget_met": False}


def test_compare_writes_and_flags_an_over_budget_psigmoid(untrained_tiny_checkpoint, tmp_path, capsys):
    """About 1 s: 2 calibration and 2 test samples on the untrained model; one P-Sigmoid trial misses 0.4 (it keeps
    0.90), G-Search fits it."""
    from mmreduce.eval.compare import run_compare

    out = tmp_path / "cmp"
    summary = run_compare(untrained_tiny_checkpoint, "shapes", str(out), budgets=(0.4,), calibration_samples=2,
                          samples=2, grid=4, trials=1, batch_size=2, progress=False)
    assert any(line.startswith("WARNING: psigmoid-0.4 keeps") for line in capsys.readouterr().err.splitlines())
    saved = json.loads((out / "summary.json").read_text())
    assert saved["over_budget"] == summary["over_budget"] == ["psigmoid-0.4"]
    assert saved["searches"]["psigmoid-0.4"]["budget_met"] is False
    assert saved["searches"]["gsearch-0.4"]["budget_met"] is True
    rows = {row["spec"].rsplit("/", 1)[-1]: row for row in saved["results"]}
    assert rows["psigmoid-0.4.json"]["budget_met"] is False and rows["psigmoid-0.4.json"]["mean_keep"] > 0.4
    assert rows["gsearch-0.4.json"]["budget_met"] is True
    schedule_json = json.loads((out / "schedules" / "psigmoid-0.4.json").read_text())
    assert schedule_json["budget_met"] is False and Schedule(path=str(out / "schedules" / "psigmoid-0.4.json"))
    table = (out / "comparison.md").read_text()
    assert re.search(r"\| 40\.0% \|.*; over budget: 0\.\d+ > 0\.4\) \|$", table, re.M)
    assert "`psigmoid-0.4` keeps" in table.splitlines()[-1]


@pytest.mark.parametrize("spec", ["visionzip:equivalent=300", "pdrop:equivalent=257"])
def test_a_budget_above_the_available_tokens_is_refused(spec):
    with pytest.raises(ValueError, match=r"asks for (300|257) vision tokens, but the prompt has 256"):
        mmreduce.parse_spec(spec).build(num_layers=8, vision_tokens=256)


def test_methods_added_with_with_get_their_own_column_at_each_budget():
    summary = _summary(WITHIN, 0.32)
    summary["with_methods"] = ["visionzip", "stride"]
    summary["results"] += [_row("visionzip:equivalent=0.333", 0.895, 85, 0.29),
                           _row("stride:equivalent=0.333", 0.855, 85, 0.29)]
    lines = comparison_markdown(summary).splitlines()
    assert lines[0] == "| budget (mean kept) | random | fastv | pdrop | gsearch | psigmoid | visionzip | stride |"
    row = next(line for line in lines if line.startswith("| 33.3% |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6:] == ["**89.5%** (85 tok, 29% FLOPs)", "**85.5%** (85 tok, 29% FLOPs)"]
    assert all(line.count("|") == lines[0].count("|") for line in lines[:4])  # every row spans every column
