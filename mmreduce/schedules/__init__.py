"""Schedules: search (G-Search), tune (P-Sigmoid + Bayesian optimization) and analyse (attention-rank similarity)."""

from ..methods.schedule import Schedule
from .calibration import OBJECTIVES, Calibration
from .gsearch import GSearchResult, greedy_search, gsearch, gsearch_within
from .psigmoid import Budget, PSigmoidResult, psigmoid_keep, psigmoid_schedule, schedule_cost, tune_psigmoid
from .rank import attention_rankings, kendall_matrix, plot_kendall, rank_analysis

__all__ = [
    "Budget",
    "Calibration",
    "GSearchResult",
    "OBJECTIVES",
    "PSigmoidResult",
    "Schedule",
    "attention_rankings",
    "greedy_search",
    "gsearch",
    "gsearch_within",
    "kendall_matrix",
    "plot_kendall",
    "psigmoid_keep",
    "psigmoid_schedule",
    "rank_analysis",
    "schedule_cost",
    "tune_psigmoid",
]
