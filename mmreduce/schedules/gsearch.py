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

__all__ = ["GSearchResult", "greedy_search", "gsearch"]


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
            progress: bool = True) -> tuple[Schedule, GSearchResult]:
    """Runs G-Search on a calibration set; returns the schedule (fractions) and the search record."""
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size!r}")
    from tqdm.auto import tqdm

    target = calibration.reference_score - epsilon
    start_evaluations, start = calibration.evaluations, time.perf_counter()
    captured: dict[int, list] = {}

    def feasible(layer: int, keep: list[float]) -> bool:
        if layer not in captured:
            captured.clear()  # one layer's prefix at a time
            captured[layer] = calibration.capture(keep[:layer], layer)
        return calibration.resume(captured[layer], keep, layer) >= target - 1e-12

    bar = tqdm(total=calibration.num_layers - 1, desc="G-Search layers", disable=not progress, leave=False)
    grid = [i / grid_size for i in range(grid_size + 1)]
    keep, log = greedy_search(calibration.num_layers, grid, feasible, progress=lambda layer: bar.update())
    bar.close()
    result = GSearchResult(keep, calibration.evaluations - start_evaluations, time.perf_counter() - start, log)
    budget = f"gsearch objective={calibration.objective} epsilon={epsilon} grid={grid_size}"
    return Schedule(keep=keep, unit="fraction", model=model_name, budget=budget), result
