"""P-Sigmoid schedules, tuned by Bayesian optimization under a budget.

    r(l) = b + (1 - b) / (1 + exp(k · (l - α)))   for l >= 1, r(0) = 1,   k > 0, α in [0, L], b in [0, 1)

The seed paper (arXiv 2412.00556) fits G-Search's S-shaped keep curves with a parametric sigmoid and tunes it with
Bayesian optimization; its exact form could not be recovered, so this definition is ours (ARCHITECTURE §5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..flops import ModelDims, prefill_flops
from ..methods.schedule import Schedule

__all__ = ["Budget", "PSigmoidResult", "psigmoid_keep", "psigmoid_schedule", "schedule_cost", "tune_psigmoid"]

#: Slack when comparing a cost with its budget (float noise only; a budget is a promise, not a target).
BUDGET_SLACK = 1e-12


def psigmoid_keep(num_layers: int, k: float, alpha: float, b: float) -> list[float]:
    """Keep fraction per layer (layer 0 full), non-increasing for k > 0."""
    if not k > 0:
        raise ValueError(f"P-Sigmoid k must be > 0, got {k!r}")
    if not 0 <= alpha <= num_layers:
        raise ValueError(f"P-Sigmoid alpha must be in [0, {num_layers}], got {alpha!r}")
    if not 0 <= b < 1:
        raise ValueError(f"P-Sigmoid b must be in [0, 1), got {b!r}")
    keep = [1.0]
    for layer in range(1, num_layers):
        exponent = min(k * (layer - alpha), 700.0)  # exp overflows past ~709
        keep.append(b + (1 - b) / (1 + math.exp(exponent)))
    for layer in range(1, num_layers):  # guard against float noise breaking monotonicity
        keep[layer] = min(keep[layer], keep[layer - 1])
    return keep


@dataclass(frozen=True)
class Budget:
    """A cost limit: `equivalent` = mean over layers of the kept fraction of vision tokens (e.g. 0.33), or
    `flops` = prefill FLOPs as a fraction of the unreduced model's (text tokens counted)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in ("equivalent", "flops"):
            raise ValueError(f"Budget.kind must be 'equivalent' or 'flops', got {self.kind!r}")
        if not 0 < self.value <= 1:
            raise ValueError(f"Budget.value must be in (0, 1], got {self.value!r}")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """'0.33' or 'equivalent=0.33' -> equivalent; 'flops=0.5' -> FLOPs fraction."""
        kind, sep, value = text.partition("=")
        if not sep:
            kind, value = "equivalent", text
        try:
            return cls(kind.strip(), float(value))
        except ValueError as error:
            raise ValueError(f"cannot read budget {text!r}: {error}") from None


def schedule_cost(keep: Sequence[float], budget: Budget, dims: ModelDims | None = None, vision_tokens: int = 0,
                  text_tokens: int = 0) -> float:
    """The schedule's cost in the budget's unit (a fraction comparable to `budget.value`)."""
    if budget.kind == "equivalent":
        return sum(keep) / len(keep)
    if dims is None or vision_tokens <= 0:
        raise ValueError("a FLOPs budget needs the model dims and the vision token count")
    counts = [text_tokens + math.ceil(f * vision_tokens - 1e-9) for f in keep]
    return prefill_flops(counts, dims) / prefill_flops([text_tokens + vision_tokens] * len(keep), dims)


@dataclass
class PSigmoidResult:
    """The tuned schedule. `cost` is in the budget's unit; when no trial fits the budget, the schedule is the
    least-overrunning one and `budget_met` is False: callers must refuse it or say so (`over_budget_message`)."""

    params: dict
    keep: list[float]
    objective: float
    cost: float
    seconds: float
    trials: list[dict] = field(default_factory=list)
    budget: Budget | None = None

    @property
    def budget_met(self) -> bool:
        return self.budget is None or self.cost <= self.budget.value + BUDGET_SLACK

    def budget_fields(self) -> dict:
        """What a schedule JSON records about its budget: `budget_met`, the achieved `cost` and the limit."""
        fields = {"budget_met": self.budget_met, "cost": round(self.cost, 6)}
        if self.budget is not None:
            fields |= {"budget_kind": self.budget.kind, "budget_value": self.budget.value}
        return fields

    def over_budget_message(self) -> str:
        """One line: what the returned schedule costs against the budget (empty when the budget is met)."""
        if self.budget_met:
            return ""
        return (f"P-Sigmoid found no schedule within the budget: the cheapest of {len(self.trials)} trials costs "
                f"{self.cost:.3f} > {self.budget.kind} budget {self.budget.value:g}")


def tune_psigmoid(
    num_layers: int,
    objective: Callable[[list[float]], float],
    budget: Budget,
    cost: Callable[[list[float]], float] | None = None,
    trials: int = 30,
    init_points: int = 8,
    seed: int = 0,
    penalty: float = 10.0,
    progress: bool = True,
) -> PSigmoidResult:
    """Bayesian optimization (package `bayesian-optimization`) of (k, α, b) for objective − penalty·overrun.

    `objective(keep)` is maximised; `cost(keep)` (default: the equivalent fraction) must stay <= budget.value;
    outside it the score drops by `penalty` × the relative overrun. Returns the best schedule within budget, or
    the least-overrunning one with `budget_met` False (never silently: see `PSigmoidResult`).
    """
    from bayes_opt import BayesianOptimization
    from tqdm.auto import tqdm

    if trials < 1 or init_points < 1:
        raise ValueError(f"trials and init_points must be >= 1, got {trials}, {init_points}")
    cost = cost or (lambda keep: sum(keep) / len(keep))
    bounds = {"k": (0.05, 4.0), "alpha": (0.0, float(num_layers)), "b": (0.0, 0.95)}
    optimizer = BayesianOptimization(f=None, pbounds=bounds, random_state=seed, verbose=0)
    log: list[dict] = []
    start = time.perf_counter()
    for trial in tqdm(range(trials), desc="P-Sigmoid BO", disable=not progress, leave=False):
        params = optimizer.random_sample(1)[0] if trial < init_points else optimizer.suggest()
        if not isinstance(params, dict):
            params = dict(zip(sorted(bounds), params))
        params = {key: float(value) for key, value in params.items()}
        keep = psigmoid_keep(num_layers, params["k"], params["alpha"], params["b"])
        spent = cost(keep)
        value = objective(keep)
        overrun = max(0.0, spent - budget.value) / budget.value
        target = value - penalty * overrun
        optimizer.register(params=params, target=target)
        log.append({"trial": trial, **params, "objective": value, "cost": spent, "target": target})
    within = [t for t in log if t["cost"] <= budget.value + BUDGET_SLACK]
    best = max(within, key=lambda t: (t["objective"], -t["cost"])) if within else min(log, key=lambda t: t["cost"])
    params = {key: best[key] for key in ("k", "alpha", "b")}
    return PSigmoidResult(params, psigmoid_keep(num_layers, **params), best["objective"], best["cost"],
                          time.perf_counter() - start, log, budget)


def psigmoid_schedule(result: PSigmoidResult, model_name: str | None, budget: Budget) -> Schedule:
    """The tuned schedule; its `budget` note ends with "OVER BUDGET (cost ...)" when the budget was missed."""
    note = (f"psigmoid {budget.kind}={budget.value} k={result.params['k']:.4f} "
            f"alpha={result.params['alpha']:.4f} b={result.params['b']:.4f}")
    if result.cost > budget.value + BUDGET_SLACK:
        note += f" OVER BUDGET (cost {result.cost:.4f})"
    return Schedule(keep=result.keep, unit="fraction", model=model_name, budget=note)
