"""The lmms-eval plugin (`mmreduce.eval.lmms_plugin`) and its offline task (`eval/lmms_tasks/`).

The first tests need no lmms-eval. The rest run lmms-eval's own evaluator offline on the bundled tiny model and
are skipped, with the reason, where lmms-eval is not installed (0.7.3 needs av<16 and filelock<4; see INSTALL_HINT).
"""

from __future__ import annotations

import ast
import importlib.util
import json

import pytest
import torch

import mmreduce
from mmreduce.eval import lmms_plugin
from mmreduce.eval.lmms_plugin import TASKS_DIR, MMReduceLMM, build_prompt, parse_model_args

SKIP_REASON = "lmms-eval is not installed (0.7.3 needs av<16 and filelock<4 beside the pinned stack)"


def _task_utils():
    # lmms-eval imports a task's utils.py by file path; do the same
    spec = importlib.util.spec_from_file_location("mmreduce_lmms_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- without lmms-eval ---------------------------------------------------------------------------------------
def test_missing_lmms_eval_names_the_install_command(monkeypatch):
    monkeypatch.setattr(lmms_plugin, "_LMMS_IMPORT_ERROR", ImportError("No module named 'lmms_eval'"))
    install = r"pip install lmms-eval==0\.7\.3 av==15\.1\.0 filelock==3\.32\.7"
    with pytest.raises(ImportError, match=install + ".*No module named"):
        MMReduceLMM(pretrained="tiny-llava-shapes")
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        lmms_plugin.manifest()


def test_model_args_become_a_method_spec():
    args = parse_model_args("tiny-llava-shapes", method="pdrop", keep_ratio=0.25, layers="2+4", batch_size="4",
                            device="cpu", max_new_tokens=5, max_batch_size=None)
    assert (args.spec.name, dict(args.spec.kwargs)) == ("pdrop", {"keep_ratio": 0.25, "layers": (2, 4)})
    assert (args.batch_size, args.device, args.dtype, args.max_new_tokens) == (4, "cpu", torch.float32, 5)
    # one field inside method=, one outside; lmms-eval's quotes are dropped
    args = parse_model_args("x", method="'fastv:layer=3'", keep_ratio=0.5, device="cpu")
    assert dict(args.spec.kwargs) == {"layer": 3, "keep_ratio": 0.5}
    assert parse_model_args("x", method="pdrop", equivalent=64.0, device="cpu").spec.equivalent == 64.0
    assert parse_model_args("x", device="cpu").spec.name == "baseline"
    # lmms-eval turns "layers=2" into the int 2; a list field still gets a list
    assert dict(parse_model_args("x", method="pdrop", layers=2, device="cpu").spec.kwargs) == {"layers": (2,)}
    # before the LLM, and composed (the fields outside method= belong to its in-LLM part)
    args = parse_model_args("x", method="visionzip", keep_ratio=0.25, device="cpu")
    assert (args.spec.name, dict(args.spec.kwargs)) == ("visionzip", {"keep_ratio": 0.25})
    args = parse_model_args("x", method="tome:keep_ratio=0.5 then pdrop", keep_ratio=0.25, device="cpu")
    before, inside = args.spec.parts
    assert (before.name, dict(before.kwargs), inside.name, dict(inside.kwargs)) == (
        "tome", {"keep_ratio": 0.5}, "pdrop", {"keep_ratio": 0.25})


@pytest.mark.parametrize("kwargs, message", [
    (dict(pretrained=None), "pretrained="),
    (dict(method="pdrop", keep_ratoi=0.5), "keep_ratoi"),
    (dict(method="nope"), "'nope'"),
    (dict(method="baseline", keep_ratio=0.5), "baseline takes no parameters"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size="auto"), "batch_size='auto'"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer, got 2.5"),
    (dict(dtype="int8"), "'int8'"),
])
def test_bad_model_args_are_named(kwargs, message):
    kwargs = {"pretrained": "tiny-llava-shapes", "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match="model_args") as info:
        parse_model_args(**kwargs)
    assert message in str(info.value)


def test_prompt_is_the_checkpoint_chat_format():
    from mmreduce.eval.tiny_models import TINY_MODELS, build_processor, format_prompt

    processor = build_processor(TINY_MODELS["tiny-llava-shapes"])
    question = "what color is the square ?"
    assert build_prompt(processor, question, 1) == format_prompt(question, num_images=1)
    assert build_prompt(processor, "<image>\n" + question, 1) == format_prompt(question, num_images=1)
    processor.chat_template = None  # no template: LLaVA-1.5's conversation format
    assert build_prompt(processor, question, 2) == "USER: <image>\n<image>\n" + question + " ASSISTANT:"


def test_task_documents_are_the_shapes_test_samples():
    from mmreduce.eval.benchmarks import load_benchmark

    utils = _task_utils()
    docs = [json.loads(line) for line in utils.DOCS_FILE.read_text().splitlines()]
    samples = load_benchmark("shapes", "test", 8, seed=0, image_size=128)
    assert [(d["question"], d["answer"]) for d in docs] == [(s.question, s.answer) for s in samples]
    assert docs == utils.make_docs()
    image = utils.doc_to_visual(docs[3])[0]
    assert image.tobytes() == samples[3].images[0].convert("RGB").tobytes()
    assert utils.process_results(docs[0], [" Red </s>"]) == {"exact_match": 1.0}
    assert utils.doc_to_choice(docs[0])[utils.doc_to_target_index(docs[0])] == docs[0]["answer"]
    # red is choice 0 of docs[0]; both the tuple and lmms-eval 0.7.3's str() form are scored
    assert utils.process_results_mc(docs[0], ["(-0.1, True)", (-2.0, False)] + [(-3.0, False)] * 4) == {"acc": 1.0}
    assert utils.process_results_mc(docs[0], [(-2.0, False), "(-0.1, True)"] + [(-3.0, False)] * 4) == {"acc": 0.0}


# ---- with lmms-eval (offline) --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A private copy of tiny-llava-shapes: the plugin and the reference must read the same weights even while the
    bundled checkpoint is being retrained; it also exercises pretrained=<local directory>."""
    import shutil

    from mmreduce.eval.tiny_models import resolve_checkpoint

    return shutil.copytree(resolve_checkpoint("tiny-llava-shapes"), tmp_path_factory.mktemp("ckpt") / "tiny")


def _evaluate(monkeypatch, task: str, model_args: str, batch_size: int):
    lmms_eval = pytest.importorskip("lmms_eval", reason=SKIP_REASON)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    lm = get_model("mmreduce").create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cpu"})
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(TASKS_DIR)),
                          log_samples=True, verbosity="WARNING")
    assert lmms_eval is not None and out is not None
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return lm, out["results"][task], samples


def test_entry_point_registers_the_plugin():
    pytest.importorskip("lmms_eval", reason=SKIP_REASON)
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    points = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert points.get("mmreduce") == "mmreduce.eval.lmms_plugin:manifest", (
        "add the lmms_eval.models entry point to pyproject.toml and reinstall (pip install -e .)")
    assert get_model("mmreduce") is MMReduceLMM


@pytest.mark.slow  # lmms-eval's evaluator end to end, then the same reduction sample by sample
def test_generate_until_matches_the_plain_reduced_model(monkeypatch, tiny_checkpoint):
    from mmreduce.eval.accuracy import generate_answers
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import load_tiny

    lm, result, samples = _evaluate(monkeypatch, "mmreduce_shapes_tiny",
                                    f"pretrained={tiny_checkpoint},method=pdrop,keep_ratio=0.5,layers=2", 4)
    # Independent answers: the same reduction through mmreduce's own accuracy code, one sample at a time.
    model, processor = load_tiny(tiny_checkpoint)
    shapes = load_benchmark("shapes", "test", 8, seed=0, image_size=128)
    with torch.no_grad(), mmreduce.wrap(model, "pdrop", keep_ratio=0.5, layers=(2,)) as reduced:
        expected = generate_answers(reduced, processor, shapes, batch_size=1, max_new_tokens=3)
    assert [s["filtered_resps"][0].split()[0] for s in samples] == expected
    assert result["exact_match,none"] == pytest.approx(sum(a == s.answer for a, s in zip(expected, shapes)) / 8)
    # Stats: 256 vision tokens; layers 0-1 keep all, layers 2-7 keep half -> (2 * 256 + 6 * 128) / 8 = 160.
    (run,) = lm.run_log
    assert run["requests"] == 8 and run["vision_tokens"] == 256
    assert run["equivalent_vision_tokens"] == pytest.approx(160.0)
    assert 0.4 < run["prefill_flops_ratio"] < 0.9


@pytest.mark.slow  # lmms-eval's evaluator end to end, then one generate() per sample
def test_loglikelihood_scores_choices_like_reduced_generation(monkeypatch, tiny_checkpoint):
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import load_tiny, prompt_for

    lm, result, samples = _evaluate(monkeypatch, "mmreduce_shapes_tiny_mc",
                                    f"pretrained={tiny_checkpoint},method=pdrop,keep_ratio=0.25,layers=2+4", 1)
    # Independent scores: the first-step logits of generate() on the same reduction (every choice is one token).
    model, processor = load_tiny(tiny_checkpoint)
    shapes = load_benchmark("shapes", "test", 8, seed=0, image_size=128)
    with torch.no_grad(), mmreduce.wrap(model, "pdrop", keep_ratio=0.25, layers=(2, 4)) as reduced:
        for sample, logged in zip(shapes, samples):
            inputs = processor(images=sample.images, text=[prompt_for(processor, sample.question)], return_tensors="pt")
            out = reduced.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            logprobs = out.logits[0][0].log_softmax(-1)
            ids = processor.tokenizer.convert_tokens_to_ids(list(sample.choices))
            # lmms-eval 0.7.3 logs each (loglikelihood, is_greedy) as its str()
            got = [ast.literal_eval(r)[0] if isinstance(r, str) else r[0] for r in logged["filtered_resps"]]
            assert got == pytest.approx(logprobs[ids].tolist(), abs=1e-4)
    # 256 vision tokens: layers 0-1 keep 256, 2-3 keep 64, 4-7 keep 16 -> (2 * 256 + 2 * 64 + 4 * 16) / 8 = 88.
    run = lm.run_log[-1]
    assert run["requests"] == sum(len(s.choices) for s in shapes)
    assert run["equivalent_vision_tokens"] == pytest.approx(88.0)
    assert 0.1 < run["prefill_flops_ratio"] < 0.7
    assert 0.0 <= result["acc,none"] <= 1.0


@pytest.mark.slow  # lmms-eval's evaluator end to end on an InternVL model, then the same reduction sample by sample
def test_an_internvl_model_through_the_plugin_matches_the_plain_reduced_model(monkeypatch):
    from mmreduce.eval.accuracy import generate_answers
    from mmreduce.eval.benchmarks import load_benchmark
    from mmreduce.eval.tiny_models import load_tiny

    lm, result, samples = _evaluate(monkeypatch, "mmreduce_docs_tiny",
                                    "pretrained=tiny-internvl-docs,method=pdrop,keep_ratio=0.5,layers=2", 4)
    model, processor = load_tiny("tiny-internvl-docs")
    pages = load_benchmark("docs", "test", 8, seed=0, page_sizes=((128, 128),))
    with torch.no_grad(), mmreduce.wrap(model, "pdrop", keep_ratio=0.5, layers=(2,)) as reduced:
        expected = generate_answers(reduced, processor, pages, batch_size=1, max_new_tokens=3)
    assert [s["filtered_resps"][0].split()[0] for s in samples] == expected
    assert result["exact_match,none"] == pytest.approx(sum(a == s.answer for a, s in zip(expected, pages)) / 8)
    # 80 vision tokens per page (4 tiles + thumbnail, 16 each): layers 0-1 keep 80, layers 2-7 keep 40 -> 50.
    (run,) = lm.run_log
    assert run["requests"] == 8 and run["vision_tokens"] == 80
    assert run["equivalent_vision_tokens"] == pytest.approx(50.0)
