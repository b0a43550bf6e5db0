"""The method zoo: one short file per method (importing this package registers them all)."""

from .base import (DropStage, ReductionMethod, ScoreContext, check_layer, check_ratio, create_method, list_methods,
                   method_class, register_method, top_k_sorted)
from .aim import AIM
from .baseline import Baseline
from .before import BeforeLLMMethod, SignalRequest, TokenPlan, VisionTokens
from .compose import Compose
from .fastv import FastV
from .frames import FrameSample
from .pdrop import PyramidDrop, default_pdrop_layers
from .pool import Pool
from .random import Random
from .schedule import Schedule
from .stride import Stride
from .tcc import TCC
from .tome import ToMe, bipartite_merge_plan
from .visionzip import VisionZip

__all__ = [
    "AIM",
    "Baseline",
    "BeforeLLMMethod",
    "Compose",
    "DropStage",
    "FastV",
    "FrameSample",
    "Pool",
    "PyramidDrop",
    "Random",
    "ReductionMethod",
    "Schedule",
    "ScoreContext",
    "SignalRequest",
    "Stride",
    "TCC",
    "TokenPlan",
    "ToMe",
    "VisionTokens",
    "VisionZip",
    "bipartite_merge_plan",
    "create_method",
    "default_pdrop_layers",
    "list_methods",
    "method_class",
    "register_method",
    "top_k_sorted",
]
