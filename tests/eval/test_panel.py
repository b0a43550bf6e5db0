"""`mmreduce compare --panel` (mmreduce.eval.panel): the bootstrap interval, the aggregation of compare summaries,
the argument errors, and a tiny end-to-end run on two bundled checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mmreduce.eval.panel import bootstrap_interval, panel_from_summaries, panel_markdown

from mmreduce.cli import main


def _matrix(accuracies: list[float], samples: int) -> np.ndarray:
    """(models, samples) 0/1 with exactly round(a * samples) ones per model, in a seeded order."""
    rng = np.random.default_rng(1)
    rows = []
    for accuracy in accuracies:
        row = np.zeros(samples)
        row[:round(accuracy * samples)] = 1
        rows.append(rng.permutation(row))
    return np.stack(rows)


def test_bootstrap_interval_has_the_known_mean_and_contains_it():
    matrix = _matrix([0.9, 0.6, 0.75], 200)
    mean, low, high = bootstrap_interval(matrix, resamples=1000, seed=0)
    assert mean == pytest.approx(0.75)  # (0.9 + 0.6 + 0.75) / 3
    assert low < mean < high
    # Three paired models of 200 samples: the mean's standard error is at most that of one model at 75%
    # (sqrt(.75 * .25 / 200) = 3.1 points), so the 95% interval is narrower than +-2 of those, wider than nothing.
    assert 0.02 < high - low < 4 * 0.031


def test_bootstrap_interval_is_deterministic_with_its_seed():
    matrix = _matrix([0.7, 0.8], 100)
    assert bootstrap_interval(matrix, seed=3) == bootstrap_interval(matrix, seed=3)
    assert bootstrap_interval(matrix, seed=3)[1:] != bootstrap_interval(matrix, seed=4)[1:]


def test_fewer_samples_give_a_wider_interval():
    _, low_many, high_many = bootstrap_interval(_matrix([0.8], 400), seed=0)
    _, low_few, high_few = bootstrap_interval(_matrix([0.8], 25), seed=0)
    assert high_few - low_few > 2 * (high_many - low_many)  # about sqrt(400 / 25) = 4 times wider


def test_bootstrap_interval_of_a_constant_column_is_a_point_and_bad_inputs_are_named():
    assert bootstrap_interval(np.ones((2, 10))) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_interval(np.ones((2, 0)))
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_interval(np.ones(5), resamples=0)


def _summary(model: str, correct: dict[str, list[bool]], answers: list[str], tau: float) -> dict:
    """A compare summary as run_compare writes it, with predictions right where `correct` says."""

    def row(spec, flags, reference=False, **extra):
        predictions = [a if ok else "wrong" for a, ok in zip(answers, flags)]
        return {"spec": spec, "accuracy": sum(flags) / len(flags), "predictions": predictions,
                "flops_ratio": 0.3, "reference": reference, **extra}

    return {"model": model, "dataset": "shapes", "budgets_run": [0.5],
            "searches": {"gsearch": {"epsilon": 0.01, "keep": [1.0] * 8},
                         "gsearch-0.5": {"budget": 0.5, "keep": [1.0] + [0.4] * 7}},
            "rank": {"mean_tau_excluding_layer0": tau, "mean_tau_with_layer0": tau / 2},
            "results": [row("baseline", correct["baseline"]),
                        row("schedule:path=out/schedules/gsearch.json", correct["baseline"]),
                        row("fastv:layer=1,equivalent=0.5", correct["fastv"]),
                        row("schedule:path=out/schedules/gsearch-0.5.json", correct["fastv"], budget_met=False),
                        {"spec": "pool:equivalent=0.5", "accuracy": None, "predictions": None, "reference": False},
                        row("oracle@0.5 (upper reference)", correct["baseline"], reference=True)]}


def test_panel_aggregates_each_method_and_budget_over_models():
    answers = ["red", "blue", "left", "two"]
    one = _summary("a", {"baseline": [1, 1, 1, 1], "fastv": [1, 0, 0, 0]}, answers, 0.8)
    two = _summary("b", {"baseline": [1, 1, 1, 0], "fastv": [1, 1, 1, 0]}, answers, 0.6)
    panel = panel_from_summaries({"a": one, "b": two}, answers, resamples=200, seed=0)
    rows = {(r["method"], r["budget"]): r for r in panel["rows"]}
    assert set(rows) == {("baseline", 1.0), ("gsearch (own point)", None), ("fastv", 0.5), ("gsearch", 0.5),
                         ("pool", 0.5), ("oracle", 0.5)}
    fastv = rows[("fastv", 0.5)]
    assert fastv["accuracy"] == {"a": 0.25, "b": 0.75} and fastv["mean"] == pytest.approx(0.5)
    assert fastv["low"] <= 0.5 <= fastv["high"]
    assert rows[("baseline", 1.0)]["mean"] == pytest.approx(0.875)
    assert rows[("pool", 0.5)]["mean"] is None and rows[("pool", 0.5)]["models"] == 0  # skipped by both
    assert rows[("gsearch", 0.5)]["over_budget"] == ["a", "b"]
    assert [r["method"] for r in panel["rows"]][:1] == ["baseline"]  # then the budgets, largest first
    assert panel["rank"]["a"] == {"mean_tau_excluding_layer0": 0.8, "mean_tau_with_layer0": 0.4}
    table = panel_markdown(panel)
    assert "| fastv | 50.0% | 25.0% | 75.0% | **50.0%** [" in table
    assert "| oracle (upper reference) | 50.0% |" in table and "(over budget)" in table
    assert "| a | 0.800 | 0.400 |" in table


def test_panel_refuses_predictions_that_do_not_rescore_to_the_recorded_accuracy():
    answers = ["red", "blue"]
    summary = _summary("a", {"baseline": [1, 1], "fastv": [1, 0]}, answers, 0.5)
    summary["results"][2]["accuracy"] = 1.0
    with pytest.raises(ValueError, match="rescore"):
        panel_from_summaries({"a": summary}, answers)
    with pytest.raises(ValueError, match="same samples"):
        panel_from_summaries({"a": summary}, answers + ["left"])


@pytest.mark.parametrize("argv, message", [
    (["--panel", "tiny-llava-shapes-v1", "tiny-nope"], "no tiny checkpoint 'tiny-nope'"),
    (["--panel", "tiny-llava-shapes-v1"], "two or more models"),
    (["--panel", "tiny-llava-shapes-v1", "tiny-llava-shapes-v1"], "more than once"),
    (["--panel", "tiny-llava-shapes-v1", "tiny-llava-shapes-v2", "--model", "tiny-llava-shapes"], "not both"),
])
def test_panel_argument_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["compare", *argv, "--out", str(tmp_path / "panel")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "panel").exists()  # refused before any work


@pytest.mark.slow  # two models, each a small compare (rank, three searches, nine rows): about 15 s
def test_panel_end_to_end_on_two_bundled_checkpoints(tmp_path, capsys):
    out = tmp_path / "panel"
    assert main(["compare", "--panel", "tiny-llava-shapes-v1", "tiny-llava-shapes-v3", "--dataset", "shapes",
                 "--samples", "8", "--calibration-samples", "4", "--trials", "2", "--grid", "4", "--budgets", "0.333",
                 "--oracle", "--no-progress", "--out", str(out)]) == 0
    panel = json.loads((out / "panel.json").read_text())
    assert panel["models"] == ["tiny-llava-shapes-v1", "tiny-llava-shapes-v3"] and panel["samples"] == 8
    for model in panel["models"]:
        summary = json.loads((out / model / "summary.json").read_text())
        rows = {(r["method"], r["budget"]): r for r in panel["rows"]}
        for result in summary["results"]:  # each model's cell is its own run's accuracy
            if result["spec"] == "baseline":
                assert rows[("baseline", 1.0)]["accuracy"][model] == result["accuracy"]
    methods = {r["method"] for r in panel["rows"]}
    assert {"baseline", "random", "fastv", "pdrop", "gsearch", "psigmoid", "oracle"} <= methods
    assert all(r["low"] <= r["mean"] <= r["high"] for r in panel["rows"] if r["mean"] is not None)
    assert (out / "panel.png").stat().st_size > 1000
    assert "mean [95% interval]" in (out / "panel.md").read_text()
    assert "mean [95% interval]" in capsys.readouterr().out
    assert "oracle (upper reference)" in (out / "tiny-llava-shapes-v1" / "comparison.md").read_text().splitlines()[0]


def test_version_names_resolve_to_shipped_folders_without_a_copy():
    from mmreduce.eval.tiny_models import CHECKPOINT_DIR, recipe_name, resolve_checkpoint

    assert resolve_checkpoint("tiny-llava-shapes-v3") == CHECKPOINT_DIR / "tiny-llava-shapes"
    assert not (CHECKPOINT_DIR / "tiny-llava-shapes-v3").exists()  # an alias, not a second 5.6 MB
    weights = {v: (resolve_checkpoint(f"tiny-llava-shapes-{v}") / "model.safetensors").read_bytes()
               for v in ("v1", "v2", "v3")}
    assert len(set(weights.values())) == 3  # three different training runs
    assert {recipe_name(f"tiny-llava-shapes-{v}") for v in ("v1", "v2", "v3")} == {"tiny-llava-shapes"}
    assert recipe_name("tiny-llava-video") == "tiny-llava-video" and recipe_name("tiny-nope-v2") is None
    with pytest.raises(ValueError, match="tiny-llava-shapes-v3"):  # the alias is listed among the names
        resolve_checkpoint("tiny-llava-shapes-v9")


@pytest.mark.parametrize("name", ["tiny-llava-shapes-v1", "tiny-llava-shapes-v2"])
def test_earlier_versions_load_and_answer_with_todays_code(name):
    from mmreduce.eval.accuracy import evaluate
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import load_tiny, prompt_for

    model, processor = load_tiny(name)
    assert prompt_for(processor, "what color is the circle ?").index("what") < prompt_for(
        processor, "what color is the circle ?").index("<image>")  # question-first, like the shipped v3
    samples = load_benchmark("shapes", "test", 8, seed=0)
    _, predictions = evaluate(model, processor, samples, batch_size=8)
    assert all(p in s.choices for p, s in zip(predictions, samples)), predictions
