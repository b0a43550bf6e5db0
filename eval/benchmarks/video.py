"""`video`: short mp4 clips of moving or changing shapes, with questions about what happens when.

| qtype | question | answers |
|---|---|---|
| direction | which way does the {color} {shape} move ? | left, right, up, down |
| color_change | what color does the {shape} turn ? | the 6 colours |
| appear | when does the {color} {shape} appear ? | start, middle, end |

Each clip also has 0-2 static distractor shapes. The clip is written once (H.264 via PyAV, single-threaded so
the bytes are reproducible) to `cache_dir`; `Sample.images` holds `frames_per_sample` evenly spaced frames as
drawn, so an image model can answer with several images.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .base import Sample, balanced_answer, sample_rng
from .draw import COLORS, SHAPES, background, boxes_overlap, draw_shape, shape_box

__all__ = ["QTYPES", "VideoConfig", "make_video_sample", "write_mp4"]

QTYPES: tuple[str, ...] = ("direction", "color_change", "appear")
ANSWERS: dict[str, tuple[str, ...]] = {
    "direction": ("left", "right", "up", "down"),
    "color_change": tuple(COLORS),
    "appear": ("start", "middle", "end"),
}
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class VideoConfig:
    """Generator settings.

    - size: side of the square frames in pixels (even, for yuv420p).
    - num_frames: frames per clip; fps: frames per second of the mp4.
    - frames_per_sample: evenly spaced frames put into `Sample.images`.
    - cache_dir: where clips are written; None means `<tmp>/mmreduce-video`.
    """

    size: int = 96
    num_frames: int = 24
    fps: int = 8
    frames_per_sample: int = 4
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 64 or self.size % 2:
            raise ValueError(f"size must be an even int >= 64, got {self.size!r}")
        if not isinstance(self.num_frames, int) or self.num_frames < 9:
            raise ValueError(f"num_frames must be an int >= 9, got {self.num_frames!r}")
        if not isinstance(self.fps, int) or self.fps < 1:
            raise ValueError(f"fps must be a positive int, got {self.fps!r}")
        if not 1 <= self.frames_per_sample <= self.num_frames:
            raise ValueError(f"frames_per_sample must be in [1, num_frames={self.num_frames}], "
                             f"got {self.frames_per_sample!r}")

    @property
    def directory(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(tempfile.gettempdir()) / "mmreduce-video"


def write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """Write RGB frames, each (H, W, 3) uint8, as an H.264 mp4 (near-lossless, single-threaded, deterministic).

    The file is written beside `path` and renamed, so a reader never sees half a clip.
    """
    import av  # imported here: only the video benchmark needs PyAV

    height, width, _ = frames[0].shape
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "4", "threads": "1", "preset": "medium"}
        stream.codec_context.thread_count = 1
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _free_spot(rng, size, radius, taken, path_boxes=()) -> tuple[int, int]:
    for _ in range(300):
        cx, cy = (int(v) for v in rng.integers(radius + 2, size - radius - 2, size=2))
        box = shape_box(cx, cy, radius)
        if not any(boxes_overlap(box, other, gap=3) for other in [*taken, *path_boxes]):
            return cx, cy
    raise RuntimeError("video: no free spot for a distractor")


def make_video_sample(split: str, seed: int, index: int, cfg: VideoConfig | None = None) -> Sample:
    """Sample `index` of `split` (see the module docstring); draws the frames and writes the clip if missing."""
    cfg = cfg or VideoConfig()
    rng = sample_rng("video", split, seed, index)
    qtype, answer = balanced_answer(index, QTYPES, ANSWERS)
    size, n = cfg.size, cfg.num_frames
    radius = int(rng.integers(size // 16, size // 10 + 1))
    shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
    color = str(list(COLORS)[int(rng.integers(len(COLORS)))])

    # The actor's colour and position per frame, and the frame it appears at.
    colors = [color] * n
    appear_at = 0
    if qtype == "direction":
        dx, dy = _STEP[answer]
        travel = size // 2  # the actor crosses half the frame
        start = [int(rng.integers(radius + 2, size - radius - 2)) for _ in range(2)]
        if dx:
            start[0] = size // 4 if dx > 0 else size - size // 4
        else:
            start[1] = size // 4 if dy > 0 else size - size // 4
        track = [(start[0] + dx * travel * t // (n - 1), start[1] + dy * travel * t // (n - 1)) for t in range(n)]
        question = f"which way does the {color} {shape} move ?"
    else:
        centre = tuple(int(v) for v in rng.integers(radius + 2, size - radius - 2, size=2))
        track = [centre] * n
        if qtype == "color_change":
            before = str([c for c in COLORS if c != answer][int(rng.integers(len(COLORS) - 1))])
            change = int(rng.integers(n // 4, 3 * n // 4))
            colors = [before] * change + [answer] * (n - change)
            question = f"what color does the {shape} turn ?"
        else:
            part = ANSWERS["appear"].index(answer)
            # Appearance frames stay clear of the thirds' borders so "start/middle/end" is unambiguous.
            low, high = part * n // 3 + 1, (part + 1) * n // 3 - 1
            appear_at = 0 if part == 0 else int(rng.integers(low, high + 1))
            question = f"when does the {color} {shape} appear ?"

    path_boxes = [shape_box(x, y, radius) for x, y in track]
    bg = background(rng, (size, size), textured=bool(rng.random() < 0.5))
    distractors = []
    for _ in range(int(rng.integers(0, 3))):
        d_radius = int(rng.integers(size // 16, size // 10 + 1))
        d_shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
        if d_shape == shape:
            continue  # the actor's shape stays unique, so "the {shape}" names one object
        spot = _free_spot(rng, size, d_radius, [shape_box(d["cx"], d["cy"], d["radius"]) for d in distractors], path_boxes)
        distractors.append(dict(shape=d_shape, color=str(list(COLORS)[int(rng.integers(len(COLORS)))]),
                                cx=spot[0], cy=spot[1], radius=d_radius))

    frames = []
    for t in range(n):
        frame = bg.copy()
        draw = ImageDraw.Draw(frame)
        for d in distractors:
            draw_shape(draw, d["shape"], d["cx"], d["cy"], d["radius"], COLORS[d["color"]])
        if t >= appear_at:
            draw_shape(draw, shape, *track[t], radius, COLORS[colors[t]])
        frames.append(np.asarray(frame))  # (H, W, 3) uint8

    cfg.directory.mkdir(parents=True, exist_ok=True)
    path = cfg.directory / f"video-{split}-{seed}-{index}-{size}-{n}.mp4"
    if not path.exists():
        write_mp4(frames, path, cfg.fps)
    picks = np.linspace(0, n - 1, cfg.frames_per_sample).round().astype(int).tolist()
    meta = dict(benchmark="video", split=split, seed=seed, index=index, qtype=qtype, shape=shape, color=color,
                track=track, colors=colors, appear_at=appear_at, distractors=distractors, frame_indices=picks,
                num_frames=n, fps=cfg.fps, target_boxes=[shape_box(*track[t], radius) for t in picks])
    return Sample(images=[Image.fromarray(frames[t]) for t in picks], question=question, answer=answer,
                  choices=ANSWERS[qtype], meta=meta, video=str(path))
