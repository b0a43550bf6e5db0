"""The demo's functions called directly: input checks, method building, token layout, overlays, a comparison."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from mmreduce.adapters import get_adapter
from mmreduce.adapters.base import NEWLINE, TokenCell
from mmreduce.demo import inputs
from mmreduce.demo.app import EXAMPLES_DIR, ModelStore, examples, preview_schedule, run_demo
from mmreduce.demo.compare import prepare_inputs, vision_positions
from mmreduce.demo.inputs import DemoInputError
from mmreduce.demo.methods import PLACEHOLDER_SPECS, UI_METHODS, build_methods, parse_layers
from mmreduce.demo.overlay import draw_kept_tokens
from mmreduce.demo.summary import cards_html
from PIL import Image

import mmreduce

SHAPES, DOCS, INTERNVL, VIDEO = "tiny-llava-shapes", "tiny-llava-next-docs", "tiny-internvl-docs", "tiny-llava-video"
QUICK = dict(warmup=0, repeats=1, max_new_tokens=2)


@pytest.fixture(scope="module")
def store():
    return ModelStore()


# ---- inputs -------------------------------------------------------------------------------------------------

def test_non_image_upload_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not pixels")
    with pytest.raises(DemoInputError, match="'notes.txt' is not an image"):
        inputs.load_media(path)


def test_image_over_the_side_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (inputs.MAX_IMAGE_SIDE + 1, 1)).save(path)
    with pytest.raises(DemoInputError, match=f"{inputs.MAX_IMAGE_SIDE + 1}x1 px; the limit is 4096"):
        inputs.load_image(path)


def test_image_over_the_byte_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(inputs, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(DemoInputError, match="the limit is"):
        inputs.load_image(path)


def test_missing_image_and_empty_question(store):
    with pytest.raises(DemoInputError, match="no image given"):
        run_demo(store, SHAPES, None, "what color is the square ?", ["fastv"])
    with pytest.raises(DemoInputError, match="question is empty"):
        run_demo(store, SHAPES, EXAMPLES_DIR / "shapes-0.png", "   ", ["fastv"])


def test_video_gives_evenly_spaced_frames():
    frames, kind = inputs.load_media(EXAMPLES_DIR / "video-0.mp4")
    assert kind == "video" and len(frames) == inputs.VIDEO_FRAMES
    assert all(frame.mode == "RGB" and frame.size == (96, 96) for frame in frames)
    assert frames[0].tobytes() != frames[-1].tobytes()  # a moving shape: the sampled frames differ


def test_video_over_the_duration_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_VIDEO_SECONDS", 1.0)  # the example lasts 3 s
    with pytest.raises(DemoInputError, match="lasts 3 s; the limit is 1 s"):
        inputs.load_video_frames(EXAMPLES_DIR / "video-0.mp4")


def test_examples_exist_and_name_served_models(store):
    rows = examples(store)
    assert len(rows) >= 5
    for file, question, model in rows:
        assert os.path.isfile(file) and question.endswith("?") and model in store.names


# ---- methods ------------------------------------------------------------------------------------------------

def test_methods_plan_independent_counts():
    choices = build_methods(["fastv", "pdrop"], num_layers=8, vision_tokens=256, fastv_layer=3, fastv_keep=0.25,
                            pdrop_layers="2, 5", pdrop_keep=0.5)
    assert [c.label for c in choices][0] == "baseline" and isinstance(choices[0].method, mmreduce.Baseline)
    assert choices[1].planned == [256] * 3 + [64] * 5  # ceil(0.25 * 256) from layer 3 on
    assert choices[2].planned == [256, 256, 128, 128, 128, 64, 64, 64]


@pytest.mark.parametrize("params, message", [
    (dict(fastv_keep=1.5), "fastv keep ratio must be in \\(0, 1\\]"),
    (dict(fastv_keep=0), "fastv keep ratio must be in \\(0, 1\\]"),
    (dict(fastv_layer=8), "out of range for a model with 8 decoder layers"),
    (dict(fastv_layer=2.5), "fastv layer must be a whole number"),
])
def test_fastv_parameter_out_of_range(params, message):
    with pytest.raises(DemoInputError, match=message):
        build_methods(["fastv"], num_layers=8, vision_tokens=256, **params)


def test_other_bad_method_inputs(tmp_path):
    with pytest.raises(DemoInputError, match="strictly increasing"):
        build_methods(["pdrop"], num_layers=8, vision_tokens=256, pdrop_layers="4,2")
    with pytest.raises(DemoInputError, match="random seed must be >= 0"):
        build_methods(["random"], num_layers=8, vision_tokens=256, random_seed=-1)
    with pytest.raises(DemoInputError, match="no schedule file"):
        build_methods(["schedule"], num_layers=8, vision_tokens=256)
    with pytest.raises(DemoInputError, match="unknown method"):
        build_methods(["nonesuch"], num_layers=8, vision_tokens=256)
    with pytest.raises(DemoInputError, match="method spec 'fastv:lyr=2'"):
        build_methods([], num_layers=8, vision_tokens=256, extra_specs="fastv:lyr=2")
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"keep": [1.0, 0.5, 0.25]}))
    with pytest.raises(DemoInputError, match="3 entries but the model has 8"):
        build_methods(["schedule"], num_layers=8, vision_tokens=256, schedule_file=str(short))
    assert parse_layers(" 2 + 4,6") == (2, 4, 6) and parse_layers("") is None


def test_schedule_file_and_extra_spec(tmp_path):
    path = tmp_path / "gsearch.json"
    keep = [256, 256, 200, 100, 100, 50, 50, 10]
    path.write_text(json.dumps({"keep": keep, "unit": "count"}))
    choices = build_methods(["schedule"], num_layers=8, vision_tokens=256, schedule_file=str(path),
                            extra_specs="# comment\nfastv:layer=2,equivalent=0.5\n")
    assert choices[1].label == "schedule (gsearch.json)" and choices[1].planned == keep
    assert choices[2].label == "fastv:layer=2,equivalent=0.5"
    assert sum(choices[2].planned) / 8 <= 128  # the fitted keep ratio meets the budget
    with pytest.raises(DemoInputError, match="made for 256 vision tokens"):
        build_methods(["schedule"], num_layers=8, vision_tokens=1024, schedule_file=str(path))


# ---- token layout and overlays ------------------------------------------------------------------------------

def test_llava_layout_is_row_major_patches(store):
    model, processor = store.get(SHAPES)
    batch = prepare_inputs(processor, [Image.new("RGB", (128, 128))], "what color is the square ?")
    cells, grids = get_adapter(model).token_layout(batch)
    assert len(cells) == len(vision_positions(model, batch)) == 256
    assert cells[17] == TokenCell(0, 0, 1, 1) and cells[255] == TokenCell(0, 0, 15, 15)


def test_llava_next_layout_of_a_wide_page(store):
    model, processor = store.get(DOCS)
    batch = prepare_inputs(processor, [Image.new("RGB", (192, 128))], "what digit is in the cyan box ?")
    cells, _ = get_adapter(model).token_layout(batch)
    # 128x192 pinpoint: 2 x 3 crops of 4x4 patches -> 8 feature rows of 12 patches + 1 newline each, after 16 base.
    assert len(cells) == len(vision_positions(model, batch)) == 16 + 8 * 13
    assert cells[15] == TokenCell(0, 0, 3, 3)
    assert cells[16] == TokenCell(0, 1, 0, 0) and cells[16 + 4] == TokenCell(0, 2, 0, 0)
    assert cells[16 + 12].panel == NEWLINE and cells[16 + 13] == TokenCell(0, 1, 1, 0)
    assert cells[16 + 4 * 13] == TokenCell(0, 4, 0, 0)  # feature row 4 starts the second row of crops


def test_llava_next_layout_skips_padding_rows(store):
    model, processor = store.get(DOCS)
    # 128 wide x 96 high on the 128x128 pinpoint: 8x8 feature map, unpadded to 6 rows (1 padding row each side).
    batch = prepare_inputs(processor, [Image.new("RGB", (128, 96))], "what digit is in the cyan box ?")
    cells, _ = get_adapter(model).token_layout(batch)
    assert len(cells) == len(vision_positions(model, batch)) == 16 + 6 * 9
    assert cells[16] == TokenCell(0, 1, 1, 0)
    assert cells[-1].panel == NEWLINE and cells[-2] == TokenCell(0, 4, 2, 3)


def test_overlay_darkens_exactly_the_dropped_patches(store):
    model, processor = store.get(SHAPES)
    batch = prepare_inputs(processor, [Image.new("RGB", (128, 128), (255, 255, 255))], "what color is the square ?")
    positions = vision_positions(model, batch)
    kept = positions[::2]  # every other patch (column parity)
    [(picture, caption)] = draw_kept_tokens(get_adapter(model), processor, batch, positions, {3: kept}, "test")
    assert caption == "test: layer 3 keeps 128/256 vision tokens"
    step = picture.width // 16
    centre = lambda r, c: picture.getpixel((c * step + step // 2, r * step + step // 2))
    assert min(centre(5, 4)) > 200 and max(centre(5, 5)) < 100


def test_internvl_layout_of_a_page(store):
    model, processor = store.get(INTERNVL)
    batch = prepare_inputs(processor, [Image.new("RGB", (128, 128))], "what digit is in the cyan box ?")
    assert batch["image_sizes"].tolist() == [[128, 128]]  # the tile grid is not in the processor outputs
    cells, [grid] = get_adapter(model).token_layout(batch)
    # 2 x 2 tiles of 64 px then the thumbnail, 4 x 4 tokens each after the pixel shuffle
    assert len(cells) == len(vision_positions(model, batch)) == 80 and grid.crops == (2, 2)
    assert cells[0] == TokenCell(0, 1, 0, 0) and cells[16] == TokenCell(0, 2, 0, 0)
    assert {cell.panel for cell in cells[64:]} == {0} and cells[-1] == TokenCell(0, 0, 3, 3)


def test_internvl_overlay_darkens_exactly_the_dropped_patches_of_a_tile(store):
    model, processor = store.get(INTERNVL)
    batch = prepare_inputs(processor, [Image.new("RGB", (128, 128), (255, 255, 255))],
                           "what digit is in the cyan box ?")
    positions = vision_positions(model, batch)
    kept = [p for i, p in enumerate(positions) if i >= 16 or i % 2 == 0]  # tile 1 (the first 16): even columns only
    [(picture, caption)] = draw_kept_tokens(get_adapter(model), processor, batch, positions, {2: kept}, "test")
    assert caption == "test: layer 2 keeps 72/80 vision tokens"
    panel = 64 * 3  # 64 px tiles upscaled 3x; the thumbnail on the left, the 2 x 2 tiles beside it
    step, left = panel // 4, panel + 12
    centre = lambda x0, y0, r, c: picture.getpixel((x0 + c * step + step // 2, y0 + r * step + step // 2))
    for r in range(4):
        for c in range(4):
            tile_1 = centre(left, 0, r, c)
            assert (min(tile_1) > 200) if c % 2 == 0 else (max(tile_1) < 100), (r, c)
            assert min(centre(left + panel + 1, 0, r, c)) > 200  # tile 2: all kept
            assert min(centre(0, 0, r, c)) > 200  # the thumbnail: all kept


# ---- the whole comparison -----------------------------------------------------------------------------------

def test_run_demo_on_shapes(store):
    comparison = run_demo(store, SHAPES, EXAMPLES_DIR / "shapes-0.png", "what color is the square ?",
                          ["fastv", "pdrop"], fastv_layer=2, fastv_keep=0.25, pdrop_layers="2,4,6", **QUICK)
    baseline, fastv, pdrop = comparison.results
    assert baseline.vision_tokens_per_layer == [256] * 8 and baseline.flops_ratio == 1.0
    assert fastv.vision_tokens_per_layer == [256, 256] + [64] * 6 == fastv.planned
    assert pdrop.vision_tokens_per_layer == [256, 256, 128, 128, 64, 64, 32, 32]
    # fastv keeps 896 token-layers, pdrop 960, the baseline 2048: FLOPs must follow that order
    assert 0 < fastv.flops_ratio < pdrop.flops_ratio < 1
    assert all(r.answer and r.prefill_ms > 0 and r.total_ms >= r.prefill_ms for r in comparison.results)
    assert [len(k) for k in pdrop.kept_positions.values()] == [128, 64, 32]
    assert len(comparison.overlays) == 1 + 3  # one picture per drop stage
    json.dumps(comparison.to_dict())  # the API output is plain JSON
    assert len(comparison.figures()) == 2  # tokens per layer and latency; the plan is the same curve as the tokens
    html = cards_html(comparison.results, "q <b>")
    assert html.count("class='mmr-card ") == 3 and "q &lt;b&gt;" in html
    page = comparison.html()  # each method's column holds its own stages, captions in full
    columns = page.split("class='mmr-card ")[1:]
    assert [column.count("<figure") for column in columns] == [0, 1, 3]
    assert "layer 6 keeps 32/256 vision tokens</figcaption>" in columns[2]


def test_run_demo_on_crops_and_video(store):
    docs = run_demo(store, DOCS, EXAMPLES_DIR / "docs-wide-2.png", "what digit is in the yellow box ?",
                    ["fastv"], **QUICK)
    assert docs.results[0].vision_tokens_per_layer[0] == 120
    picture, _ = docs.overlays[0]
    assert picture.width > 3 * picture.height / 2  # base image + 3 crops side by side
    # asked of the image model, a clip goes to the video model: 4 frames x 8 x 8 tokens, and the clip's answer
    video = run_demo(store, SHAPES, EXAMPLES_DIR / "video-0.mp4", "which way does the blue cross move ?",
                     ["random"], **QUICK)
    assert video.kind == "video" and video.model == VIDEO
    assert video.results[0].vision_tokens_per_layer[0] == 4 * 64 and video.results[0].answer == "left"


def test_video_examples_are_answered_right_at_baseline(store, tmp_path):
    """The bundled clips are `video` test-split samples; the generator's answer is the independent reference."""
    from mmreduce.eval.benchmarks.video import VideoConfig, make_video_sample

    for index, file in enumerate(("video-0.mp4", "video-1.mp4")):
        [(question, model)] = [row[1:] for row in examples(store) if row[0].endswith(file)]
        sample = make_video_sample("test", 0, index, VideoConfig(cache_dir=str(tmp_path)))
        assert question == sample.question and model == VIDEO
        comparison = run_demo(store, model, EXAMPLES_DIR / file, question, [], **QUICK)
        assert comparison.results[0].answer == sample.answer


def test_only_runnable_models_are_offered_and_paths_never_shown(store, tmp_path):
    from mmreduce.eval.tiny_models import recipe_name

    assert store.names[:4] == [SHAPES, DOCS, INTERNVL, VIDEO] and "tiny-seed-shapes" not in store.names  # a tokenizer
    assert all(recipe_name(name) for name in store.names)  # earlier versions of a recipe (-v1, -v2) are offered too
    for version in store.names[4:]:
        comparison = run_demo(store, version, EXAMPLES_DIR / "shapes-0.png", "what color is the square ?", ["fastv"],
                              **QUICK)
        assert comparison.model == version and all(r.answer for r in comparison.results)
    folder = str(store.paths[DOCS])
    assert store.scrub(f"cannot load {folder}/config.json") == f"cannot load {DOCS}/config.json"
    upload = Path(tempfile.gettempdir()) / "gradio" / "abc" / "clip.mp4"  # where a server keeps an upload
    assert store.scrub(f"file '{upload}' is bad") == "file 'clip.mp4' is bad"
    assert store.scrub("keep 64/256 at layers 2+4 (0, 1]") == "keep 64/256 at layers 2+4 (0, 1]"
    local = ModelStore(default=str(store.paths[SHAPES]), include_bundled=False)
    assert local.names == [SHAPES] and "/" not in local.default


def test_run_demo_on_internvl_docs(store):
    docs = run_demo(store, INTERNVL, EXAMPLES_DIR / "docs-0.png", "what digit is in the cyan box ?",
                    ["fastv", "pdrop"], fastv_layer=2, fastv_keep=0.5, pdrop_layers="2,4", **QUICK)
    baseline, fastv, pdrop = docs.results
    assert baseline.vision_tokens_per_layer[0] == 80 and all(r.answer for r in docs.results)
    assert docs.overlay_note == "" and len(docs.overlays) == 1 + 2  # one picture per drop stage
    picture, caption = docs.overlays[0]
    assert caption.startswith(f"{fastv.label}: layer 2 keeps 40/80")
    assert picture.size == (192 + 12 + 2 * 193 - 1, 2 * 193 - 1)  # 3x thumbnail, then the 2 x 2 tiles beside it


def test_unknown_model_and_bad_settings(store, tmp_path):
    with pytest.raises(DemoInputError, match="unknown model '/etc'"):
        run_demo(store, "/etc", EXAMPLES_DIR / "shapes-0.png", "what color is the square ?", [])
    with pytest.raises(DemoInputError, match="repeats must be a whole number in \\[1, 20\\]"):
        run_demo(store, SHAPES, EXAMPLES_DIR / "shapes-0.png", "what color is the square ?", [], repeats=0)
    with pytest.raises(ValueError, match="no tiny checkpoint"):
        ModelStore(default=str(tmp_path / "missing"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DemoInputError, match="not valid JSON"):
        preview_schedule(store, SHAPES, str(bad))


def test_cli_parses_demo_defaults():
    from mmreduce.demo.cli import run

    from mmreduce.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.port, args.host, args.model, args.func) == (7860, "127.0.0.1", None, run)
    args = build_parser().parse_args(["demo", "--port", "9001", "--model", "tiny-llava-next-docs"])
    assert args.port == 9001 and args.model == "tiny-llava-next-docs"


def test_run_demo_with_methods_before_the_llm(store):
    """Before-the-LLM and composed SPECs run in the demo; their stage 0 is drawn like any drop stage."""
    comparison = run_demo(store, SHAPES, EXAMPLES_DIR / "shapes-0.png", "what color is the square ?", [],
                          extra_specs="stride:keep_ratio=0.25\npool:keep_ratio=0.25 then pdrop:layers=4", **QUICK)
    baseline, stride, composed = comparison.results
    assert stride.vision_tokens_per_layer == [64] * 8  # every layer, layer 0 included, sees the kept 64
    assert composed.vision_tokens_per_layer == [64] * 4 + [32] * 4
    assert sorted(stride.kept_positions) == [0] and sorted(composed.kept_positions) == [0, 4]
    captions = [caption for _, caption in comparison.overlays]
    assert any(caption.startswith("stride:keep_ratio=0.25: layer 0 keeps 64/256") for caption in captions)
    assert 0 < stride.flops_ratio < 0.3


def test_every_registered_method_is_offered_and_runs_with_its_defaults_or_is_refused_by_name(store):
    assert set(UI_METHODS) == set(mmreduce.list_methods()) - {"baseline"}
    ticked = [name for name in UI_METHODS if name not in ("schedule", "tcc")]
    for start in range(0, len(ticked), 5):  # at most 6 methods per comparison
        comparison = run_demo(store, SHAPES, EXAMPLES_DIR / "shapes-0.png", "what color is the square ?",
                              ticked[start:start + 5], **QUICK)
        assert all(result.answer for result in comparison.results)
    aim = build_methods(["aim"], num_layers=8, vision_tokens=256)[1]
    assert aim.label == "aim (start_layer 4)"  # 14 of 32 layers, scaled to 8
    with pytest.raises(DemoInputError, match="tcc"):  # TCC budgets across crops: LLaVA-1.5 has none
        run_demo(store, SHAPES, EXAMPLES_DIR / "shapes-0.png", "what color is the square ?", ["tcc"], **QUICK)


@pytest.mark.parametrize("model, file, question", [
    (SHAPES, "shapes-0.png", "what color is the square ?"),
    (DOCS, "docs-wide-2.png", "what digit is in the yellow box ?"),
    (INTERNVL, "docs-0.png", "what digit is in the cyan box ?"),
    (VIDEO, "video-0.mp4", "which way does the blue cross move ?"),
])
def test_placeholder_specs_run_on_every_bundled_model(store, model, file, question):
    comparison = run_demo(store, model, EXAMPLES_DIR / file, question, [], extra_specs=PLACEHOLDER_SPECS, **QUICK)
    assert [r.label for r in comparison.results] == ["baseline", *PLACEHOLDER_SPECS.splitlines()]
    assert comparison.overlays and not comparison.overlay_note


def test_latency_spread_and_notes():
    import numpy as np
    from mmreduce.demo.compare import MethodResult, _spread
    from mmreduce.demo.summary import latency_notes

    runs = [31.0, 30.0, 740.0, 29.0, 33.0, 30.5, 32.0]
    median, iqr = _spread(runs)
    q1, q3 = np.percentile(runs, [25, 75])  # numpy's linear interpolation = statistics' "inclusive" quartiles
    assert median == np.median(runs) and iqr == pytest.approx(q3 - q1)

    def result(label, total, iqr, runs=7):
        return MethodResult(label, "red", [4], [], {}, 4.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, total, runs=runs,
                            total_iqr_ms=iqr)

    assert latency_notes([result("baseline", 30.0, 2.0), result("fastv", 20.0, 1.0)]) == []
    notes = latency_notes([result("baseline", 30.0, 15.0), result("fastv", 31.0, 1.0)])
    assert len(notes) == 2 and "baseline: the timed totals spread by 50%" in notes[0]
    assert notes[1].startswith("fastv is not faster than the baseline here (31.0 vs 30.0 ms")
    assert "only 2 timed run(s)" in latency_notes([result("baseline", 30.0, 0.0, runs=2)])[0]
