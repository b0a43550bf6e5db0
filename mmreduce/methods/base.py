"""The base of every reduction method, the method registry, and the shared top-k selection.

A method inside the LLM says *where* it drops (`stages`) and *how it ranks* the surviving vision tokens (`score`);
the engine owns everything else (hooks, gathering, masks, cache, stats). Top-k is shared so that every method
breaks ties the same way: toward the earlier position.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mmreduce.adapters import ModelAdapter

__all__ = [
    "DropStage",
    "ReductionMethod",
    "ScoreContext",
    "check_layer",
    "check_ratio",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
    "top_k_sorted",
]

_REGISTRY: dict[str, type["ReductionMethod"]] = {}


def register_method(name: str) -> Callable[[type["ReductionMethod"]], type["ReductionMethod"]]:
    """Class decorator: makes `cls` available as `mmreduce.wrap(model, name, ...)`."""
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method name must be lowercase letters, digits or '_', got {name!r}")

    def decorate(cls: type[ReductionMethod]) -> type[ReductionMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            warnings.warn(f"method {name!r} re-registered: {_REGISTRY[name].__name__} -> {cls.__name__}", stacklevel=2)
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorate


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style `pattern`, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def method_class(name: str) -> type["ReductionMethod"]:
    """The class registered under `name`; ValueError listing the registered names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}")
    return _REGISTRY[name]


def create_method(name: str, **kwargs: Any) -> "ReductionMethod":
    """Builds a registered method; `None` values are dropped so unset CLI options keep the defaults."""
    cls = method_class(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"{cls.__name__} ({name!r}) got unknown keyword(s) {unknown}; its fields are {sorted(fields)}")
    return cls(**kwargs)


@dataclass(frozen=True)
class DropStage:
    """One physical drop: tokens are ranked at the input of `score_layer`; layers >= `apply_layer` see the kept ones.

    Exactly one of `ratio` (of the currently surviving vision tokens), `fraction` (of the sample's initial vision
    tokens) or `count` (absolute) says how many vision tokens survive.
    """

    score_layer: int
    apply_layer: int
    ratio: float | None = None
    fraction: float | None = None
    count: int | None = None

    def __post_init__(self):
        given = [v is not None for v in (self.ratio, self.fraction, self.count)]
        if sum(given) != 1:
            raise ValueError("DropStage needs exactly one of ratio, fraction, count")
        if not 0 <= self.score_layer <= self.apply_layer:
            raise ValueError(f"DropStage needs 0 <= score_layer <= apply_layer, got {self.score_layer}, {self.apply_layer}")

    def keep_counts(self, surviving: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """(B,) vision tokens to keep per sample, given (B,) surviving and (B,) initial counts."""
        if self.ratio is not None:
            wanted = _ceil(self.ratio * surviving.double())
        elif self.fraction is not None:
            wanted = _ceil(self.fraction * initial.double())
        else:
            wanted = torch.full_like(surviving, self.count)
            too_many = wanted > surviving
            if too_many.any():
                sample = int(too_many.nonzero()[0, 0])
                raise ValueError(
                    f"schedule keeps {self.count} vision tokens at layer {self.apply_layer}, but sample {sample} "
                    f"has only {int(surviving[sample])} left (of {int(initial[sample])}); keep must not exceed "
                    "the available vision tokens (use fractions for images of different sizes)"
                )
        return torch.minimum(wanted.to(surviving.dtype), surviving)


def _ceil(x: torch.Tensor) -> torch.Tensor:
    # ceil with a tolerance: 0.25 * 576 must give 144, not 145 through float error.
    return torch.ceil(x - 1e-9).long()


@dataclass
class ScoreContext:
    """What a method sees when it ranks vision tokens at a drop boundary.

    Attributes:
        layer_idx: the scoring layer (its input is `hidden`).
        layer: that decoder layer module.
        hidden: (B, T, D) the layer's input (the current, possibly already shortened, stream).
        vision: (B, T) bool, surviving vision tokens.
        key_valid: (B, T) bool, tokens that can be attended to (not padding, not filler).
        query_index: (B,) position in the stream of the last prompt token of each sample.
        position_embeddings: (cos, sin), each (B or 1, T, hd), for the stream.
        original_index: (B, T) position of each stream token in the model's (padded) input_ids.
        relative_position: (B, T) position of each stream token counted from the sample's first real token
            (independent of padding).
        sample_seed: (B,) int64, a per-sample value derived from the sample's own tokens (for seeded methods, so
            that a sample's selection does not depend on the rest of the batch).
        adapter: the model-family adapter.
        layer_kwargs: the keyword arguments the scoring layer receives for this stream (per-token ones gathered).
    """

    layer_idx: int
    layer: nn.Module
    hidden: torch.Tensor
    vision: torch.Tensor
    key_valid: torch.Tensor
    query_index: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    original_index: torch.Tensor
    relative_position: torch.Tensor
    sample_seed: torch.Tensor
    adapter: "ModelAdapter"
    layer_kwargs: dict = field(default_factory=dict)

    def attention(self) -> torch.Tensor:
        """(B, H, T) float32 attention of the last prompt token at this layer (recomputed, any attn impl)."""
        return self.adapter.attention_probe(
            self.layer, self.hidden, self.query_index, self.position_embeddings, self.key_valid,
            layer_kwargs=self.layer_kwargs,
        )


@dataclass
class ReductionMethod:
    """Base of every in-LLM method. Subclasses are `@dataclass`es that validate their fields in `__post_init__`
    (`ValueError` naming the field) and override `stages` and, unless attention ranking fits, `score`."""

    name: ClassVar[str] = "base"
    #: The field that `equivalent=` budgets fit (a share in (0, 1] that fewer tokens follow from).
    budget_field: ClassVar[str | None] = "keep_ratio"

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "ReductionMethod":
        """A small instance for a model with `num_layers` decoder layers that drops vision tokens, or with
        `keep_all` runs its drop stages but keeps every token (what the invariant tests and docs use).

        Raises NotImplementedError, naming why, when the method cannot be shown on a generic tiny model.
        """
        raise NotImplementedError(f"{cls.__name__} defines no example(); override ReductionMethod.example")

    def stages(self, num_layers: int) -> list[DropStage]:
        """The drop boundaries for a decoder with `num_layers` layers (validated by `check_stages`)."""
        raise NotImplementedError

    def before_stage(self) -> "ReductionMethod | None":
        """The part of the method that reduces vision features before the language model (a `BeforeLLMMethod`),
        or None for a method that works inside the LLM only."""
        return None

    def check_inputs(self, initial_vision: torch.Tensor) -> None:
        """Called at every prefill with (B,) vision tokens per sample; raise ValueError for inputs it cannot serve."""

    def planned_counts(self, num_layers: int, initial: int) -> list[int]:
        """Vision tokens entering each layer for one sample with `initial` vision tokens (no model needed)."""
        counts, current = [], torch.tensor([initial])
        stages = {stage.apply_layer: stage for stage in self.check_stages(num_layers)}
        for layer in range(num_layers):
            if layer in stages:
                current = stages[layer].keep_counts(current, torch.tensor([initial]))
            counts.append(int(current[0]))
        return counts

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """(B, T) importance of every stream token; only vision positions are read. Higher = keep.

        Default: attention of the last prompt token at the scoring layer, mean over heads.
        """
        return ctx.attention().mean(dim=1)

    def check_stages(self, num_layers: int) -> list[DropStage]:
        """`stages(num_layers)`, checked against the model depth; errors name the offending layer."""
        stages = self.stages(num_layers)
        previous: DropStage | None = None
        for stage in stages:
            if stage.apply_layer < 1:
                raise ValueError(f"{self.name}: layer 0 is never reduced (generate() sizes positions from it)")
            if stage.apply_layer >= num_layers:
                raise ValueError(
                    f"{self.name}: drop at layer {stage.apply_layer} is out of range for a model with "
                    f"{num_layers} decoder layers (valid: 1..{num_layers - 1})"
                )
            if previous is not None and (
                stage.apply_layer <= previous.apply_layer or stage.score_layer < previous.apply_layer
            ):
                raise ValueError(
                    f"{self.name}: drop layers must be strictly increasing, got apply layers "
                    f"{[s.apply_layer for s in stages]}"
                )
            previous = stage
        return stages

    def describe(self) -> str:
        """`name:field=value,...` (the CLI's spec syntax)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                value = "+".join(str(v) for v in value)
            parts.append(f"{f.name}={value}")
        return f"{self.name}:{','.join(parts)}" if parts else self.name


def top_k_sorted(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-sample top-k among candidate positions, returned as a mask; ties go to the earlier position.

    Args:
        scores: (B, T) float.
        candidates: (B, T) bool, positions that may be kept.
        k: (B,) how many to keep per sample (<= candidates per sample).

    Returns:
        (B, T) bool with exactly k[b] True entries in row b, all among the candidates.
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    # A stable descending sort keeps equal scores in position order, so ties break toward the earlier token.
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # (B, T)
    rank_mask = torch.arange(scores.shape[1], device=scores.device)[None, :] < k[:, None]  # (B, T)
    keep = torch.zeros_like(candidates)
    keep.scatter_(1, order, rank_mask)
    return keep & candidates


def check_ratio(owner: str, field: str, value: float, allow_zero: bool = False) -> None:
    """Raises ValueError unless `value` is a number in (0, 1] (or [0, 1] with allow_zero)."""
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok and value <= 1) or math.isnan(value):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{owner}.{field} must be in {interval}, got {value!r}")


def check_layer(owner: str, field: str, value: Any, minimum: int = 1) -> None:
    """Raises ValueError unless `value` is an integer >= `minimum` (a layer index; bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{field} must be an integer >= {minimum}, got {value!r}")
