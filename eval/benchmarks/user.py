"""Your own data: a JSON-lines dataset file in place of a synthetic benchmark.

    from mmreduce.eval.benchmarks import load_benchmark
    samples = load_benchmark("my-data.jsonl", "test", n=100)    # any name ending in .jsonl is a dataset file

One JSON object per line (blank lines are skipped):

    {"image": "cats/1.png", "question": "What animal is this?", "answer": "cat", "choices": ["cat", "dog"]}
    {"images": ["a.png", "b.png"], "question": "Which one is larger?", "answer": "the first", "split": "test"}
    {"video": "clips/7.mp4", "frames": 4, "question": "Where does the ball go?", "answer": "left", "id": "v7"}

- exactly one of `"image"` (a path), `"images"` (a non-empty list of paths) or `"video"` (a path; `"frames"`
  evenly spaced frames, default 4, are read with decord and shown as that many images);
- `"question"` and `"answer"`: non-empty strings; `"choices"` (optional): strings that include the answer;
- `"id"` (optional, unique), `"split"` (optional: "train", "calibration" or "test"; a line without one belongs
  to every split).

Relative paths are relative to the dataset file's folder. Answers and choices are stored as they are compared:
lower case, punctuation stripped from each word (`normalize_reference`); the text as written is kept in
`meta["answer_text"]`.

Every line is checked before the first sample is returned (fields, media files exist, images have a readable
header), and the media of the selected lines are decoded once, so a bad line fails at once with a `ValueError`
naming the file, the line, the field and the fix. Images are not held in memory: `Sample.images` decodes them
from their files whenever it is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from .base import SPLITS, Sample

__all__ = ["DEFAULT_FRAMES", "FIELDS", "MediaImages", "is_dataset_file", "iter_dataset_file", "load_dataset_file",
           "normalize_reference", "read_dataset_file"]

#: The keys a line may hold.
FIELDS = ("image", "images", "video", "frames", "question", "answer", "choices", "id", "split")
#: Frames read from a video when its line gives no "frames".
DEFAULT_FRAMES = 4
_MEDIA = ("image", "images", "video")
_RELATIVE = "(paths are relative to the dataset file's folder)"


def is_dataset_file(name: str | os.PathLike) -> bool:
    """Whether `load_benchmark` reads `name` as a dataset file: it ends in `.jsonl`."""
    return os.fspath(name).lower().endswith(".jsonl")


def normalize_reference(text: str) -> str:
    """An answer as it is compared: words lower-cased, `.,:;!?` stripped from each, joined by one space.

    Word by word the same rule as `eval/accuracy.normalize_answer` applies to generated answers.
    """
    words = (word.strip(".,:;!?").lower() for word in text.split())
    return " ".join(word for word in words if word)


@dataclass(frozen=True)
class DatasetLine:
    """One checked line of a dataset file (media not decoded)."""

    number: int
    kind: str  # "image" (one or more image files) or "video"
    paths: tuple[Path, ...]
    fields: tuple[str, ...]  # where each path was written: "image", "images[0]", ..., "video"
    written: tuple[str, ...]  # each path as the line writes it (for messages)
    frames: int  # frames read from the video (video lines), else the number of images
    question: str
    answer: str
    answer_text: str
    choices: tuple[str, ...]
    id: str | int | None
    split: str | None


class _Where:
    """Builds the messages: `<file> line <n>: "<field>" ...`."""

    def __init__(self, file: str, number: int | None = None):
        self.file, self.number = file, number

    def __call__(self, message: str, field: str | None = None) -> ValueError:
        where = self.file if self.number is None else f"{self.file} line {self.number}"
        return ValueError(f"{where}: " + (f'"{field}" ' if field else "") + message)


class MediaImages(Sequence):
    """The RGB images of one line, decoded from its files on every read instead of held in memory.

    Iterating (or `list(...)`) decodes each file once; `images[i]` decodes one image file, or the video's frames.
    """

    def __init__(self, line: DatasetLine, file: str):
        self.line, self.file = line, file

    def __len__(self) -> int:
        return self.line.frames

    def __getitem__(self, index):
        line = self.line
        if line.kind == "image" and isinstance(index, int):
            i = range(len(line.paths))[index]  # IndexError past the end, negative indices count from it
            return _decode_image(line.paths[i], line.written[i], line.fields[i], _Where(self.file, line.number))
        return self.load()[index]

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.load())

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.line.paths)
        return f"MediaImages({self.line.kind}: {names}; {len(self)} image(s))"

    def load(self) -> list[Image.Image]:
        """The decoded images (a new list each call); `ValueError` naming the line when a file cannot be read."""
        where = _Where(self.file, self.line.number)
        line = self.line
        if line.kind == "video":
            return _video_frames(line.paths[0], line.written[0], line.frames, where)
        return [_decode_image(path, value, field, where)
                for path, value, field in zip(line.paths, line.written, line.fields)]


def _decode_image(path: Path, value: str, field: str, where: _Where) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise where(f"file {value} does not exist any more {_RELATIVE}", field) from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise where(f"file {value} could not be decoded as an image ({error}): replace it with a readable "
                    f"PNG, JPEG, WebP, BMP or GIF", field) from None


def _video_frames(path: Path, value: str, frames: int, where: _Where) -> list[Image.Image]:
    """`frames` evenly spaced frames (centres of equal segments, as the demo reads videos), RGB; decord, or PyAV
    where decord cannot read the file (`mmreduce.eval.video_io`)."""
    from ..video_io import TooFewFrames, read_video

    try:
        return read_video(path, frames, max_frames=None, spacing="centres").frames
    except TooFewFrames as error:
        raise where(f"{frames} is more than the {error.total} frame(s) of {value}: set \"frames\" to {error.total} or "
                    "fewer", "frames") from None
    except ValueError as error:
        reason = str(error).split(" (", 1)[-1].rsplit("): ", 1)[0] if " (" in str(error) else str(error)
        raise where(f"file {value} could not be read as a video ({reason[:200]}): use an mp4, webm, avi, mov or mkv "
                    f"file (an image goes under \"image\")", "video") from None


def _text(record: dict, key: str, where: _Where, required: bool = True) -> str | None:
    if key not in record:
        if required:
            raise where(f"is missing: every line needs a non-empty \"{key}\" string", key)
        return None
    value = record[key]
    if not isinstance(value, str):
        raise where(f"must be a string, got {json.dumps(value)}: write it in quotes", key)
    if not value.strip():
        raise where("is empty: give a non-empty string", key)
    return value.strip()


def _media_path(value: Any, field: str, folder: Path, where: _Where) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise where(f"must be a file path string, got {json.dumps(value)}", field)
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise where(f"file {value} {what} {_RELATIVE}", field)
    return path


def _check_image_header(path: Path, value: str, field: str, where: _Where) -> None:
    try:
        with Image.open(path):  # reads the header only
            pass
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        reason = "is not an image PIL can read" if isinstance(error, UnidentifiedImageError) else f"failed ({error})"
        raise where(f"file {value} {reason}: use a PNG, JPEG, WebP, BMP or GIF file (a video goes under "
                    f"\"video\")", field) from None


def _parse_line(record: Any, number: int, folder: Path, where: _Where) -> DatasetLine:
    if not isinstance(record, dict):
        raise where(f"must be a JSON object like {{\"image\": ..., \"question\": ..., \"answer\": ...}}, "
                    f"got a {type(record).__name__}")
    unknown = [key for key in record if key not in FIELDS]
    if unknown:
        raise where(f"is not a known field: a line may hold {', '.join(FIELDS)}", unknown[0])
    given = [key for key in _MEDIA if key in record]
    if len(given) != 1:
        found = f"found {', '.join(given)}" if given else "found none"
        raise where(f'needs exactly one of "image", "images" or "video" ({found})', given[-1] if given else "image")
    kind = given[0]
    if "frames" in record and kind != "video":
        raise where('applies to "video" lines only: remove it', "frames")
    frames = record.get("frames", DEFAULT_FRAMES)
    if kind == "video" and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 1):
        raise where(f"must be a positive whole number of frames, got {json.dumps(frames)}", "frames")
    if kind == "images":
        values = record["images"]
        if not isinstance(values, list) or not values:
            raise where(f"must be a non-empty list of file paths, got {json.dumps(values)} (one image goes under "
                        f"\"image\")", "images")
        fields = [f"images[{i}]" for i in range(len(values))]
    else:
        values, fields = [record[kind]], [kind]
    paths = tuple(_media_path(value, field, folder, where) for value, field in zip(values, fields))
    if kind != "video":
        for path, value, field in zip(paths, values, fields):
            _check_image_header(path, value, field, where)

    question = _text(record, "question", where)
    answer_text = _text(record, "answer", where)
    answer = normalize_reference(answer_text)
    if not answer:
        raise where(f"{json.dumps(answer_text)} has no word left once punctuation is stripped: give a word",
                    "answer")
    choices: tuple[str, ...] = (answer,)
    if "choices" in record:
        raw = record["choices"]
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) and normalize_reference(c) for c in raw):
            raise where(f"must be a non-empty list of non-empty strings, got {json.dumps(raw)}", "choices")
        choices = tuple(dict.fromkeys(normalize_reference(c) for c in raw))
        if answer not in choices:
            raise where(f"{json.dumps(raw)} does not contain the answer {json.dumps(answer_text)}: add it to "
                        f"\"choices\" or fix \"answer\" (compared lower-cased, punctuation stripped)", "choices")
    identifier = record.get("id")
    if identifier is not None and (not isinstance(identifier, (str, int)) or isinstance(identifier, bool)):
        raise where(f"must be a string or a whole number, got {json.dumps(identifier)}", "id")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise where(f"must be one of {', '.join(SPLITS)} (or left out: the line then belongs to every split), got "
                    f"{json.dumps(split)}", "split")
    return DatasetLine(number=number, kind="video" if kind == "video" else "image", paths=paths, fields=tuple(fields),
                       written=tuple(values),
                       frames=frames if kind == "video" else len(paths), question=question, answer=answer,
                       answer_text=answer_text, choices=choices, id=identifier, split=split)


def _open(path: str | os.PathLike) -> tuple[str, Path]:
    shown = os.fspath(path)
    file = Path(shown).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise ValueError(f"dataset file {shown} {what} (a dataset name ending in .jsonl is read as your own data "
                         f"file: one JSON object per line)")
    return shown, file


def read_dataset_file(path: str | os.PathLike) -> list[DatasetLine]:
    """Every line of a dataset file, checked (fields, media files exist, image headers readable); media not decoded."""
    shown, file = _open(path)
    folder = file.resolve().parent
    lines: list[DatasetLine] = []
    ids: dict[Any, int] = {}
    try:
        with open(file, encoding="utf-8-sig") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                where = _Where(shown, number)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise where(f"is not valid JSON ({error.msg} at column {error.colno}): write one JSON object "
                                f"per line") from None
                line = _parse_line(record, number, folder, where)
                if line.id is not None:
                    if line.id in ids:
                        raise where(f"{json.dumps(line.id)} is also the id of line {ids[line.id]}: give every line "
                                    f"its own id (or none)", "id")
                    ids[line.id] = number
                lines.append(line)
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text: save the dataset file as UTF-8 JSON lines") from None
    if not lines:
        raise ValueError(f"{shown} holds no lines: write one JSON object per line "
                         f"({{\"image\": ..., \"question\": ..., \"answer\": ...}})")
    return lines


def _check_count(value: Any, name: str, shown: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{shown}: {name} must be a non-negative int, got {value!r}")


def iter_dataset_file(path: str | os.PathLike, split: str, n: int, start: int = 0,
                      **options: Any) -> Iterator[Sample]:
    """Samples of lines `start .. start + n - 1` of `split` in a dataset file, in the file's order.

    The whole file is checked, and the selected lines' media decoded once, before this returns; then the samples
    are built one at a time. A line without "split" belongs to every split. Fewer than `n` lines is an error
    that says how many there are. The file takes no options (they are the synthetic benchmarks' config fields).
    """
    shown = os.fspath(path)
    if options:
        raise ValueError(f"{shown}: option(s) {', '.join(sorted(options))} apply to the synthetic benchmarks; a "
                         f"dataset file takes none (remove them)")
    if split not in SPLITS:
        raise ValueError(f"{shown}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_count(n, "n", shown)
    _check_count(start, "start", shown)
    lines = read_dataset_file(path)
    in_split = [line for line in lines if line.split in (None, split)]
    chosen = in_split[start:start + n]
    if len(chosen) < n:
        available = max(len(in_split) - start, 0)
        after = f" after skipping {start}" if start else ""
        raise ValueError(f"{shown} has {len(lines)} line(s), {len(in_split)} of them in split {split!r} (lines "
                         f"without \"split\" belong to every split); {n} were asked for{after} but {available} "
                         f"remain: ask for at most {available} (--samples {available}) or add lines")
    for line in chosen:  # decode once now, so that a broken file fails before a long run, not during it
        MediaImages(line, shown).load()
    return _samples(chosen, shown, str(Path(shown).expanduser().resolve()), split, start)


def _samples(chosen: list[DatasetLine], shown: str, resolved: str, split: str, start: int) -> Iterator[Sample]:
    for index, line in enumerate(chosen, start=start):
        meta = dict(benchmark="file", path=resolved, line=line.number, split=split, index=index, id=line.id,
                    answer_text=line.answer_text, media=[str(p) for p in line.paths])
        yield Sample(images=MediaImages(line, shown), question=line.question, answer=line.answer,
                     choices=line.choices, meta=meta, video=str(line.paths[0]) if line.kind == "video" else None)


def load_dataset_file(path: str | os.PathLike, split: str, n: int, start: int = 0, **options: Any) -> list[Sample]:
    """`list(iter_dataset_file(...))`: the samples hold file paths, not decoded images."""
    return list(iter_dataset_file(path, split, n, start, **options))
