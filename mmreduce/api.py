"""`wrap(model, method)` -> ReducedModel; `unwrap(model)` restores it exactly."""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch import nn

from mmreduce.adapters import ModelAdapter, get_adapter

from .engine import LayerPrefix, Reducer
from .methods.base import ReductionMethod, create_method
from .methods.compose import Compose
from .stats import ReductionStats

__all__ = ["LayerPrefix", "ReducedModel", "capture_prefix", "resume_prefix", "unwrap", "wrap"]

# model -> its ReducedModel; a model can be wrapped once at a time, and two models never share a Reducer.
_WRAPPED: "weakref.WeakKeyDictionary[nn.Module, ReducedModel]" = weakref.WeakKeyDictionary()


class ReducedModel:
    """A stock Hugging Face VLM with vision-token reduction hooked in.

    Proxies `generate`, `__call__`/`forward` and attribute access to the wrapped model; `stats` describes the last
    prefill (and the decode steps after it). Use `unwrap()` or a `with` block to take the hooks out again.
    """

    def __init__(self, model: nn.Module, method: ReductionMethod, adapter: ModelAdapter, positions: str = "original"):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "_reducer", Reducer(model, method, adapter, positions))
        self._reducer.install()

    @property
    def stats(self) -> ReductionStats:
        return self._reducer.stats

    @property
    def is_wrapped(self) -> bool:
        return _WRAPPED.get(self.model) is self

    def __call__(self, *args, **kwargs):
        self._check_live()
        self._reducer.note_call(kwargs)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._reducer.note_call({})

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`model.generate(...)`; without a cache the scoring query stays the last prompt token at every step, so
        `use_cache=False` selects the same tokens as the cached run."""
        self._check_live()
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunk is not None and self._reducer.reduces:
            raise ValueError(
                f"prefill_chunk_size={chunk} splits the prompt over several forwards, and mmreduce reduces one whole "
                "prefill at a time (a chunk would be reduced without the rest of the image); pass "
                "prefill_chunk_size=None"
            )
        self._reducer.note_call(kwargs)
        self._reducer.start_generate()
        start = time.perf_counter()
        try:
            output = self.model.generate(*args, **kwargs)
        finally:
            self._reducer.end_generate()
            self._reducer.note_call({})
        self._reducer.stats.generate_ms = (time.perf_counter() - start) * 1e3
        return output

    def unwrap(self) -> nn.Module:
        """Removes every hook; the model computes exactly what it computed before `wrap`."""
        self._reducer.remove()
        if _WRAPPED.get(self.model) is self:
            del _WRAPPED[self.model]
        return self.model

    def __enter__(self) -> "ReducedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.model, name, value)

    def __repr__(self) -> str:
        state = "wrapped" if self.is_wrapped else "unwrapped"
        return f"ReducedModel({type(self.model).__name__}, {self.method.describe()}, {state})"

    def _check_live(self) -> None:
        if not self.is_wrapped:
            raise RuntimeError("this ReducedModel was unwrapped; call mmreduce.wrap(model, ...) again")


def wrap(
    model: nn.Module,
    method: ReductionMethod | str | list,
    *,
    adapter: ModelAdapter | type[ModelAdapter] | str | None = None,
    positions: str = "original",
    **method_kwargs: Any,
) -> ReducedModel:
    """Hooks vision-token reduction into a stock Hugging Face VLM.

    Args:
        model: e.g. `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration`.
        method: a registered name (`mmreduce.list_methods()`), a method object, or a pair [before-the-LLM method,
            in-LLM method] (names or objects) that runs both (`Compose`).
        adapter: override the adapter chosen from `model.config.model_type`.
        positions: where a before-the-LLM method's kept tokens sit for RoPE: "original" (the positions they had in
            the full prompt; text after the image keeps its positions too) or "packed" (the shortened prompt is
            numbered afresh, as the papers do; one-axis RoPE only).
        **method_kwargs: fields of the method's dataclass (only with a method name).

    Returns:
        A `ReducedModel`; `model` itself is reduced too until `unwrap()`.
    """
    if isinstance(model, ReducedModel):
        raise ValueError("this model is already wrapped (got a ReducedModel); unwrap() it before wrapping again")
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap() expects a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    if model in _WRAPPED:
        raise ValueError(
            f"{type(model).__name__} is already wrapped with {_WRAPPED[model].method.describe()}; "
            "call mmreduce.unwrap(model) first"
        )
    if isinstance(method, (list, tuple)):
        if method_kwargs:
            raise TypeError(f"keyword arguments {sorted(method_kwargs)} are only accepted with one method name; "
                            "pass method objects in the list")
        if len(method) != 2:
            raise ValueError(f"a composed method is [before-the-LLM method, in-LLM method], got {len(method)} items")
        before, inside = (create_method(m) if isinstance(m, str) else m for m in method)
        method = Compose(before, inside)
    elif isinstance(method, str):
        method = create_method(method, **method_kwargs)
    elif isinstance(method, ReductionMethod):
        if method_kwargs:
            raise TypeError(f"keyword arguments {sorted(method_kwargs)} are only accepted with a method name")
    else:
        raise TypeError(f"method must be a registered name or a ReductionMethod, got {type(method).__name__}")
    reduced = ReducedModel(model, method, get_adapter(model, adapter), positions)
    _WRAPPED[model] = reduced
    return reduced


def unwrap(model: nn.Module | ReducedModel) -> nn.Module:
    """Removes mmreduce's hooks from a model (or a ReducedModel) and returns the plain model."""
    if isinstance(model, ReducedModel):
        return model.unwrap()
    reduced = _WRAPPED.get(model)
    if reduced is None:
        raise ValueError(f"{type(model).__name__} is not wrapped by mmreduce")
    return reduced.unwrap()


def capture_prefix(model: nn.Module, method: ReductionMethod, inputs: dict, layer: int) -> LayerPrefix:
    """Runs one prefill of `inputs` under `method` through decoder layers < `layer` and stops at the input of `layer`.

    With `resume_prefix`, a search that changes only what happens from `layer` on (G-Search, layer by layer) pays
    for the layers before it once. `inputs` are processor outputs (prompts left-padded).
    """
    with wrap(model, method) as reduced:
        with torch.inference_mode():
            return reduced._reducer.capture(lambda: model(**inputs, use_cache=False, logits_to_keep=1), layer)


def resume_prefix(model: nn.Module, method: ReductionMethod, prefix: LayerPrefix) -> torch.Tensor:
    """Finishes a captured prefill under `method` (which must keep what the captured one kept before
    `prefix.layer`): (B, D) output of the last decoder layer at each sample's last prompt token (before the final
    norm; `adapter.logits_from_hidden` turns it into logits)."""
    with wrap(model, method) as reduced:
        with torch.inference_mode():
            hidden, query = reduced._reducer.resume(prefix)  # (B, T, D), (B,)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, query]  # (B, D)
