"""Read evenly spaced frames of a video file as RGB images, with decord or, where decord cannot, PyAV.

    from mmreduce.eval.video_io import read_video_frames, read_video
    frames = read_video_frames("clip.mp4", 4)                  # list of 4 PIL RGB images
    video = read_video("clip.mp4", 4, max_seconds=120)         # + backend, indices, frame count, fps

Frames are evenly spaced from the first to the last (`spacing="ends"`, numpy's `linspace` rounded: how the `video`
benchmark picks `Sample.images`, so a model trained on it sees the same frames), or at the centres of equal
segments (`spacing="centres"`: how the demo and dataset files read videos, skipping fades at either end).

decord seeks to the frames it needs; PyAV, the fallback, decodes from the start up to the last frame needed. Which
one read a file is in `VideoFrames.backend` and logged at debug level (logger `mmreduce.eval.video_io`).
Long videos are refused before anything is decoded: more than `max_frames` frames (default
`DEFAULT_MAX_FRAMES`), or, when `max_seconds` is given, longer than that instead. Every error is one line that
names the file and says what to do.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BACKENDS", "DEFAULT_MAX_FRAMES", "TooFewFrames", "VideoFrames", "frame_indices", "read_video",
           "read_video_frames"]

log = logging.getLogger(__name__)

#: Longest video read without `max_frames` / `max_seconds` (25 s at 24 fps).
DEFAULT_MAX_FRAMES = 600
#: `backend` values: "auto" tries decord, then PyAV.
BACKENDS = ("auto", "decord", "pyav")
SPACINGS = ("ends", "centres")
_FIX_UNREADABLE = "use a readable mp4, webm, avi, mov or mkv file (or re-encode it, e.g. with ffmpeg)"


@dataclass
class VideoFrames:
    """What `read_video` read: the frames (RGB), their indices in the video, the video's frame count and frame
    rate (0.0 when the file gives none), and the backend that decoded it ("decord" or "pyav")."""

    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
    fps: float
    backend: str

    @property
    def seconds(self) -> float:
        """Duration from the frame count and rate (0.0 without a rate)."""
        return self.total_frames / self.fps if self.fps > 0 else 0.0


class TooFewFrames(ValueError):
    """The video has fewer frames (`total`) than were asked for."""

    def __init__(self, message: str, total: int):
        super().__init__(message)
        self.total = total


class _Unreadable(Exception):
    """A backend could not open or decode the file; the message is its reason, on one line."""


def frame_indices(total: int, num_frames: int, spacing: str = "ends") -> list[int]:
    """`num_frames` evenly spaced indices into `total` frames (see the module docstring for `spacing`)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= num_frames <= total:
        raise ValueError(f"num_frames must be in [1, total={total}], got {num_frames!r}")
    if spacing == "ends":
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    return [int((i + 0.5) * total / num_frames) for i in range(num_frames)]


def read_video_frames(path: str | os.PathLike, num_frames: int, max_frames: int | None = DEFAULT_MAX_FRAMES,
                      max_seconds: float | None = None, backend: str = "auto", spacing: str = "ends"
                      ) -> list[Image.Image]:
    """`num_frames` evenly spaced RGB frames of the video at `path` (`read_video` for the arguments)."""
    return read_video(path, num_frames, max_frames, max_seconds, backend, spacing).frames


def read_video(path: str | os.PathLike, num_frames: int, max_frames: int | None = DEFAULT_MAX_FRAMES,
               max_seconds: float | None = None, backend: str = "auto", spacing: str = "ends") -> VideoFrames:
    """Read `num_frames` evenly spaced frames of the video at `path`.

    - max_frames: refuse a video with more frames than this (None: no limit); ignored when max_seconds is given.
    - max_seconds: refuse a video longer than this many seconds instead.
    - backend: "auto" (decord if it imports and reads the file, else PyAV), "decord" or "pyav".
    - spacing: "ends" (first to last frame, as the `video` benchmark) or "centres" (centres of equal segments).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable one, one that is too long, one with
    fewer frames than asked for, or a bad argument; each message names the file and the fix.
    """
    _check_arguments(num_frames, max_frames, max_seconds, backend, spacing)
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: give the path of a video file (mp4, webm, avi, mov, mkv)")
    if not file.is_file():
        raise ValueError(f"{file} is not a file: give the path of a video file (mp4, webm, avi, mov, mkv)")
    order = {"auto": ("decord", "pyav"), "decord": ("decord",), "pyav": ("pyav",)}[backend]
    failures = []
    for name in order:
        try:
            reader = _OPENERS[name](file)
        except _Unreadable as reason:
            failures.append(f"{name}: {reason}")
            continue
        total, fps = reader.total, reader.fps
        try:
            _check_length(file, total, fps, num_frames, max_frames, max_seconds)
            indices = frame_indices(total, num_frames, spacing)
            arrays = reader.read(indices)
        except _Unreadable as reason:
            failures.append(f"{name}: {reason}")
            continue
        finally:
            reader.close()
        log.debug("read %d frames %s of %s with %s (%d frames, %.2f fps)", num_frames, indices, file, name, total, fps)
        frames = [Image.fromarray(array).convert("RGB") for array in arrays]
        return VideoFrames(frames=frames, indices=indices, total_frames=total, fps=fps, backend=name)
    raise ValueError(f"{file} could not be read as a video ({'; '.join(failures)}): {_FIX_UNREADABLE}")


def _check_arguments(num_frames, max_frames, max_seconds, backend: str, spacing: str) -> None:
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}: ask for at least one frame")
    if max_frames is not None and (not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1):
        raise ValueError(f"max_frames must be an int >= 1 or None (no limit), got {max_frames!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a number > 0 or None, got {max_seconds!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def _check_length(file: Path, total: int, fps: float, num_frames: int, max_frames: int | None,
                  max_seconds: float | None) -> None:
    """Refuse an empty video, one over the limit and one with fewer frames than asked for."""
    if total < 1:
        raise ValueError(f"{file} has no video frames: {_FIX_UNREADABLE}")
    seconds = total / fps if fps > 0 else 0.0
    if max_seconds is not None:
        if fps <= 0:
            raise ValueError(f"{file} gives no frame rate, so max_seconds cannot be checked: pass max_frames=... "
                             f"instead (it has {total} frames)")
        if seconds > max_seconds:
            raise ValueError(f"{file} is {total} frames ({seconds:.1f} s); the limit is {max_seconds:g} s — pass "
                             f"max_seconds={math.ceil(seconds)} or trim it")
    elif max_frames is not None and total > max_frames:
        raise ValueError(f"{file} is {total} frames ({seconds:.1f} s); the limit is {max_frames} frames — pass "
                         f"max_seconds={max(1, math.ceil(seconds))} (or max_frames={total}) or trim it")
    if num_frames > total:
        raise TooFewFrames(f"{file} has {total} frames, fewer than num_frames={num_frames}: ask for {total} or fewer",
                           total)


def _reason(error: BaseException) -> str:
    """A backend's error as one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


class _DecordReader:
    def __init__(self, file: Path):
        try:
            import decord
        except ImportError as error:
            raise _Unreadable(f"not importable ({_reason(error)})") from None
        try:
            self._reader = decord.VideoReader(str(file), num_threads=1)
            self.total = len(self._reader)
            self.fps = float(self._reader.get_avg_fps() or 0.0)
        except Exception as error:  # decord raises its own DECORDError (and RuntimeError) for unreadable files
            raise _Unreadable(_reason(error)) from None

    def read(self, indices: list[int]) -> list[np.ndarray]:
        try:
            batch = self._reader.get_batch(indices).asnumpy()  # (k, H, W, 3) uint8 RGB
        except Exception as error:
            raise _Unreadable(f"frames {indices} could not be decoded ({_reason(error)})") from None
        return list(batch)

    def close(self) -> None:
        self._reader = None


class _PyAVReader:
    def __init__(self, file: Path):
        try:
            import av
        except ImportError as error:
            raise _Unreadable(f"not importable ({_reason(error)})") from None
        try:
            self._container = av.open(str(file))
        except Exception as error:  # av.error.InvalidDataError and friends
            raise _Unreadable(_reason(error)) from None
        if not self._container.streams.video:
            self.close()
            raise _Unreadable("the file has no video stream")
        # FFmpeg reads a still image as a one-frame "video" (png_pipe, jpeg_pipe, image2...): refuse it, as decord does.
        if self._container.format.name.endswith("_pipe") or self._container.format.name.startswith("image2"):
            self.close()
            raise _Unreadable(f"the file is a still image ({self._container.format.name}), not a video")
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.total = stream.frames or self._count_packets()

    def _count_packets(self) -> int:
        """The frame count of a container that does not store it: one packet per video frame."""
        try:
            count = sum(1 for packet in self._container.demux(video=0) if packet.size)
            self._container.seek(0)
        except Exception as error:
            self.close()
            raise _Unreadable(_reason(error)) from None
        return count

    def read(self, indices: list[int]) -> list[np.ndarray]:
        wanted, last = set(indices), max(indices)
        found: dict[int, np.ndarray] = {}
        try:
            for index, frame in enumerate(self._container.decode(video=0)):
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
                if index >= last:
                    break
        except Exception as error:
            raise _Unreadable(f"decoding stopped ({_reason(error)})") from None
        if len(found) < len(wanted):
            missing = sorted(wanted - set(found))
            raise _Unreadable(f"frames {missing} could not be decoded (the file says it has {self.total})")
        return [found[i] for i in indices]

    def close(self) -> None:
        self._container.close()


_OPENERS = {"decord": _DecordReader, "pyav": _PyAVReader}
