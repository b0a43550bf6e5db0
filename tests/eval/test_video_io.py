"""eval/video_io.py: evenly spaced frames decoded back to what was written, decord and PyAV alike, and one-line
errors that name the file and the fix."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from mmreduce.eval.benchmarks import load_benchmark
from mmreduce.eval.benchmarks.video import write_mp4
from mmreduce.eval.video_io import DEFAULT_MAX_FRAMES, frame_indices, read_video, read_video_frames

pytest.importorskip("av")  # write_mp4 needs PyAV

#: Mean absolute error (0-255 scale) allowed between a written frame and its decoded copy. Measured on the clips
#: below with write_mp4 (H.264, crf 4, yuv420p): 1.7-2.1 on the gradient clip, 0.8-1.6 on `video` benchmark clips;
#: a neighbouring frame of the gradient clip is at least 8 away (its blue level steps by 8 per frame).
MAX_MAE = 3.0
FRAMES = 30


def _mae(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 30-frame 64 x 48 clip at 10 fps: red/green gradients, a blue level of 8 * t and a red square moving right,
    so every frame differs from every other one."""
    frames = []
    for t in range(FRAMES):
        frame = np.zeros((48, 64, 3), np.uint8)  # (H, W, 3)
        frame[..., 0] = np.linspace(0, 255, 64)[None]
        frame[..., 1] = np.linspace(0, 255, 48)[:, None]
        frame[..., 2] = 8 * t
        frame[10:20, 2 * t:2 * t + 10] = (250, 20, 30)
        frames.append(frame)
    path = tmp_path_factory.mktemp("video-io") / "clip.mp4"
    write_mp4(frames, path, fps=10)
    return path, frames


def test_frame_indices_are_evenly_spaced():
    assert frame_indices(24, 4) == [0, 8, 15, 23]  # the `video` benchmark's picks: first and last included
    assert frame_indices(30, 5) == [0, 7, 14, 22, 29]
    assert frame_indices(24, 4, spacing="centres") == [3, 9, 15, 21]  # the demo's and dataset files' convention
    assert frame_indices(7, 1) == [0] and frame_indices(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(3, 4)


def test_decoded_frames_match_the_written_ones(clip):
    path, written = clip
    video = read_video(path, 5)
    assert video.indices == [0, 7, 14, 22, 29]
    assert (video.total_frames, video.fps, video.seconds) == (FRAMES, 10.0, 3.0)
    assert video.backend in ("decord", "pyav")
    for image, index in zip(video.frames, video.indices):
        assert image.mode == "RGB" and image.size == (64, 48)
        errors = [_mae(image, frame) for frame in written]
        assert errors[index] < MAX_MAE, (index, errors[index])
        assert int(np.argmin(errors)) == index  # the frame asked for, not a neighbour
    frames = read_video_frames(path, 3, spacing="centres")
    assert [int(np.argmin([_mae(f, w) for w in written])) for f in frames] == [5, 15, 25]


def test_benchmark_clips_decode_to_the_samples_frames(tmp_path):
    """Reading a `video` clip with its frames_per_sample gives Sample.images back: same indices, same pixels up to
    the codec's error."""
    for sample in load_benchmark("video", "test", 6, seed=0, cache_dir=str(tmp_path)):
        video = read_video(sample.video, len(sample.images))
        assert video.indices == sample.meta["frame_indices"]
        assert max(_mae(a, b) for a, b in zip(video.frames, sample.images)) < MAX_MAE


def test_both_backends_give_the_same_frames(clip):
    pytest.importorskip("decord", reason="decord is not installed: only PyAV can be checked")
    path, _ = clip
    with_decord, with_pyav = read_video(path, FRAMES, backend="decord"), read_video(path, FRAMES, backend="pyav")
    assert (with_decord.backend, with_pyav.backend) == ("decord", "pyav")
    assert with_decord.indices == with_pyav.indices and with_decord.total_frames == with_pyav.total_frames
    assert with_decord.fps == pytest.approx(with_pyav.fps)
    assert max(_mae(a, b) for a, b in zip(with_decord.frames, with_pyav.frames)) < 0.5


def test_pyav_reads_when_decord_is_missing(clip, monkeypatch, caplog):
    path, written = clip
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    with caplog.at_level(logging.DEBUG, logger="mmreduce.eval.video_io"):
        video = read_video(path, 2)
    assert video.backend == "pyav" and "with pyav" in caplog.text
    assert [int(np.argmin([_mae(f, w) for w in written])) for f in video.frames] == [0, FRAMES - 1]
    with pytest.raises(ValueError, match="decord: not importable"):
        read_video(path, 2, backend="decord")



def test_pyav_reads_when_decord_cannot_open_the_file(clip, monkeypatch):
    decord = pytest.importorskip("decord", reason="decord is not installed: the fallback on its errors is moot")
    path, _ = clip

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot open")

    monkeypatch.setattr(decord, "VideoReader", refuse)
    assert read_video(path, 2).backend == "pyav"
    with pytest.raises(ValueError, match="decord: cannot open"):
        read_video(path, 2, backend="decord")


def test_missing_and_unreadable_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4 does not exist: give the path of a video file"):
        read_video_frames(missing, 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for backend in ("auto", "pyav"):
        with pytest.raises(ValueError) as error:
            read_video_frames(garbage, 4, backend=backend)
        message = str(error.value)
        assert "\n" not in message and str(garbage) in message
        assert "could not be read as a video" in message and "use a readable mp4" in message
    with pytest.raises(ValueError, match="is not a file"):
        read_video_frames(tmp_path, 4)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_a_still_image_is_not_a_one_frame_video(tmp_path, suffix):
    """FFmpeg (PyAV) would read a picture as a video of one frame; neither backend may."""
    from PIL import Image

    picture = tmp_path / f"still.{suffix}"
    Image.new("RGB", (16, 16), "red").save(picture)
    for backend in ("auto", "pyav"):
        with pytest.raises(ValueError, match="could not be read as a video"):
            read_video_frames(picture, 1, backend=backend)


def test_a_video_over_the_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "long.mp4"
    write_mp4([np.full((64, 64, 3), 90, np.uint8)] * 912, path, fps=24)  # 38.0 s
    assert DEFAULT_MAX_FRAMES < 912
    with pytest.raises(ValueError) as error:
        read_video_frames(path, 4)
    assert str(error.value) == (f"{path} is 912 frames (38.0 s); the limit is {DEFAULT_MAX_FRAMES} frames — pass "
                                "max_seconds=38 (or max_frames=912) or trim it")
    with pytest.raises(ValueError, match=r"is 912 frames \(38.0 s\); the limit is 30 s — pass max_seconds=38"):
        read_video_frames(path, 4, max_seconds=30)
    with pytest.raises(ValueError, match="the limit is 100 frames"):
        read_video_frames(path, 4, max_frames=100)
    assert read_video(path, 4, max_seconds=38).indices == [0, 304, 607, 911]
    assert len(read_video_frames(path, 2, max_frames=None)) == 2


def test_bad_arguments(clip):
    path, _ = clip
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
            read_video_frames(path, bad)
    with pytest.raises(ValueError, match=f"has {FRAMES} frames, fewer than num_frames=31: ask for {FRAMES} or fewer"):
        read_video_frames(path, 31)
    with pytest.raises(ValueError, match="backend"):
        read_video_frames(path, 1, backend="opencv")
    with pytest.raises(ValueError, match="max_seconds"):
        read_video_frames(path, 1, max_seconds=0)
    with pytest.raises(ValueError, match="max_frames"):
        read_video_frames(path, 1, max_frames=0)
