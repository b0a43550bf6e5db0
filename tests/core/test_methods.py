"""Method definitions, the registry, validation and bad input to `wrap` (ARCHITECTURE §4.5-4.7, §5).

The engine's own refusals (static cache, 4-D masks, unsupported attention, unknown model types) are in
test_engine.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import mmreduce
from mmreduce.methods import DropStage, default_pdrop_layers, top_k_sorted


@pytest.fixture
def model(module_llava):
    """The module's tiny LLaVA-1.5 (sdpa, 6 layers): these tests wrap and unwrap it."""
    return module_llava


def test_registry_lists_the_methods():
    assert {"baseline", "fastv", "pdrop", "schedule", "random"} <= set(mmreduce.list_methods())
    assert mmreduce.list_methods("p*") == ["pdrop", "pool"]
    assert mmreduce.method_class("fastv") is mmreduce.FastV and mmreduce.method_class("baseline") is mmreduce.Baseline
    with pytest.raises(ValueError, match="unknown method 'fastvv'; registered methods: aim, baseline, fastv"):
        mmreduce.method_class("fastvv")


def test_examples_fit_the_depth_and_keep_all_keeps_everything():
    """Every registered method's example is valid on the model it is made for; the keep-all one plans no drop."""
    for name in mmreduce.list_methods():
        cls = mmreduce.method_class(name)
        for layers in (2, 6, 32):
            try:
                dropping, keep_all = cls.example(layers), cls.example(layers, keep_all=True)
            except NotImplementedError as why:
                assert str(why), f"{name}.example raised NotImplementedError without a reason"
                continue
            assert isinstance(dropping, cls) and isinstance(keep_all, cls)
            assert keep_all.planned_counts(layers, 64) == [64] * layers
            before_llm = dropping.before_stage() is not None
            # Inside the LLM, layer 0 is never reduced; a before-the-LLM method reduces every layer alike.
            assert (dropping.planned_counts(layers, 64)[0] < 64) == before_llm, name


def test_top_k_breaks_ties_toward_earlier_positions():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.9, 0.1]])
    candidates = torch.tensor([[True, True, True, True, False, True]])
    keep = top_k_sorted(scores, candidates, torch.tensor([3]))
    # 0.9 at 1; then the 0.5 tie at 0, 2, 3 -> 0 and 2; position 4 is not a candidate
    assert keep.nonzero()[:, 1].tolist() == [0, 1, 2]


def test_keep_counts_are_ceilings_without_float_error():
    stage = DropStage(score_layer=1, apply_layer=1, ratio=0.25)
    assert stage.keep_counts(torch.tensor([576, 3, 1]), torch.tensor([576, 3, 1])).tolist() == [144, 1, 1]
    fraction = DropStage(score_layer=1, apply_layer=1, fraction=1 / 3)
    assert fraction.keep_counts(torch.tensor([100]), torch.tensor([576])).tolist() == [100]  # ⌈192⌉ capped
    assert fraction.keep_counts(torch.tensor([576]), torch.tensor([576])).tolist() == [192]


def test_pdrop_default_layers_scale_the_papers_8_16_24():
    assert default_pdrop_layers(32) == (8, 16, 24)
    assert default_pdrop_layers(8) == (2, 4, 6)
    assert default_pdrop_layers(16) == (4, 8, 12)


def test_planned_counts_follow_the_definitions():
    assert mmreduce.FastV(layer=2, keep_ratio=0.25).planned_counts(6, 576) == [576, 576, 144, 144, 144, 144]
    assert mmreduce.PyramidDrop(keep_ratio=0.5).planned_counts(32, 576) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    schedule = mmreduce.Schedule(keep=[576, 576, 300, 300, 100, 0])
    assert schedule.planned_counts(6, 576) == [576, 576, 300, 300, 100, 0]


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("fastv", dict(keep_ratio=0.0), "keep_ratio must be in"),
        ("fastv", dict(keep_ratio=1.5), "keep_ratio must be in"),
        ("fastv", dict(layer=0), "layer must be an integer >= 1"),
        ("pdrop", dict(layers=(4, 2)), "strictly increasing"),
        ("pdrop", dict(layers=(0, 2)), "integer >= 1"),
        ("pdrop", dict(layers=()), "must not be empty"),
        ("pdrop", dict(keep_ratio=-0.1), "keep_ratio"),
        ("schedule", dict(keep=[1.0, 0.5, 0.7]), "non-increasing"),
        ("schedule", dict(keep=[0.9, 0.5]), "start at 1.0"),
        ("schedule", dict(keep=[576, 100.5], unit="count"), "integers"),
        ("schedule", dict(keep=[576, 576], unit="tokens"), "unit must be one of"),
        ("schedule", dict(keep=[576, 600]), "non-increasing, but layer 1 keeps 600"),
        ("schedule", dict(), "keep is required"),
        ("random", dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_fields_name_the_problem(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mmreduce.create_method(name, **kwargs)


def test_unknown_method_and_keyword(model):
    with pytest.raises(ValueError, match="unknown method 'fastvv'.*fastv"):
        mmreduce.wrap(model, "fastvv")
    with pytest.raises(TypeError, match="unknown keyword.*ratio"):
        mmreduce.wrap(model, "fastv", ratio=0.5)
    with pytest.raises(TypeError, match="only accepted with a method name"):
        mmreduce.wrap(model, mmreduce.FastV(), keep_ratio=0.5)


def test_layers_out_of_range_and_wrong_schedule_length(model):
    with pytest.raises(ValueError, match="out of range.*6 decoder layers"):
        mmreduce.wrap(model, "fastv", layer=6)
    with pytest.raises(ValueError, match="out of range"):
        mmreduce.wrap(model, "pdrop", layers=(2, 9))
    with pytest.raises(ValueError, match="4 entries.*6 decoder layers"):
        mmreduce.wrap(model, "schedule", keep=[1.0, 1.0, 0.5, 0.5])
    assert not any(m._forward_pre_hooks for m in model.model.language_model.layers)  # failed wraps leave no hooks


def test_count_schedule_must_match_the_image(model, llava_inputs):
    batch = llava_inputs
    with torch.no_grad(), mmreduce.wrap(model, "schedule", keep=[48, 48, 20, 20, 10, 10]) as reduced:
        with pytest.raises(ValueError, match="made for 48 vision tokens, but sample 0 has 64"):
            reduced(**batch)
    with torch.no_grad(), mmreduce.wrap(model, "schedule", keep=[64, 64, 30, 30, 10, 10]) as reduced:
        reduced(**batch)
        assert reduced.stats.vision_tokens_per_layer == [[64, 64, 30, 30, 10, 10]] * 3


def test_schedule_json_round_trip_and_errors(tmp_path, model, llava_inputs):
    schedule = mmreduce.Schedule(keep=[1.0, 1.0, 0.5, 0.5, 0.25, 0.25], model="tiny", budget=0.5)
    path = tmp_path / "schedule.json"
    schedule.to_json(path)
    loaded = mmreduce.Schedule.from_json(path)
    assert loaded.keep == schedule.keep and loaded.unit == "fraction" and loaded.model == "tiny"
    assert json.loads(path.read_text())["num_layers"] == 6
    with torch.no_grad(), mmreduce.wrap(model, "schedule", path=str(path)) as reduced:
        reduced(**llava_inputs)
        assert reduced.stats.vision_tokens_per_layer[0] == [64, 64, 32, 32, 16, 16]
    with pytest.raises(ValueError, match="does not exist"):
        mmreduce.Schedule(path=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        mmreduce.Schedule(path=str(tmp_path / "bad.json"))
    (tmp_path / "deep.json").write_text(json.dumps({"keep": [1.0] * 32, "model": "llava-1.5-7b"}))
    with pytest.raises(ValueError, match=r"32 entries \(made for llava-1.5-7b\).*6 decoder layers"):
        mmreduce.wrap(model, "schedule", path=str(tmp_path / "deep.json"))


def test_random_is_seeded_uniform_and_per_sample(model, llava_inputs):
    batch = llava_inputs
    kept = []
    for seed in (0, 0, 1):
        with torch.no_grad(), mmreduce.wrap(model, "random", layer=2, keep_ratio=0.5, seed=seed) as reduced:
            reduced(**batch)
            kept.append(reduced.stats.kept_positions[2])
    assert kept[0] == kept[1] and kept[0] != kept[2]
    # Over many seeds every vision token is kept about half the time (a uniform draw, not a fixed pattern).
    hits = torch.zeros(64)
    single = {k: v[:1] for k, v in batch.items()}
    start = int((single["input_ids"][0] == 250).nonzero()[0])
    for seed in range(60):
        with torch.no_grad(), mmreduce.wrap(model, "random", layer=2, keep_ratio=0.5, seed=seed) as reduced:
            reduced(**single)
            hits[torch.tensor(reduced.stats.kept_positions[2][0]) - start] += 1
    assert hits.sum() == 60 * 32
    assert 10 < hits.min() and hits.max() < 50
