"""Model-family adapters, chosen by `config.model_type` (see `ADAPTERS`)."""

from __future__ import annotations

from torch import nn

from .base import ImageGrid, ModelAdapter, TokenCell
from .docowl import DocOwlAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["ADAPTERS", "ImageGrid", "LlavaAdapter", "ModelAdapter", "TokenCell", "adapter_class", "get_adapter",
           "load_pretrained", "model_class_for", "register_adapter"]

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Adds `adapter_cls` to the table under each of its `model_types` (usable as a class decorator)."""
    if not adapter_cls.model_types:
        raise ValueError(f"{adapter_cls.__name__}.model_types is empty; list the config.model_type values it serves")
    for model_type in adapter_cls.model_types:
        ADAPTERS[model_type] = adapter_cls
    return adapter_cls


register_adapter(DocOwlAdapter)
register_adapter(InternVLAdapter)
register_adapter(LlavaAdapter)
register_adapter(Qwen2VLAdapter)


def get_adapter(model: nn.Module, adapter: ModelAdapter | type[ModelAdapter] | str | None = None) -> ModelAdapter:
    """The adapter for `model`: the one given, or the table's entry for `model.config.model_type`."""
    if isinstance(adapter, ModelAdapter):
        return adapter
    if isinstance(adapter, type) and issubclass(adapter, ModelAdapter):
        return adapter(model)
    config = getattr(model, "config", None)
    model_type = adapter if isinstance(adapter, str) else getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(
            f"no mmreduce adapter for model_type {model_type!r} ({type(model).__name__}); supported: {supported}. "
            "To add one, subclass mmreduce.adapters.ModelAdapter (set model_types, multimodal_model, text_model, "
            "vision_token_ids) and call mmreduce.adapters.register_adapter(YourAdapter), or pass adapter=YourAdapter "
            "to mmreduce.wrap"
        )
    return ADAPTERS[model_type](model)


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class registered for `model_type`; ValueError naming the supported families otherwise."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no mmreduce adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}. To add "
            "one, subclass mmreduce.adapters.ModelAdapter and call mmreduce.adapters.register_adapter(YourAdapter)"
        )
    return ADAPTERS[model_type]


def model_class_for(config) -> type[nn.Module]:
    """The transformers class that loads a checkpoint with this `config`, as its family's adapter names it."""
    return adapter_class(getattr(config, "model_type", None)).model_class(config)


def load_pretrained(path, **kwargs) -> nn.Module:
    """Loads the checkpoint folder `path` offline with the class its family's adapter names (`model_class`).

    `kwargs` go to `from_pretrained` (e.g. `dtype`, `attn_implementation`). Remote code is never trusted here:
    a family that needs it must be loaded by the caller, deliberately.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return model_class_for(config).from_pretrained(path, local_files_only=True, **kwargs)

