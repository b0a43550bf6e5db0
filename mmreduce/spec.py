"""Method specs on the command line: `NAME` or `NAME:key=value,key=value` (lists joined with `+`).

    pdrop:layers=2+4+6,keep_ratio=0.5      -> ("pdrop", {"layers": (2, 4, 6), "keep_ratio": 0.5})
    fastv:layer=2,equivalent=0.33          -> fitted: keep_ratio chosen so 33% of vision tokens remain on average
    baseline                               -> the unreduced model (a registered method like any other)

`equivalent` is not a method field: the harness fits the method's `keep_ratio` so that the vision tokens averaged
over layers equal that fraction of the image's tokens (or that many tokens, when > 1).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .methods.base import ReductionMethod, create_method, list_methods, method_class
from .methods.before import BeforeLLMMethod
from .methods.compose import Compose

__all__ = ["THEN", "BudgetUnreachable", "MethodSpec", "fit_equivalent", "fits_equivalent", "parse_spec"]


class BudgetUnreachable(ValueError):
    """An `equivalent=` budget below what the method can reach on this model (its layers before the first drop
    keep every token): a property of the budget and the model, reported as a skipped row by comparisons."""


#: Joins a before-the-LLM method and an in-LLM one in one SPEC: `visionzip:keep_ratio=0.5 then pdrop`.
THEN = " then "


@dataclass(frozen=True)
class MethodSpec:
    """A parsed SPEC; a composed one (`A then B`) has name "compose", `parts` (A's spec, B's spec) and no kwargs."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    equivalent: float | None = None
    text: str = ""
    parts: tuple["MethodSpec", ...] = ()

    def build(self, num_layers: int | None = None, vision_tokens: int | None = None) -> ReductionMethod:
        """The method object; fits `keep_ratio` when an equivalent budget was asked for (in a composed SPEC, each
        part's budget is of the tokens that reach it)."""
        if self.parts:
            before_spec, inside_spec = self.parts
            before = before_spec.build(num_layers, vision_tokens)
            remaining = before.kept_tokens(vision_tokens) if vision_tokens is not None else None
            return Compose(before, inside_spec.build(num_layers, remaining))
        kwargs = dict(self.kwargs)
        if self.equivalent is None:
            return create_method(self.name, **kwargs)
        if num_layers is None or vision_tokens is None:
            raise ValueError(f"spec {self.text!r} asks for an equivalent budget: the model depth and vision tokens "
                             "are needed to fit it")
        return fit_equivalent(self.name, kwargs, self.equivalent, num_layers, vision_tokens)


def _parse_untyped(text: str) -> Any:
    """A value for a field without a usable annotation: None, a bool, an int, a float, a '+'-list or the text."""
    if "+" in text:
        return tuple(_parse_untyped(part) for part in text.split("+"))
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _scalar(text: str, kind: type, field: str) -> Any:
    """`text` as an int, float, bool or str; ValueError naming the field and what it needs otherwise."""
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{field} must be true or false, got {text!r}")
        return text.lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{field} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            # An integer stays an int (a number all the same): a schedule of whole numbers reads as counts.
            return int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"{field} must be a number, got {text!r}") from None
    return text


def _parse_value(text: str, annotation: Any, field: str) -> Any:
    """`text` converted to the field's annotated type: `tuple[int, ...]` takes one value or several joined with '+'
    (`layers=4` is the one-layer list (4,)); `X | None` also takes none/null; anything else is parsed untyped."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if options:
        if type(None) in options and text.lower() in ("none", "null"):
            return None
        typed = [option for option in options if option is not type(None)]
        annotation = typed[0] if len(typed) == 1 else Any
    if typing.get_origin(annotation) is tuple:
        item_type = (typing.get_args(annotation) or (Any,))[0]
        if item_type not in (int, float, str, bool):
            return _parse_untyped(text)
        what = {int: "integers", float: "numbers", str: "values", bool: "booleans"}[item_type]
        try:
            return tuple(_scalar(part.strip(), item_type, field) for part in text.split("+"))
        except ValueError:
            raise ValueError(f"{field} must be one or more {what} joined with '+', got {text!r}") from None
    if annotation in (int, float, str, bool):
        return _scalar(text, annotation, field)
    return _parse_untyped(text)


def parse_spec(text: str) -> MethodSpec:
    """Parses one SPEC; errors name the bad part and the valid fields."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty method spec {text!r}")
    if THEN.strip() in text.split():
        return _parse_composed(text)
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in list_methods():
        raise ValueError(f"unknown method {name!r} in spec {text!r}; choose one of {list_methods()}")
    kwargs: dict[str, Any] = {}
    equivalent = None
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    if not fields and rest.strip():
        raise ValueError(f"{name} takes no parameters, got {text!r}")
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"spec part {item!r} of {text!r} is not key=value")
        if key in kwargs or (key == "equivalent" and equivalent is not None):
            raise ValueError(f"{key} is given twice in {text!r}")
        if key == "equivalent":
            equivalent = float(_scalar(value, float, f"{name}: equivalent"))
            if not equivalent > 0 or math.isinf(equivalent):
                raise ValueError(f"{name}: equivalent must be a number > 0 (a fraction <= 1 or a token count), "
                                 f"got {value!r}")
            continue
        if key not in fields:
            raise ValueError(f"{name} has no field {key!r} (spec {text!r}); fields: {sorted(fields)} or equivalent")
        try:
            kwargs[key] = _parse_value(value, hints.get(key, Any), key)
        except ValueError as error:
            raise ValueError(f"{name}: {error} (spec {text!r})") from None
    budget = cls.budget_field
    if equivalent is not None and budget is None:
        raise ValueError(f"equivalent= is not defined for {name} (what it keeps does not follow from a token count); "
                         f"give its fields instead: {sorted(fields)}")
    if equivalent is not None and budget not in fields:
        raise ValueError(f"equivalent= needs a method with a {budget} field, {name} has none")
    if equivalent is not None and budget in kwargs:
        raise ValueError(f"give either {budget} or equivalent in {text!r}, not both")
    create_method(name, **kwargs)  # validate the fields now
    return MethodSpec(name, tuple(sorted(kwargs.items())), equivalent, text.strip())


def _parse_composed(text: str) -> MethodSpec:
    """`A then B`: A a before-the-LLM method, B an in-LLM one."""
    parts = [part.strip() for part in " ".join(text.split()).split(THEN)]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a composed spec is 'BEFORE then INSIDE' (e.g. 'visionzip:keep_ratio=0.5 then pdrop'), "
                         f"got {text!r}")
    before, inside = (parse_spec(part) for part in parts)
    if not _is_before(before.name):
        raise ValueError(f"in {text!r}, {before.name} is not a before-the-LLM method; the part before 'then' must be "
                         f"one of {', '.join(n for n in list_methods() if _is_before(n))}")
    if method_class(inside.name).before_stage is not ReductionMethod.before_stage:
        raise ValueError(f"in {text!r}, {inside.name} reduces before the LLM itself; the part after 'then' must work "
                         "inside it only (fastv, pdrop, schedule, ...)")
    return MethodSpec("compose", (), None, " ".join(text.split()), (before, inside))


def fits_equivalent(name: str) -> bool:
    """Whether `NAME:equivalent=F` is defined for the registered method `name` (it has its budget field)."""
    cls = method_class(name)
    return cls.budget_field is not None and cls.budget_field in {f.name for f in dataclasses.fields(cls) if f.init}


def _is_before(name: str) -> bool:
    return issubclass(method_class(name), BeforeLLMMethod)


def fit_equivalent(name: str, kwargs: dict, equivalent: float, num_layers: int, vision_tokens: int):
    """The method with its budget field (`keep_ratio`, or the class's `budget_field`) fitted by bisection so that its
    mean vision tokens over layers match the budget.

    `equivalent` <= 1 is a fraction of `vision_tokens`, > 1 a token count. Raises `BudgetUnreachable` when the
    budget is below what the method can reach at its layers (layer 0 and the layers before the first drop stay
    full), and ValueError when the method itself does not fit the model (e.g. a drop layer out of range).
    """
    target = equivalent * vision_tokens if equivalent <= 1 else equivalent
    if target > vision_tokens:
        raise ValueError(f"equivalent={equivalent:g} asks for {target:g} vision tokens, but the prompt has "
                         f"{vision_tokens}; ask for at most {vision_tokens} tokens or a fraction <= 1")
    field = method_class(name).budget_field

    def mean_tokens(ratio: float) -> float:
        method = create_method(name, **kwargs, **{field: ratio})
        counts = method.planned_counts(num_layers, vision_tokens)
        return sum(counts) / num_layers

    low, high = 1e-6, 1.0
    if mean_tokens(low) > target + 1e-9:
        raise BudgetUnreachable(
            f"{name} {kwargs or ''} cannot reach {target:.1f} equivalent vision tokens on a {num_layers}-layer model: "
            f"its minimum is {mean_tokens(low):.1f} (layers before the first drop keep all {vision_tokens})"
        )
    if mean_tokens(high) <= target:
        return create_method(name, **kwargs, **{field: 1.0})
    for _ in range(60):
        middle = (low + high) / 2
        if mean_tokens(middle) > target:
            high = middle
        else:
            low = middle
    # Floor (not round) to 6 digits: the fitted method must stay within the budget.
    return create_method(name, **kwargs, **{field: max(math.floor(low * 1e6) / 1e6, 1e-6)})
