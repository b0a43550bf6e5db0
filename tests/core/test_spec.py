"""The SPEC parser (`mmreduce.spec`): `NAME:key=value,...` as the CLI, the harness, the lmms plugin and the demo
read it, and fitting a keep ratio to an equivalent-token budget."""

from __future__ import annotations

import pytest

from mmreduce import Baseline, fit_equivalent, parse_spec


def test_spec_parsing():
    spec = parse_spec("pdrop:layers=2+4+6,keep_ratio=0.5")
    assert spec.name == "pdrop" and dict(spec.kwargs) == {"layers": (2, 4, 6), "keep_ratio": 0.5}
    assert isinstance(parse_spec("baseline").build(), Baseline)  # the unreduced model is a registered method
    assert parse_spec("random:seed=3,layer=1").build().seed == 3
    for bad, message in [("fastv:ratio=1", "no field 'ratio'"), ("nope", "unknown method"),
                         ("fastv:layer", "not key=value"), ("baseline:x=1", "no parameters"),
                         ("fastv:keep_ratio=0.5,equivalent=0.3", "either keep_ratio or equivalent"),
                         ("schedule:equivalent=0.3", "needs a method with a keep_ratio")]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


def test_equivalent_budget_is_met_or_refused():
    method = fit_equivalent("pdrop", {"layers": (1, 3, 5)}, 0.25, 8, 256)
    assert sum(method.planned_counts(8, 256)) / 8 == pytest.approx(64, abs=0.5)
    method = fit_equivalent("fastv", {"layer": 2}, 100, 32, 576)  # an absolute count
    assert sum(method.planned_counts(32, 576)) / 32 == pytest.approx(100, abs=0.5)
    with pytest.raises(ValueError, match="cannot reach .* its minimum is"):
        fit_equivalent("fastv", {"layer": 2}, 0.2, 8, 256)  # layers 0-1 alone are 25%
