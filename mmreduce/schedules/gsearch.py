"""G-Search (Zhao et al., CVPR 2025, arXiv 2412.00556): greedy, shallow to deep, the fewest vision tokens per layer
that keep the calibration objective within ε of the unreduced model.

At layer l every candidate n_l ≤ n_{l-1} is tried with all deeper layers temporarily at n_l; a binary search over a
grid finds the smallest feasible one (the search assumes fewer tokens never help, the paper's monotonicity). Layers
before l are identical for every candidate, so their hidden states are computed once per layer (`Calibration.capture`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..methods.schedule import Schedule
from .calibration import Calibration

__all__ = ["GSearchResult", "greedy_search", "gsearch", "gsearch_within"]


@dataclass
class GSearchResult:
    keep: list[float]  # fraction of vision tokens entering each layer
    evaluations: int
    seconds: float
    log: list[dict] = field(default_factory=list)


def greedy_search(
    num_layers: int,
    grid: Sequence[float],
    feasible: Callable[[int, list[float]], bool],
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[dict]]:
    """The greedy per-layer search, independent of any model.

    Args:
        num_layers: L; layer 0 always keeps 1.0.
        grid: candidate fractions (any order; 1.0 is added).
        feasible: feasible(layer, keep) for a full schedule `keep` whose layers >= layer all equal keep[layer].
        progress: called with the layer index after each layer.

    Returns:
        (keep per layer, log of every feasibility test as {"layer", "keep", "feasible"}).
    """
    grid = sorted({float(g) for g in grid} | {1.0})
    if grid[0] < 0 or grid[-1] > 1:
        raise ValueError(f"grid fractions must lie in [0, 1], got {grid}")
    keep = [1.0] * num_layers
    log: list[dict] = []
    for layer in range(1, num_layers):
        previous = keep[layer - 1]
        candidates = [g for g in grid if g <= previous]  # ascending; the last one (== previous) is known feasible
        low, high = 0, len(candidates) - 1
        while low < high:
            middle = (low + high) // 2
            trial = keep[:layer] + [candidates[middle]] * (num_layers - layer)
            ok = feasible(layer, trial)
            log.append({"layer": layer, "keep": candidates[middle], "feasible": ok})
            if ok:
                high = middle
            else:
                low = middle + 1
        keep[layer:] = [candidates[high]] * (num_layers - layer)
        if progress is not None:
            progress(layer)
    return keep, log


def gsearch(calibration: Calibration, epsilon: float = 0.01, grid_size: int = 16, model_name: str | None = None,
            progress: bool = True, score_cache: dict | None = None) -> tuple[Schedule, GSearchResult]:
    """Runs G-Search on a calibration set; returns the schedule (fractions) and the search record.

    `score_cache` (schedule tuple -> objective) lets several searches on the same calibration set share the
    evaluations they have in common (`gsearch_within` runs one search per tolerance).
    """
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size!r}")
    from tqdm.auto import tqdm

    target = calibration.reference_score - epsilon
    start_evaluations, start = calibration.evaluations, time.perf_counter()
    captured: dict[int, list] = {}

    scores = {} if score_cache is None else score_cache

    def feasible(layer: int, keep: list[float]) -> bool:
        if tuple(keep) not in scores:
            if layer not in captured:
                captured.clear()  # one layer's prefix at a time
                captured[layer] = calibration.capture(keep[:layer], layer)
            scores[tuple(keep)] = calibration.resume(captured[layer], keep, layer)
        return scores[tuple(keep)] >= target - 1e-12

    bar = tqdm(total=calibration.num_layers - 1, desc="G-Search layers", disable=not progress, leave=False)
    grid = [i / grid_size for i in range(grid_size + 1)]
    keep, log = greedy_search(calibration.num_layers, grid, feasible, progress=lambda layer: bar.update())
    bar.close()
    result = GSearchResult(keep, calibration.evaluations - start_evaluations, time.perf_counter() - start, log)
    budget = f"gsearch objective={calibration.objective} epsilon={epsilon} grid={grid_size}"
    return Schedule(keep=keep, unit="fraction", model=model_name, budget=budget), result


def gsearch_within(calibration: Calibration, budget: float, grid_size: int = 16, model_name: str | None = None,
                   iterations: int = 8, score_cache: dict | None = None,
                   progress: bool = True) -> tuple[Schedule, GSearchResult, float]:
    """G-Search under a budget: the smallest tolerance ε (bisection over [0, 1]) whose schedule keeps at most
    `budget` of the vision tokens on average over layers; returns (schedule, record of all searches, ε).

    The paper's G-Search answers "least cost without loss"; this is its equal-budget counterpart, for comparing it
    with FastV, PyramidDrop and P-Sigmoid at one budget. Searches share their evaluations (`score_cache`).
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    scores = {} if score_cache is None else score_cache
    start_evaluations, start = calibration.evaluations, time.perf_counter()
    low, high = 0.0, 1.0 - 1e-9  # ε = high always fits: the greedy search then keeps one grid step everywhere
    best: Schedule | None = None
    log: list[dict] = []
    for _ in range(iterations):
        epsilon = (low + high) / 2
        schedule, result = gsearch(calibration, epsilon, grid_size, model_name, progress=False, score_cache=scores)
        mean = sum(schedule.keep) / len(schedule.keep)
        log.append({"epsilon": epsilon, "mean_keep": mean, "keep": schedule.keep})
        if mean <= budget + 1e-12:
            high, best = epsilon, schedule
        else:
            low = epsilon
    if best is None:
        best, _ = gsearch(calibration, high, grid_size, model_name, progress=False, score_cache=scores)
        if sum(best.keep) / len(best.keep) > budget + 1e-12:
            raise ValueError(f"G-Search cannot fit a mean keep of {budget} with a grid of {grid_size}: even the "
                             f"loosest search keeps {sum(best.keep) / len(best.keep):.3f}")
    best.budget = f"gsearch objective={calibration.objective} equivalent<={budget} epsilon={high:.4f} grid={grid_size}"
    record = GSearchResult(list(best.keep), calibration.evaluations - start_evaluations,
                           time.perf_counter() - start, log)
    return best, record, high
