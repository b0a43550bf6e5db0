"""The synthetic benchmarks: determinism, balance, disjoint splits, unambiguous answers, readable video."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from mmreduce.eval.benchmarks import (
    SPLITS,
    DocsConfig,
    ShapesConfig,
    VideoConfig,
    answer_vocabulary,
    list_benchmarks,
    load_benchmark,
    make_sample,
)


def _digest(sample) -> str:
    h = hashlib.sha256(sample.question.encode() + sample.answer.encode())
    for image in sample.images:
        h.update(image.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["shapes", "docs"])
def test_same_seed_same_bytes_other_seed_other_bytes(name):
    a = load_benchmark(name, "test", 12, seed=3)
    b = load_benchmark(name, "test", 12, seed=3)
    c = load_benchmark(name, "test", 12, seed=4)
    assert [_digest(s) for s in a] == [_digest(s) for s in b]
    assert not set(map(_digest, a)) & set(map(_digest, c))


def test_sample_depends_only_on_its_index():
    window = load_benchmark("shapes", "train", 4, seed=0, start=10)
    alone = make_sample("shapes", "train", 0, 12)
    assert _digest(window[2]) == _digest(alone)


@pytest.mark.parametrize("name", ["shapes", "docs"])
def test_splits_are_disjoint(name):
    digests = {split: {_digest(s) for s in load_benchmark(name, split, 40, seed=0)} for split in SPLITS}
    assert all(len(d) == 40 for d in digests.values())
    assert not digests["train"] & digests["test"]
    assert not digests["train"] & digests["calibration"]
    assert not digests["calibration"] & digests["test"]


@pytest.mark.parametrize("name,n", [("shapes", 120), ("docs", 60)])
def test_answers_are_exactly_balanced_per_question_type(name, n):
    samples = load_benchmark(name, "test", n, seed=0)
    by_type: dict[str, Counter] = {}
    for s in samples:
        by_type.setdefault(s.meta["qtype"], Counter())[s.answer] += 1
    for qtype, counts in by_type.items():
        choices = next(s.choices for s in samples if s.meta["qtype"] == qtype)
        assert set(counts) == set(choices), qtype
        assert len(set(counts.values())) == 1, (qtype, counts)
    assert len({sum(c.values()) for c in by_type.values()}) == 1  # question types are balanced too


def _shapes_answer(sample) -> str:
    """Recompute a shapes answer from the drawn objects alone (independent of the generator's plan)."""
    objs, q = sample.meta["objects"], sample.question
    if m := re.fullmatch(r"what color is the (\w+) \?", q):
        hits = [o for o in objs if o["shape"] == m[1]]
        assert len(hits) == 1
        return hits[0]["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object \?", q):
        hits = [o for o in objs if o["color"] == m[1]]
        assert len(hits) == 1
        return hits[0]["shape"]
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", q):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"how many (\w+) objects are there \?", q):
        return ["zero", "one", "two", "three"][sum(o["color"] == m[1] for o in objs)]
    m = re.fullmatch(r"where is the (\w+) object relative to the (\w+) object \?", q)
    (a,), (b,) = [o for o in objs if o["color"] == m[1]], [o for o in objs if o["color"] == m[2]]
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    assert max(abs(dx), abs(dy)) > 1.3 * min(abs(dx), abs(dy))  # one axis clearly dominates
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def test_shapes_answers_follow_from_the_scene_and_most_pixels_are_background():
    for s in load_benchmark("shapes", "test", 100, seed=1):
        assert _shapes_answer(s) == s.answer, s.question
        side = s.image.size[0]
        covered = sum((2 * o["radius"] + 1) ** 2 for o in s.meta["objects"])
        assert covered / side**2 < 0.2
        assert 1 <= len(s.meta["objects"]) <= 8


def test_docs_answers_follow_from_the_fields():
    for s in load_benchmark("docs", "test", 60, seed=1):
        fields = s.meta["fields"]
        assert len({f["color"] for f in fields}) == len(fields) and len({f["digit"] for f in fields}) == len(fields)
        if m := re.fullmatch(r"what digit is in the (\w+) box \?", s.question):
            assert [f["digit"] for f in fields if f["color"] == m[1]] == [s.answer]
        else:
            digit = re.fullmatch(r"what color is the box with the (\d) \?", s.question)[1]
            assert [f["color"] for f in fields if f["digit"] == digit] == [s.answer]
        # Most of the page is empty paper: pixels far from the paper tone are few.
        pixels = np.asarray(s.image).astype(int)
        assert (np.abs(pixels - np.median(pixels)).max(axis=2) > 40).mean() < 0.1


def test_docs_fields_each_fill_one_grid_cell_and_free_placement_straddles():
    from mmreduce.eval.benchmarks.docs import DocsConfig
    from mmreduce.eval.benchmarks.draw import COLORS

    def cells(sample, grid):
        pixels = np.asarray(sample.image).astype(int)  # (H, W, 3)
        out = []
        for f in sample.meta["fields"]:
            # The field's own colour, read from the pixels (not from meta), bounds it: its colour is unique on the page.
            ys, xs = np.nonzero((np.abs(pixels - np.array(COLORS[f["color"]])).max(axis=2) == 0))
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == tuple(f["box"])
            out.append({(x // grid, y // grid) for x in (xs.min(), xs.max()) for y in (ys.min(), ys.max())})
        return out

    gridded = [c for s in load_benchmark("docs", "test", 40, seed=2) for c in cells(s, 16)]
    assert gridded and all(len(c) == 1 for c in gridded)
    free = [c for s in load_benchmark("docs", "test", 40, seed=2, field_grid=0) for c in cells(s, 16)]
    assert sum(len(c) > 1 for c in free) > len(free) // 2
    with pytest.raises(ValueError, match="field_grid"):
        DocsConfig(field_grid=8)
    with pytest.raises(ValueError, match="multiples"):
        DocsConfig(page_sizes=((136, 128),))


def test_video_clip_is_deterministic_and_readable_with_decord_and_pyav(tmp_path):
    decord = pytest.importorskip("decord")
    av = pytest.importorskip("av")
    samples = [make_sample("video", "test", 0, i, cache_dir=str(tmp_path / "a")) for i in range(3)]
    again = make_sample("video", "test", 0, 0, cache_dir=str(tmp_path / "b"))
    assert open(samples[0].video, "rb").read() == open(again.video, "rb").read()
    cfg = VideoConfig()
    for s in samples:
        reader = decord.VideoReader(s.video)
        assert len(reader) == cfg.num_frames
        for image, t in zip(s.images, s.meta["frame_indices"]):
            decoded = reader[t].asnumpy().astype(int)  # (H, W, 3)
            assert decoded.shape == (cfg.size, cfg.size, 3)
            assert np.abs(decoded - np.asarray(image).astype(int)).mean() < 6
        with av.open(s.video) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == cfg.num_frames
        assert np.abs(frames[-1].astype(int) - reader[cfg.num_frames - 1].asnumpy().astype(int)).mean() < 3


def test_video_answers_match_the_track():
    for i in range(6):
        s = make_sample("video", "calibration", 0, i)
        meta = s.meta
        if meta["qtype"] == "direction":
            (x0, y0), (x1, y1) = meta["track"][0], meta["track"][-1]
            expected = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
            assert expected == s.answer
        elif meta["qtype"] == "color_change":
            assert meta["colors"][-1] == s.answer != meta["colors"][0]
        else:
            assert ["start", "middle", "end"][3 * meta["appear_at"] // meta["num_frames"]] == s.answer


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="benchmark"):
        load_benchmark("nope", "test", 1)
    with pytest.raises(ValueError, match="split"):
        load_benchmark("shapes", "val", 1)
    with pytest.raises(ValueError, match="n must"):
        load_benchmark("shapes", "test", -1)
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=10)
    with pytest.raises(ValueError, match="qtypes"):
        ShapesConfig(qtypes=("colour",))
    with pytest.raises(ValueError, match="page_sizes"):
        DocsConfig(page_sizes=((32, 32),))
    with pytest.raises(ValueError, match="size"):
        VideoConfig(size=65)
    with pytest.raises(TypeError):
        load_benchmark("shapes", "test", 1, colour="red")


def test_vocabularies():
    assert list_benchmarks() == ["docs", "shapes", "video"]
    assert "yes" in answer_vocabulary("shapes") and "7" in answer_vocabulary("docs")
    assert "middle" in answer_vocabulary("video")
