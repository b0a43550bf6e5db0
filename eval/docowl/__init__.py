"""A small stand-in for mPLUG-DocOwl 1.5 (arXiv 2403.12895) on transformers 5 conventions.

DocOwl 1.5's own code targets transformers 4.31 and does not run here, so this package re-states its public structure
(module names, shapes, prompt layout) in plain transformers 5 code; nothing here loads remote code. It is what
mmreduce's DocOwl adapter (`mmreduce.adapters.docowl`) is tested on; see that adapter for what this does and does not
verify about real DocOwl weights.

- `processor.py`: `DocProcessor` (shape-adaptive cropping, global image first, textual crop indicators)
- `vision.py`: `MplugOwlVisionModel` (ViT-L/14 layout, fused q/k/v)
- `hreducer.py`: `MplugDocOwlHReducerModel` (1x4 convs, `visual_fc`, `vit_eos`: 257 tokens per 448 px crop)
- `text.py`: `DocOwlTextModel` (Llama with modality-adaptive norms and k/v)
- `modeling.py`: `DocOwlModel` (placeholder expansion, `modality_indicators`), `DocOwlForConditionalGeneration`
"""

from __future__ import annotations

from transformers import AutoConfig

from .configuration import DocOwlConfig, DocOwlHReducerConfig, DocOwlTextConfig, DocOwlVisionConfig, IMAGE_TOKEN_INDEX
from .hreducer import MplugDocOwlHReducerModel
from .modeling import DocOwlForConditionalGeneration, DocOwlModel
from .processor import DocProcessor, select_anchor
from .text import DocOwlTextModel, MultiwayNetwork
from .vision import MplugOwlVisionModel

__all__ = [
    "DocOwlConfig",
    "DocOwlForConditionalGeneration",
    "DocOwlHReducerConfig",
    "DocOwlModel",
    "DocOwlTextConfig",
    "DocOwlTextModel",
    "DocOwlVisionConfig",
    "DocProcessor",
    "IMAGE_TOKEN_INDEX",
    "MplugDocOwlHReducerModel",
    "MplugOwlVisionModel",
    "MultiwayNetwork",
    "select_anchor",
]

# So that AutoConfig (and mmreduce.adapters.load_pretrained) reads a saved stand-in once this package is imported.
AutoConfig.register(DocOwlConfig.model_type, DocOwlConfig, exist_ok=True)
