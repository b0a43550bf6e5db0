"""mmreduce: spend fewer vision tokens in a stock Hugging Face VLM, with one call.

    import mmreduce
    reduced = mmreduce.wrap(model, "pdrop", keep_ratio=0.5)
    out = reduced.generate(**inputs)
    print(reduced.stats.vision_tokens_per_layer, reduced.stats.prefill_flops)
    reduced.unwrap()
"""

from .api import LayerPrefix, ReducedModel, capture_prefix, resume_prefix, unwrap, wrap
from .flops import ModelDims, layer_flops, paper_tflops, prefill_flops
from .methods import (
    AIM,
    Baseline,
    DropStage,
    FastV,
    FrameSample,
    PyramidDrop,
    Random,
    ReductionMethod,
    Schedule,
    ScoreContext,
    TCC,
    ToMe,
    VisionZip,
    create_method,
    list_methods,
    method_class,
    register_method,
)
from .spec import MethodSpec, fit_equivalent, parse_spec
from .stats import ReductionStats
from .vit_merge import patch_vit, unpatch_vit

__version__ = "0.1.0"

__all__ = [
    "AIM",
    "Baseline",
    "DropStage",
    "FastV",
    "FrameSample",
    "LayerPrefix",
    "MethodSpec",
    "ModelDims",
    "PyramidDrop",
    "Random",
    "ReducedModel",
    "ReductionMethod",
    "ReductionStats",
    "Schedule",
    "ScoreContext",
    "TCC",
    "ToMe",
    "VisionZip",
    "capture_prefix",
    "create_method",
    "fit_equivalent",
    "layer_flops",
    "list_methods",
    "method_class",
    "paper_tflops",
    "parse_spec",
    "patch_vit",
    "prefill_flops",
    "register_method",
    "resume_prefix",
    "unpatch_vit",
    "unwrap",
    "wrap",
]
