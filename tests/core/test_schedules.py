"""Schedule search and tuning: the greedy search on a toy objective, BO determinism, budgets, prefix reuse."""

from __future__ import annotations

import math

import pytest
import torch

from mmreduce.flops import ModelDims, prefill_flops
from mmreduce.schedules import (
    Budget,
    Calibration,
    greedy_search,
    gsearch,
    gsearch_within,
    kendall_matrix,
    psigmoid_keep,
    rank_analysis,
    schedule_cost,
    tune_psigmoid,
)
from tests.support.vlm_factory import llava_batch, tiny_llava


def test_greedy_search_finds_the_known_optimum_of_a_monotone_toy():
    # Feasible iff every layer keeps at least its (non-increasing) need: the optimum is the need rounded up to the grid.
    need = [1.0, 0.9, 0.6, 0.55, 0.2, 0.0]
    calls = []

    def feasible(layer, keep):
        calls.append(layer)
        assert all(keep[i] == keep[layer] for i in range(layer, len(keep)))  # deeper layers follow the candidate
        return all(k >= n for k, n in zip(keep, need))

    grid = [i / 20 for i in range(21)]
    keep, log = greedy_search(6, grid, feasible)
    assert keep == [1.0, 0.9, 0.6, 0.55, 0.2, 0.0]
    # binary search: at most ⌈log2(21)⌉ = 5 tests per layer
    assert all(calls.count(layer) <= 5 for layer in range(1, 6)) and len(log) == len(calls)
    keep, _ = greedy_search(6, [0.0, 0.5, 1.0], feasible)
    assert keep == [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]


def test_psigmoid_shape_and_validation():
    keep = psigmoid_keep(8, k=1.0, alpha=4.0, b=0.1)
    assert keep[0] == 1.0 and all(a >= b for a, b in zip(keep, keep[1:]))
    assert keep[4] == pytest.approx(0.1 + 0.9 / 2)  # the midpoint sits at l = α
    assert keep[7] == pytest.approx(0.1 + 0.9 / (1 + math.exp(3.0)))
    for bad in (dict(k=0, alpha=1, b=0), dict(k=1, alpha=9, b=0), dict(k=1, alpha=1, b=1.0)):
        with pytest.raises(ValueError):
            psigmoid_keep(8, **bad)


def test_budget_accounting():
    assert Budget.parse("0.22") == Budget("equivalent", 0.22)
    assert Budget.parse("flops=0.4") == Budget("flops", 0.4)
    with pytest.raises(ValueError, match="kind"):
        Budget.parse("tokens=3")
    with pytest.raises(ValueError, match="value"):
        Budget("equivalent", 1.5)
    keep = [1.0, 1.0, 0.5, 0.5]
    assert schedule_cost(keep, Budget("equivalent", 0.5)) == 0.75
    dims = ModelDims(hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=4)
    expected = prefill_flops([110, 110, 60, 60], dims) / prefill_flops([110] * 4, dims)
    assert schedule_cost(keep, Budget("flops", 0.5), dims, vision_tokens=100, text_tokens=10) == expected


def test_bayesian_optimization_is_deterministic_and_respects_the_budget():
    # Toy objective: more tokens in the middle layers is better; the budget caps the mean at 0.4.
    def objective(keep):
        return sum(keep[2:6]) / 4

    runs = [tune_psigmoid(8, objective, Budget("equivalent", 0.4), trials=12, init_points=4, seed=3, progress=False)
            for _ in range(2)]
    assert runs[0].params == runs[1].params and runs[0].keep == runs[1].keep
    assert runs[0].cost <= 0.4 + 1e-12
    assert len(runs[0].trials) == 12
    other = tune_psigmoid(8, objective, Budget("equivalent", 0.4), trials=12, init_points=4, seed=4, progress=False)
    assert other.trials[0]["k"] != runs[0].trials[0]["k"]


@pytest.fixture(scope="module")
def calibration():
    model = tiny_llava("sdpa", layers=6)
    batches = [llava_batch(seed=s) for s in (0, 1)]
    with torch.no_grad():
        labels = [model(**b).logits[:, -1].argmax(-1) for b in batches]
    return Calibration(model, batches, labels, objective="agreement")


def test_resume_from_a_captured_prefix_equals_the_full_forward(calibration):
    """Prefix reuse must give exactly the objective of running the whole schedule."""
    keep = [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    for layer in (2, 4):
        captured = calibration.capture(keep[:layer], layer)
        assert calibration.resume(captured, keep, layer) == calibration.evaluate(keep)
    # ...and an aggressive schedule really changes answers (else the equality above would be vacuous).
    assert calibration.evaluate([1.0] + [0.0] * 5) < 1.0
    assert calibration.reference_score == 1.0


def test_gsearch_on_a_tiny_model_meets_its_tolerance(calibration):
    schedule, result = gsearch(calibration, epsilon=0.0, grid_size=4, progress=False)
    assert schedule.keep[0] == 1.0 and list(schedule.keep) == sorted(schedule.keep, reverse=True)
    assert calibration.evaluate(list(schedule.keep)) >= calibration.reference_score
    assert result.evaluations == len(result.log) > 0
    assert schedule.budget.startswith("gsearch")


def test_gsearch_within_a_budget_takes_the_tightest_tolerance_that_fits(calibration):
    def mean(keep):
        return sum(keep) / len(keep)

    schedule, record, epsilon = gsearch_within(calibration, budget=0.5, grid_size=4, iterations=5, progress=False)
    assert mean(schedule.keep) <= 0.5 and "equivalent<=0.5" in schedule.budget
    # Independent re-runs without the shared cache: the returned tolerance gives this very schedule, and the
    # largest tolerance the bisection rejected gives one over the budget.
    again, _ = gsearch(calibration, epsilon=epsilon, grid_size=4, progress=False)
    assert again.keep == schedule.keep
    rejected = [entry["epsilon"] for entry in record.log if entry["mean_keep"] > 0.5]
    assert rejected, "the bisection never met a tolerance that misses the budget: the test would be vacuous"
    tighter, _ = gsearch(calibration, epsilon=max(rejected), grid_size=4, progress=False)
    assert mean(tighter.keep) > 0.5
    # Shared evaluations: fewer model evaluations than the five searches would need one by one.
    assert record.evaluations < 5 * 4 * (len(schedule.keep) - 1)
    with pytest.raises(ValueError, match="cannot fit"):
        gsearch_within(calibration, budget=0.1, grid_size=4, iterations=2, progress=False)  # 1/6 is the floor


def test_rank_analysis_reports_a_symmetric_tau_matrix():
    model = tiny_llava("sdpa", layers=4)
    result = rank_analysis(model, [llava_batch()])
    matrix = result["kendall_tau"]
    assert len(matrix) == 4 and all(matrix[i][i] == 1.0 for i in range(4))
    assert all(matrix[i][j] == matrix[j][i] for i in range(4) for j in range(4))
    assert result["samples"] == 3
    import numpy as np

    identical = [np.arange(10.0)[None].repeat(3, 0)]
    assert np.allclose(kendall_matrix(identical), 1.0)
    reversed_rank = [np.stack([np.arange(10.0), -np.arange(10.0)])]
    assert kendall_matrix(reversed_rank)[0, 1] == pytest.approx(-1.0)
