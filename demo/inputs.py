"""Turning what a user uploads into images the model can take, with documented limits and clear errors.

Limits (also shown in the UI):
- images: at most `MAX_IMAGE_BYTES` (20 MiB) on disk and `MAX_IMAGE_SIDE` (4096) pixels on either side;
- videos (mp4, webm, avi, mov, mkv): at most `MAX_VIDEO_BYTES` (50 MiB) and `MAX_VIDEO_SECONDS` (60 s);
  `VIDEO_FRAMES` (4) evenly spaced frames (first to last, decord or PyAV) are given to the model as that many images.
The side limit is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = [
    "LIMITS_TEXT",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_SIDE",
    "MAX_VIDEO_BYTES",
    "MAX_VIDEO_SECONDS",
    "VIDEO_EXTENSIONS",
    "VIDEO_FRAMES",
    "DemoInputError",
    "check_question",
    "load_image",
    "load_media",
    "load_video_frames",
]

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_SIDE = 4096
MAX_VIDEO_BYTES = 50 * 2**20
MAX_VIDEO_SECONDS = 60.0
VIDEO_FRAMES = 4
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
MAX_QUESTION_CHARS = 500
LIMITS_TEXT = (f"Images up to {MAX_IMAGE_BYTES // 2**20} MiB and {MAX_IMAGE_SIDE} px per side; videos up to "
               f"{MAX_VIDEO_BYTES // 2**20} MiB and {MAX_VIDEO_SECONDS:.0f} s ({VIDEO_FRAMES} frames are sampled).")


class DemoInputError(ValueError):
    """Bad user input; the UI shows its message as an error instead of a traceback."""


def _file(path: str | os.PathLike | None, what: str) -> Path:
    if path is None or str(path).strip() == "":
        raise DemoInputError(f"no {what} given: upload an image (or a short video) or pick an example")
    file = Path(path)
    if not file.is_file():
        raise DemoInputError(f"{what} {file.name!r} was not found (upload it again)")
    return file


def load_image(path: str | os.PathLike | None) -> Image.Image:
    """An RGB image from `path`; DemoInputError for a missing, non-image or too large file."""
    file = _file(path, "image")
    size = file.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise DemoInputError(f"image {file.name!r} is {size / 2**20:.1f} MiB; the limit is "
                             f"{MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        with Image.open(file) as probe:
            width, height = probe.size  # read from the header only
    except (UnidentifiedImageError, OSError):
        raise DemoInputError(f"{file.name!r} is not an image this demo can read (use PNG, JPEG, WebP, BMP or GIF, "
                             f"or a video: {', '.join(VIDEO_EXTENSIONS)})") from None
    except Image.DecompressionBombError:
        raise DemoInputError(f"image {file.name!r} is too large; the limit is {MAX_IMAGE_SIDE} px per side") from None
    if max(width, height) > MAX_IMAGE_SIDE:
        raise DemoInputError(f"image {file.name!r} is {width}x{height} px; the limit is {MAX_IMAGE_SIDE} px per side")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise DemoInputError(f"image {file.name!r} could not be decoded: {error}") from None


def _video_error(file: Path, error: Exception) -> DemoInputError:
    """The reader's one-line error for a demo user: the file's name only, and the demo's limit in its words."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    too_long = re.search(r"\(([\d.]+) s\); the limit is", message)
    if too_long:
        return DemoInputError(f"video {file.name!r} lasts {float(too_long.group(1)):.0f} s; the limit is "
                              f"{MAX_VIDEO_SECONDS:.0f} s (trim it)")
    return DemoInputError(message.replace(str(file), repr(file.name)).replace(str(file.parent) + os.sep, "")[:300])


def load_video_frames(path: str | os.PathLike | None, num_frames: int = VIDEO_FRAMES) -> list[Image.Image]:
    """`num_frames` evenly spaced RGB frames of a short video; DemoInputError when it is too long or unreadable."""
    file = _file(path, "video")
    size = file.stat().st_size
    if size > MAX_VIDEO_BYTES:
        raise DemoInputError(f"video {file.name!r} is {size / 2**20:.1f} MiB; the limit is "
                             f"{MAX_VIDEO_BYTES // 2**20} MiB")
    from mmreduce.eval.video_io import TooFewFrames, read_video

    try:
        # "ends" spacing: first to last frame, as the `video` benchmark sampled the clips tiny-llava-video saw.
        video = read_video(file, num_frames, max_seconds=MAX_VIDEO_SECONDS, spacing="ends")
    except TooFewFrames:
        video = None
    except (OSError, ValueError) as error:  # one line naming the file and the fix; never the server's folder
        raise _video_error(file, error) from None
    if video is None:  # a clip shorter than `num_frames` frames: take every frame it has
        try:
            video = read_video(file, 1, max_seconds=MAX_VIDEO_SECONDS, spacing="ends")
            video = read_video(file, video.total_frames, max_seconds=MAX_VIDEO_SECONDS, spacing="ends")
        except (OSError, ValueError) as error:
            raise _video_error(file, error) from None
    return [frame.convert("RGB") for frame in video.frames]


def load_media(path: str | os.PathLike | None) -> tuple[list[Image.Image], str]:
    """(images, kind) for an uploaded file: kind is "image" (one image) or "video" (sampled frames)."""
    file = _file(path, "image")
    if file.suffix.lower() in VIDEO_EXTENSIONS:
        return load_video_frames(file), "video"
    return [load_image(file)], "image"


def check_question(question: str | None) -> str:
    """The stripped question; DemoInputError when it is empty or too long."""
    text = (question or "").strip()
    if not text:
        raise DemoInputError("the question is empty: type a question about the image")
    if len(text) > MAX_QUESTION_CHARS:
        raise DemoInputError(f"the question has {len(text)} characters; the limit is {MAX_QUESTION_CHARS}")
    return text
