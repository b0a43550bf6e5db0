"""The method zoo: one short file per method (importing this package registers them all)."""

from .base import (DropStage, ReductionMethod, ScoreContext, check_layer, check_ratio, create_method, list_methods,
                   method_class, register_method, top_k_sorted)
from .baseline import Baseline
from .fastv import FastV
from .pdrop import PyramidDrop, default_pdrop_layers
from .random import Random
from .schedule import Schedule

__all__ = [
    "Baseline",
    "DropStage",
    "FastV",
    "PyramidDrop",
    "Random",
    "ReductionMethod",
    "Schedule",
    "ScoreContext",
    "create_method",
    "default_pdrop_layers",
    "list_methods",
    "method_class",
    "register_method",
    "top_k_sorted",
]
