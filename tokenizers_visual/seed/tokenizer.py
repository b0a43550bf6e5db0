"""SeedTokenizer: the inference face of a trained SEED model (a ``VisualTokenizer``), plus save/load.

A checkpoint folder holds ``config.json`` (SeedConfig) and ``model.safetensors`` (float16 to keep the shipped
files small; loaded back as float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import SeedConfig
from .data import CaptionVocab
from .model import SeedModel

__all__ = ["SeedTokenizer"]


class SeedTokenizer(nn.Module):
    """pixels (B, 3, S, S) in [0, 1] -> N causal ids per image; ids -> reconstructed causal embeddings.

    For an LLM front end: ``ids + offset`` are the image tokens (SEED puts them after the text vocabulary,
    offset 32000 for LLaMA); ``decode`` / ``generation_embedding`` map generated ids back.
    """

    def __init__(self, model: SeedModel) -> None:
        super().__init__()
        self.model = model.eval()
        self.vocab = CaptionVocab()

    @property
    def config(self) -> SeedConfig:
        return self.model.config

    @property
    def codebook_size(self) -> int:
        return self.model.config.vq.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.model.config.qformer.num_queries

    @property
    def image_size(self) -> int:
        return self.model.config.clip.image_size

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) float in [0, 1] -> (B, N) int64 ids."""
        causal, _ = self.model.causal_embeddings(pixels)
        return self.model.quantize(causal).ids

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """(B, N) int64 ids -> (B, N, W) reconstructed causal embeddings."""
        self._check_ids(ids)
        return self.model.reconstruct(self.model.quantizer.lookup(ids))[0]

    @torch.no_grad()
    def generation_embedding(self, ids: Tensor) -> Tensor:
        """(B, N) ids -> (B, E) predicted generation embedding (the stand-in for SEED's unCLIP embedding)."""
        self._check_ids(ids)
        return self.model.reconstruct(self.model.quantizer.lookup(ids))[1]

    @torch.no_grad()
    def text_embedding(self, captions: list[str]) -> Tensor:
        """Captions -> (B, proj) unit-norm ITC text embeddings (for retrieval)."""
        return self.model.itc_text(self.vocab.encode(captions, self.config.clip.text_length))

    def _check_ids(self, ids: Tensor) -> None:
        if ids.dim() != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"ids must be (B, {self.num_tokens}), got shape {tuple(ids.shape)}")

    # ----- persistence -----
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> "SeedTokenizer":
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} must contain config.json and model.safetensors")
        config = SeedConfig.from_dict(json.loads((folder / "config.json").read_text()))
        model = SeedModel(config)
        stored = load_file(str(folder / "model.safetensors"))
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in stored.items()}
        model.load_state_dict(state)
        return cls(model)
