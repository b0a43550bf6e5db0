"""Your own data: JSON-lines dataset files in `load_benchmark`, `mmreduce bench` and `mmreduce tune`.

Every file, image and clip is made in `tmp_path`; the model is the untrained tiny checkpoint of conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmreduce.eval.benchmarks import iter_benchmark, load_benchmark
from mmreduce.eval.benchmarks.user import MediaImages, normalize_reference
from mmreduce.eval.benchmarks.video import write_mp4

GOOD = {"image": "pics/red.png", "question": "what color is the shape ?", "answer": "red"}


@pytest.fixture
def folder(tmp_path) -> Path:
    """`data/` with two PNGs, an 8-frame mp4 and a text file that is not an image."""
    root = tmp_path / "data"
    (root / "pics").mkdir(parents=True)
    Image.new("RGB", (40, 32), (220, 20, 20)).save(root / "pics" / "red.png")
    Image.new("L", (24, 24), 90).save(root / "pics" / "grey.png")  # not RGB: loaded as RGB
    # 8 frames, the k-th one filled with grey level 30 k, so the frame read can be told from its pixels.
    write_mp4([np.full((64, 64, 3), 30 * k, np.uint8) for k in range(8)], root / "clip.mp4", fps=8)
    (root / "notes.txt").write_text("not an image\n")
    return root


def write(folder: Path, lines: list, name: str = "data.jsonl") -> Path:
    """The dataset file `folder/name`: dicts as JSON, strings as they are."""
    path = folder / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_every_line_form(folder):
    absolute = str(folder / "pics" / "grey.png")
    path = write(folder, [
        {**GOOD, "choices": ["Red", "blue", "green"], "id": "a"},
        {"images": ["pics/red.png", absolute], "question": "which one is grey ?", "answer": "The second one.",
         "id": 7},
        "",  # blank lines are skipped and still counted
        {"video": "clip.mp4", "frames": 2, "question": "what happens ?", "answer": "it gets lighter"},
        {"video": "clip.mp4", "question": "what happens ?", "answer": "Lighter!"},
    ])
    image, pair, two_frames, four_frames = load_benchmark(str(path), "test", 4)

    assert len(image.images) == 1 and image.image.mode == "RGB" and image.image.size == (40, 32)
    assert image.image.getpixel((0, 0)) == (220, 20, 20)
    assert image.question == "what color is the shape ?" and image.answer == "red"
    assert image.choices == ("red", "blue", "green") and image.video is None
    assert image.meta == {"benchmark": "file", "path": str(path.resolve()), "line": 1, "split": "test", "index": 0,
                          "id": "a", "answer_text": "red", "media": [str(folder / "pics" / "red.png")]}

    assert [im.size for im in pair.images] == [(40, 32), (24, 24)]
    assert pair.images[-1].size == (24, 24) and [im.size for im in pair.images[:1]] == [(40, 32)]
    with pytest.raises(IndexError):
        pair.images[2]
    assert [im.mode for im in pair.images] == ["RGB", "RGB"]
    assert pair.answer == "the second one" and pair.choices == ("the second one",)
    assert pair.meta["answer_text"] == "The second one." and pair.meta["id"] == 7

    assert two_frames.meta["line"] == 4 and four_frames.meta["line"] == 5
    assert two_frames.video == four_frames.video == str(folder / "clip.mp4")
    assert len(two_frames.images) == 2 and len(four_frames.images) == 4
    # Centres of equal segments: frames 2 and 6 of 8; 1, 3, 5, 7 of 8 (near-lossless H.264: within a few levels).
    assert [im.getpixel((32, 32))[0] for im in two_frames.images] == pytest.approx([60, 180], abs=4)
    assert [im.getpixel((32, 32))[0] for im in four_frames.images] == pytest.approx([30, 90, 150, 210], abs=4)
    assert four_frames.images[0].size == (64, 64) and four_frames.answer == "lighter"


def test_images_are_read_from_their_files_when_used(folder):
    [sample] = load_benchmark(str(write(folder, [GOOD])), "test", 1)
    assert isinstance(sample.images, MediaImages)
    Image.new("RGB", (40, 32), (0, 0, 255)).save(folder / "pics" / "red.png")  # what is on disk is what is read
    assert sample.image.getpixel((0, 0)) == (0, 0, 255)


def test_splits_start_and_n(folder):
    lines = [{**GOOD, "id": i, **({"split": split} if split else {})}
             for i, split in enumerate(["train", None, "test", "calibration", "test", None, "train"])]
    path = str(write(folder, lines))
    ids = lambda samples: [s.meta["id"] for s in samples]  # noqa: E731
    assert ids(load_benchmark(path, "test", 4)) == [1, 2, 4, 5]  # the file's order; no "split": every split
    assert ids(load_benchmark(path, "train", 4)) == [0, 1, 5, 6]
    assert ids(load_benchmark(path, "calibration", 3)) == [1, 3, 5]
    assert ids(load_benchmark(path, "test", 2, start=1)) == [2, 4]
    assert [s.meta["index"] for s in load_benchmark(path, "test", 2, start=1)] == [1, 2]
    assert ids(load_benchmark(path, "test", 2, seed=5)) == ids(load_benchmark(path, "test", 2, seed=0))  # ignored
    assert load_benchmark(path, "test", 0) == []
    assert ids(load_benchmark(folder / "data.jsonl", "test", 1)) == [1]  # a Path works as well


def test_answers_are_stored_as_they_are_compared():
    from mmreduce.eval.accuracy import normalize_answer

    for word in ["Yes", "yes.", "RED!", "left,", "7", "3.5"]:
        assert normalize_reference(word) == normalize_answer(word)
    assert normalize_reference("  The Red   cube! ") == "the red cube"
    assert normalize_reference("?!") == ""


BAD_LINES = [
    # (case, line 2 of the file, the field named, a part of the fix)
    ("missing question", {"image": "pics/red.png", "answer": "red"}, '"question" is missing', "non-empty"),
    ("empty question", {**GOOD, "question": "  "}, '"question" is empty', "non-empty string"),
    ("answer not a string", {**GOOD, "answer": 3}, '"answer" must be a string', "in quotes"),
    ("answer only punctuation", {**GOOD, "answer": "?"}, '"answer" "?" has no word', "give a word"),
    ("answer not in choices", {**GOOD, "choices": ["blue", "green"]}, '"choices" ["blue", "green"] does not '
     'contain the answer "red"', 'add it to "choices"'),
    ("choices not strings", {**GOOD, "choices": ["red", 1]}, '"choices" must be a non-empty list', "strings"),
    ("missing image file", {**GOOD, "image": "cats/1.png"}, '"image" file cats/1.png does not exist',
     "relative to the dataset file's folder"),
    ("missing file in images", {"images": ["pics/red.png", "b.png"], "question": "q ?", "answer": "a"},
     '"images[1]" file b.png does not exist', "relative to the dataset file's folder"),
    ("not an image", {**GOOD, "image": "notes.txt"}, '"image" file notes.txt is not an image', "PNG, JPEG"),
    ("image is a folder", {**GOOD, "image": "pics"}, '"image" file pics is a folder', "relative"),
    ("not a video", {"video": "pics/red.png", "question": "q ?", "answer": "a"}, '"video" file pics/red.png could '
     "not be read as a video", "mp4"),
    ("too many frames", {"video": "clip.mp4", "frames": 9, "question": "q ?", "answer": "a"}, '"frames" 9 is more '
     "than the 8 frame(s) of clip.mp4", 'set "frames" to 8'),
    ("frames not a count", {"video": "clip.mp4", "frames": 0, "question": "q ?", "answer": "a"}, '"frames" must be '
     "a positive whole number", "got 0"),
    ("frames on an image", {**GOOD, "frames": 2}, '"frames" applies to "video" lines only', "remove it"),
    ("no media", {"question": "q ?", "answer": "a"}, '"image" needs exactly one of', "found none"),
    ("two media", {**GOOD, "video": "clip.mp4"}, '"video" needs exactly one of', "found image, video"),
    ("images not a list", {"images": "pics/red.png", "question": "q ?", "answer": "a"}, '"images" must be a '
     "non-empty list", '"image"'),
    ("bad JSON", '{"image": "pics/red.png", "question": "q ?"', "is not valid JSON", "one JSON object per line"),
    ("not an object", '["pics/red.png", "q ?", "a"]', "must be a JSON object", "got a list"),
    ("unknown split", {**GOOD, "split": "val"}, '"split" must be one of train, calibration, test', "left out"),
    ("unknown field", {**GOOD, "qestion": "q ?"}, '"qestion" is not a known field', "image, images, video"),
    ("repeated id", {**GOOD, "id": "a"}, '"id" "a" is also the id of line 1', "its own id"),
]


@pytest.mark.parametrize("line, field, fix", [case[1:] for case in BAD_LINES], ids=[case[0] for case in BAD_LINES])
def test_a_bad_line_names_file_line_field_and_fix(folder, line, field, fix):
    path = write(folder, [{**GOOD, "id": "a"}, line, {**GOOD, "split": "train"}])
    with pytest.raises(ValueError) as error:
        load_benchmark(str(path), "test", 2)
    message = str(error.value)
    assert message.startswith(f"{path} line 2: "), message
    assert field in message and fix in message, message


def test_a_bad_line_fails_before_any_sample_even_outside_the_split(folder):
    """Every line's fields, files and image headers are checked; the selected lines' media are also decoded."""
    for bad, message in [({"image": "missing.png"}, r"line 6: \"image\" file missing.png does not exist"),
                         ({"image": "notes.txt"}, r"line 6: \"image\" file notes.txt is not an image"),
                         ({"answer": ""}, r"line 6: \"answer\" is empty")]:
        path = str(write(folder, [GOOD] * 5 + [{**GOOD, "split": "train", **bad}]))
        with pytest.raises(ValueError, match=message):
            iter_benchmark(path, "test", 2)  # raised by the call itself, before a sample is asked for


BAD_CALLS = [
    # (case, arguments after the path, keyword arguments, what the message says)
    ("n larger than the file", ("test", 4), {}, "has 3 line(s), 2 of them in split 'test' (lines without \"split\" "
     "belong to every split); 4 were asked for but 2 remain: ask for at most 2 (--samples 2)"),
    ("n larger after start", ("test", 2), {"start": 1}, "2 were asked for after skipping 1 but 1 remain: ask for at "
     "most 1"),
    ("unknown option", ("test", 1), {"image_size": 128}, "option(s) image_size apply to the synthetic benchmarks; a "
     "dataset file takes none"),
    ("unknown split", ("val", 1), {}, "split must be one of train, calibration, test, got 'val'"),
    ("negative n", ("test", -1), {}, "n must be a non-negative int"),
]


@pytest.mark.parametrize("args, kwargs, expected", [case[1:] for case in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_a_bad_request_names_the_file(folder, args, kwargs, expected):
    path = str(write(folder, [GOOD, {**GOOD, "split": "train"}, {**GOOD, "split": "test"}]))
    with pytest.raises(ValueError) as error:
        load_benchmark(path, *args, **kwargs)
    assert str(error.value).startswith(path) and expected in str(error.value), str(error.value)


def test_missing_empty_and_misnamed_files(folder):
    with pytest.raises(ValueError, match=r"dataset file .*nothere.jsonl does not exist"):
        load_benchmark(str(folder / "nothere.jsonl"), "test", 1)
    with pytest.raises(ValueError, match="holds no lines"):
        load_benchmark(str(write(folder, ["", "  "])), "test", 1)
    json_file = write(folder, [GOOD], name="data.json")
    with pytest.raises(ValueError, match=r"or a dataset file ending in .jsonl.*must end in .jsonl"):
        load_benchmark(str(json_file), "test", 1)
    (folder / "latin1.jsonl").write_bytes(b'{"image": "pics/red.png", "question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_benchmark(str(folder / "latin1.jsonl"), "test", 1)


def _user_processor(tmp_path, chat_template):
    """A LLaVA-1.5 processor as a user would save one: byte-level BPE tokenizer (no unknown words), its template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["Which one is grey? The second one.", "A chat with an assistant. USER ASSISTANT"],
                                trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 56},
                                                                  crop_size={"height": 56, "width": 56}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template)
    processor.save_pretrained(tmp_path / "my-llava")
    return AutoProcessor.from_pretrained(tmp_path / "my-llava", local_files_only=True)


USER_TEMPLATE = (
    "A chat with an assistant.\n{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.mark.parametrize("template", [USER_TEMPLATE, None], ids=["own-chat-template", "no-chat-template"])
def test_prompts_come_from_the_users_processor(tmp_path, folder, template):
    from mmreduce.eval.accuracy import batch_inputs
    from mmreduce.eval.tiny_models import format_prompt, prompt_for

    processor = _user_processor(tmp_path, template)
    path = str(write(folder, [{"images": ["pics/red.png", "pics/grey.png"], "question": "Which one is grey?",
                               "answer": "The second one."}, GOOD]))
    pair, single = load_benchmark(path, "test", 2)
    prompt = prompt_for(processor, pair.question, num_images=2)
    if template:
        assert prompt == "A chat with an assistant.\nUSER: <image>\n<image>\nWhich one is grey?\nASSISTANT:"
    else:
        assert prompt == format_prompt("Which one is grey?", 2)
        assert prompt == "USER: <image>\n<image>\nWhich one is grey? ASSISTANT:"  # LLaVA-1.5's order
    batch = batch_inputs(processor, [pair, single])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (3, 3, 56, 56)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [2 * 16, 16]  # (56 / 14)^2 tokens per image
    ids = batch["input_ids"][0]
    text = processor.tokenizer.decode(ids[ids != image_id], skip_special_tokens=True)
    assert "Which one is grey?" in text  # byte-level: the user's words survive, no unknown tokens


def test_bench_and_tune_on_a_dataset_file(tmp_path, folder, untrained_tiny_checkpoint):
    from mmreduce.eval.harness import BenchConfig, run_bench
    from mmreduce.eval.tune import calibration_set

    path = str(write(folder, [
        {**GOOD, "split": "test"},
        {"images": ["pics/red.png", "pics/grey.png"], "question": "which one is red ?", "answer": "left",
         "choices": ["left", "right"], "split": "test"},
        {"video": "clip.mp4", "frames": 2, "question": "what color is the shape ?", "answer": "cyan", "split": "test"},
        {"image": "pics/grey.png", "question": "is there a shape ?", "answer": "no", "split": "calibration"},
        {"image": "pics/grey.png", "question": "what color is the shape ?", "answer": "yes"},  # every split
    ]))
    config = BenchConfig(model=untrained_tiny_checkpoint, dataset=path, samples=4,
                         specs=["baseline", "fastv:layer=2,keep_ratio=0.5"], batch_size=2, out=str(tmp_path / "run"),
                         device="cpu", progress=False)
    run_bench(config, log=lambda message: None)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["meta"]["config"]["dataset"] == path
    assert [r["spec"] for r in written["results"]] == config.specs
    for row in written["results"]:
        assert row["samples"] == 4 and len(row["predictions"]) == 4 and 0 <= row["accuracy"] <= 1
    baseline, fastv = written["results"]
    assert fastv["prefill_flops"] < baseline["prefill_flops"]
    # Vision tokens per sample: 256 per image, two images for the pair and two frames for the clip.
    assert baseline["vision_tokens"] == pytest.approx((256 + 512 + 512 + 256) / 4)

    with pytest.raises(ValueError, match=r"ask for at most 4 \(--samples 4\)"):
        run_bench(BenchConfig(model=untrained_tiny_checkpoint, dataset=path, specs=["baseline"], samples=5,
                              out=str(tmp_path / "too-many"), device="cpu", progress=False), log=lambda m: None)

    model, processor, batches, labels = calibration_set(untrained_tiny_checkpoint, path, samples=2, batch_size=2)
    assert len(batches) == len(labels) == 1 and batches[0]["input_ids"].shape[0] == 2
    expected = [processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in ("no", "yes")]
    assert labels[0].tolist() == expected  # the calibration line, then the line without a split


def test_the_readme_example_lines_load(tmp_path):
    """The lines shown in README.md's "Your own model and data" are a valid dataset file."""
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text().split("## Your own model and data", 1)[1]
    text = re.search(r"```json\n(.*?)```", readme, re.S).group(1)
    for name in ["cats/1.png", "a.png", "b.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    (tmp_path / "clips").mkdir()
    write_mp4([np.zeros((64, 64, 3), np.uint8)] * 4, tmp_path / "clips" / "7.mp4", fps=4)
    (tmp_path / "my-data.jsonl").write_text(text)
    samples = load_benchmark(str(tmp_path / "my-data.jsonl"), "test", 3)
    assert [len(s.images) for s in samples] == [1, 2, 4]
    assert [s.answer for s in samples] == ["cat", "the first", "left"]
