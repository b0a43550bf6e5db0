"""Visual tokenizers trained and measured here: SEED (causal Q-Former + VQ) and TokenUnify (mixed token prediction).

Heavy submodules (timm, scikit-image) load on first use of their names, so ``import mmreduce.tokenizers_visual``
stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .protocol import VisualTokenizer
from .vq import VectorQuantizer, VQConfig, codebook_stats

__all__ = ["SeedTokenizer", "TokenUnifyConfig", "TokenUnifyModel", "VQConfig", "VectorQuantizer", "VisualTokenizer",
           "codebook_stats"]

_LAZY = {"SeedTokenizer": ".seed.tokenizer", "TokenUnifyConfig": ".tokenunify.model",
         "TokenUnifyModel": ".tokenunify.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
