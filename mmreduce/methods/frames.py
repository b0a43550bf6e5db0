"""Uniform frame sampling: keep evenly spaced whole frames of a video (the video baseline a merging method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check_ratio, register_method
from .before import BeforeLLMMethod, TokenPlan, VisionTokens, keep_count
from .stride import evenly_spaced

__all__ = ["FrameSample"]


@register_method("frames")
@dataclass
class FrameSample(BeforeLLMMethod):
    """Keep ⌈keep_ratio·F⌉ evenly spaced frames of the F frames of a sample, every token of each; drop the others.

    A frame is one image of the prompt (a clip sent as several images, as the bundled video model takes it); a sample
    with one image keeps it whole (a Qwen2-VL video is one image of temporal slices: use `aim` or `stride` there).
    `equivalent=` is not offered: the tokens kept depend on the frame count; give keep_ratio.

    Parameters:
        keep_ratio: r in (0, 1], the share of frames kept.
    """

    keep_ratio: float = 0.5
    needs_layout = True
    budget_field = None

    def __post_init__(self):
        check_ratio("FrameSample", "keep_ratio", self.keep_ratio)

    @classmethod
    def example(cls, num_layers: int, keep_all: bool = False) -> "FrameSample":
        raise NotImplementedError("frames drops whole frames: the generic test prompts hold one image per sample, "
                                  "so its example would keep everything; tests/core/test_frames.py covers it")

    def kept_tokens(self, available: int) -> int:
        return available  # depends on the frame count, which a token count does not tell

    def plan(self, tokens: VisionTokens) -> TokenPlan:
        frame_of = torch.tensor([_frame(cell) for cell in tokens.cells])  # (n,)
        frames = frame_of.unique(sorted=True)  # (F,)
        chosen = frames[evenly_spaced(frames.numel(), keep_count(self.keep_ratio, frames.numel()))]
        return TokenPlan.select(torch.isin(frame_of, chosen))


def _frame(cell) -> int:
    """A token's frame: the prompt image it belongs to."""
    return cell.image
