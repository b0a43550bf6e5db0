"""ARCHITECTURE §4 invariants 1-3 for every registered method, every adapter and both attention implementations.

The matrix is built from the registries, not from a list kept here: methods from `mmreduce.list_methods()` (each
shown through its own `example()`), model families from `mmreduce.adapters.ADAPTERS` (each built by
`VLM_BUILDERS` in tests/support/vlm_factory.py). A newly registered method or adapter is covered without editing
this file. Every comparison is against something the engine does not compute: the stock model, an eager
full-length masked reference (tests/support/masked_reference.py), or the same sample run alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmreduce
from mmreduce.adapters import ADAPTERS, get_adapter
from mmreduce.before_llm import TowerProbe
from mmreduce.methods import DropStage, ReductionMethod
from tests.support.masked_reference import (
    assert_matches_reference, dropped_from_kept, reference_selection, text_view,
)
from tests.support.vlm_factory import VLM_BUILDERS, build_vlm, select_samples

LAYERS = 6
ATTENTION = ["sdpa", "eager"]
METHODS = mmreduce.list_methods()
MODELS = [(model_type, attn) for model_type in sorted(ADAPTERS) for attn in ATTENTION]

# Indirect parameters of the `vlm` fixture (pytest builds each combination once per module).
MODEL_PARAMS = [pytest.param(combo, id="-".join(combo)) for combo in MODELS]


@pytest.fixture(scope="module")
def vlm(request):
    """(model, batch) of one (model_type, attention) combination, built once per module."""
    model_type, attn = request.param
    if model_type not in VLM_BUILDERS:
        pytest.fail(f"adapter {model_type!r} ({ADAPTERS[model_type].__name__}) has no tiny-model builder: add one to "
                    "VLM_BUILDERS in tests/support/vlm_factory.py")
    model, batch = build_vlm(model_type, attn, layers=LAYERS)
    assert model.config.model_type == model_type, f"VLM_BUILDERS[{model_type!r}] builds a {model.config.model_type}"
    return model, batch


def example(name: str, keep_all: bool = False) -> ReductionMethod:
    """The method's own example for a 6-layer model; a method that declares it cannot be shown is skipped with
    its reason."""
    try:
        return mmreduce.method_class(name).example(LAYERS, keep_all=keep_all)
    except NotImplementedError as why:
        pytest.skip(f"{name} has no example on a generic tiny model: {why}")


def reducing_example(name: str) -> ReductionMethod:
    """`example(name)`, skipped for a method with no drop stages (the unreduced `baseline`): it has nothing to
    compare against a reference here, and the keep-everything test covers it."""
    method = example(name)
    if not method.check_stages(LAYERS):
        pytest.skip(f"{name}: its example has no drop stages (nothing is reduced); "
                    "test_keep_everything_is_bit_identical covers it")
    return method


def skip_unreadable_tower(method: ReductionMethod, model) -> None:
    """Skips a method that ranks by vision-tower signals the family's tower cannot give (Qwen2-VL has no CLS token
    and a fused, windowed attention): `wrap` refuses it, which tests/core/test_visionzip_tome.py checks."""
    before = method.before_stage()
    requests = before.signal_requests() if before is not None else []
    if requests:
        try:
            TowerProbe(get_adapter(model), requests)
        except ValueError as refusal:
            pytest.skip(f"{method.name} on {model.config.model_type}: {refusal}")


def vision_ids(model) -> tuple[int, ...]:
    """The placeholder ids the family declares as vision tokens (e.g. Qwen2-VL's image and video pads): a fact of
    the family that the reference reads, not a computation of the engine."""
    return get_adapter(model).vision_token_ids()


def ranks_by_attention(method: ReductionMethod) -> bool:
    """True for methods that keep the default score (the last prompt token's attention)."""
    return type(method).score is ReductionMethod.score


def reference_stages(method: ReductionMethod) -> list[dict]:
    """The method's drop stages as the masked reference reads them (score_layer, apply_layer, ratio|fraction|count)."""
    return [{key: value for key, value in dataclasses.asdict(stage).items() if value is not None}
            for stage in method.check_stages(LAYERS)]


# ---- the examples are the hand-written settings ------------------------------------------------------------

# Wrap kwargs per method and, for the methods ranked by attention, reference stages worked out by hand from the
# papers' definitions. Each method's `example()` must equal them, so the matrix below runs exactly these.
HAND_WRITTEN = {
    "fastv": (dict(layer=2, keep_ratio=0.25), [dict(score_layer=1, apply_layer=2, ratio=0.25)]),
    "pdrop": (dict(keep_ratio=0.5), [dict(score_layer=layer, apply_layer=layer, ratio=0.5) for layer in (2, 3, 4)]),
    "schedule": (
        dict(keep=[1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
        [dict(score_layer=2, apply_layer=2, fraction=0.5), dict(score_layer=4, apply_layer=4, fraction=0.25)],
    ),
    "random": (dict(layer=3, keep_ratio=0.3, seed=7), None),
}
HAND_WRITTEN_KEEP_ALL = {
    "fastv": dict(layer=1, keep_ratio=1.0),
    "pdrop": dict(layers=(1, 3, 5), keep_ratio=1.0),
    "schedule": dict(keep=[1.0] * LAYERS),
    "random": dict(layer=1, keep_ratio=1.0),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_examples_are_the_hand_written_settings(name):
    kwargs, _ = HAND_WRITTEN[name]
    assert mmreduce.method_class(name).example(LAYERS) == mmreduce.create_method(name, **kwargs)
    keep_all = mmreduce.method_class(name).example(LAYERS, keep_all=True)
    assert keep_all == mmreduce.create_method(name, **HAND_WRITTEN_KEEP_ALL[name])


@pytest.mark.parametrize("name", sorted(name for name, (_, stages) in HAND_WRITTEN.items() if stages is not None))
def test_example_stages_are_the_hand_written_reference_stages(name):
    _, stages = HAND_WRITTEN[name]
    assert mmreduce.method_class(name).example(LAYERS).check_stages(LAYERS) == [DropStage(**s) for s in stages]


def test_every_adapter_has_a_tiny_model_builder():
    missing = sorted(set(ADAPTERS) - set(VLM_BUILDERS))
    assert not missing, (f"adapters {missing} have no tiny-model builder, so the invariant matrix cannot run them: "
                         "add one per model_type to VLM_BUILDERS in tests/support/vlm_factory.py")


# ---- the matrix ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vlm", MODEL_PARAMS, indirect=True)
def test_keep_everything_is_bit_identical(vlm, method):
    model, batch = vlm
    keep_all = example(method, keep_all=True)
    skip_unreadable_tower(keep_all, model)
    with torch.no_grad():
        stock_logits = model(**batch).logits
        stock_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with mmreduce.wrap(model, keep_all) as reduced:
            logits = reduced(**batch).logits
            tokens = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
            assert not reduced.stats.reduced
    assert torch.equal(logits, stock_logits)
    assert torch.equal(tokens, stock_tokens)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vlm", MODEL_PARAMS, indirect=True)
def test_matches_masked_reference(vlm, method):
    """Physical dropping == full-length masked eager reference, at prefill and every decode step, cache or not."""
    model, batch = vlm
    reduction = reducing_example(method)
    steps = 4
    with torch.no_grad(), mmreduce.wrap(model, reduction) as reduced:
        logits = reduced(**batch).logits
        kept = reduced.stats.kept_positions
        cached = reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        uncached = reduced.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, use_cache=False)
    # The prompt as the text model sees it (longer than input_ids where placeholders are expanded before the LLM).
    input_mask, vision = text_view(model, batch, vision_ids(model))
    if ranks_by_attention(reduction):
        # An independent selection from the eager attention weights the model returns.
        dropped_from, reference_kept = reference_selection(model, batch, reference_stages(reduction), vision)
        assert kept == reference_kept, "selection differs from the eager-attention reference"
    else:
        # A method with its own score (e.g. seeded random): check the computation on the engine's selection.
        dropped_from = dropped_from_kept(batch, kept, vision)
    assert kept, "the method dropped nothing: the comparison would be vacuous"

    assert_matches_reference(model, batch, logits, (cached, uncached), dropped_from, input_mask, steps)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vlm", MODEL_PARAMS, indirect=True)
def test_padded_batch_equals_each_sample_alone(vlm, method):
    model, batch = vlm
    reduction = reducing_example(method)
    with torch.no_grad(), mmreduce.wrap(model, reduction) as reduced:
        batched = reduced.generate(**batch, max_new_tokens=4, do_sample=False)
        batched_kept = reduced.stats.kept_positions
        pad = (~text_view(model, batch, vision_ids(model))[0]).sum(dim=1)  # padding the text model sees
        for row in range(batch["input_ids"].shape[0]):
            alone = reduced.generate(**select_samples(batch, row), max_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0, -4:], batched[row, -4:]), f"sample {row} differs alone vs in the batch"
            for layer, rows in reduced.stats.kept_positions.items():
                shifted = [p + int(pad[row]) for p in rows[0]]
                assert shifted == batched_kept[layer][row]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vlm", MODEL_PARAMS, indirect=True)
def test_beam_search_cache_and_padding(vlm, method):
    model, batch = vlm
    reduction = reducing_example(method)
    beam = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad(), mmreduce.wrap(model, reduction) as reduced:
        cached = reduced.generate(**batch, **beam)
        uncached = reduced.generate(**batch, **beam, use_cache=False)
        first_alone = reduced.generate(**select_samples(batch, 0), **beam)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:2, -4:], first_alone[:, -4:])
