"""The H-Reducer (`MplugDocOwlHReducerModel`): ViT features -> `tokens_per_crop` LLM-width tokens per crop.

CLS dropped; the (side x side) patch map goes through a (1, 4)-strided conv to 4C channels + GELU, the 4 channel
groups are laid back side by side along the width (C channels, full width), a second (1, 4)-strided conv merges every
4 horizontally adjacent patches into one token, `visual_fc` maps to the LLM width and the learned `vit_eos` is
appended: (side / 1) x (side / 4) + 1 = 32 x 8 + 1 = 257 tokens at 448 px, row-major, eos last. `ln_q` is kept for
the checkpoint's names; DocOwl 1.5's forward does not use it either.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import DocOwlHReducerConfig
from .pretrained import DocOwlPreTrainedModel

__all__ = ["MplugDocOwlHReducerModel"]


class MplugDocOwlHReducerModel(DocOwlPreTrainedModel):
    config_class = DocOwlHReducerConfig

    def __init__(self, config: DocOwlHReducerConfig, language_hidden_size: int):
        super().__init__(config)
        width = config.hidden_size
        kernel = config.kernel
        self.groups = kernel[0] * kernel[1]
        self.ln_q = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.reducer_before = nn.Sequential(nn.Conv2d(width, self.groups * width, kernel, stride=kernel), nn.GELU())
        self.reducer = nn.Conv2d(width, width, kernel, stride=kernel)
        self.visual_fc = nn.Linear(width, language_hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))
        self.post_init()

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(N, 1 + side^2, C) ViT output -> (N, tokens_per_crop, D_llm)."""
        patches = encoder_hidden_states[:, 1:]  # drop CLS
        crops, length, width = patches.shape
        side = int(round(length**0.5))
        grid = patches.transpose(1, 2).reshape(crops, width, side, side)  # (N, C, H, W)
        mixed = self.reducer_before(grid)  # (N, G*C, H/kh, W/kw)
        _, _, rows, cols = mixed.shape
        # channel g*C + c at column w -> channel c at column w*G + g
        mixed = mixed.view(crops, self.groups, width, rows, cols).permute(0, 2, 3, 4, 1)
        mixed = mixed.reshape(crops, width, rows, cols * self.groups)
        tokens = self.reducer(mixed).flatten(2).transpose(1, 2)  # (N, rows * cols', C)
        tokens = self.visual_fc(tokens)
        return torch.cat([tokens, self.vit_eos.expand(crops, -1, -1).to(tokens.dtype)], dim=1)
