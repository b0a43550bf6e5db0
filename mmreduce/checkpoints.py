"""The one resolver of checkpoint names: a folder path, or the name of a checkpoint shipped under a root folder.

Each part of the repository that ships weights passes its own root (the bundled tiny VLMs under `eval/checkpoints`,
the visual tokenizers under `tokenizers_visual/checkpoints`), so every command names and reports them the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["resolve_checkpoint", "shipped_checkpoints"]


def shipped_checkpoints(root: str | os.PathLike) -> list[str]:
    """Names of the checkpoint folders under `root`, sorted (empty when `root` does not exist)."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def resolve_checkpoint(name_or_path: str | os.PathLike, root: str | os.PathLike, what: str = "checkpoint",
                       aliases: Mapping[str, str] | None = None) -> Path:
    """`name_or_path` if it is a folder, else `root / name_or_path` if that is one; a name in `aliases` is read as
    the shipped folder it names (a version name for the shipped folder, so the weights are stored once).

    Raises:
        ValueError naming the argument and the shipped names, e.g. "no tiny checkpoint 'x': not a folder and not one of
        ['tiny-llava-shapes', ...] shipped in the repository".
    """
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate
    aliases = dict(aliases or {})
    shipped = Path(root) / aliases.get(str(name_or_path), str(name_or_path))
    if str(name_or_path) and shipped.is_dir():
        return shipped
    names = sorted(shipped_checkpoints(root) + [a for a, target in aliases.items() if (Path(root) / target).is_dir()])
    raise ValueError(f"no {what} {str(name_or_path)!r}: not a folder and not one of {names} "
                     "shipped in the repository")
