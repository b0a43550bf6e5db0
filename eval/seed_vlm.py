"""SEED-token VLM: the frozen SEED tokenizer turns an image into N discrete ids; a small Llama reads them as words.

    vlm = SeedVLM.load("tiny-seed-shapes")                      # eval/checkpoints/tiny-seed-shapes, offline
    ids = vlm.encode_images([sample.image])                     # (1, 8) SEED ids in [0, 512)
    answers, timing = vlm.generate([sample.question], ids)      # ["red"], prefill / decode milliseconds

Prompt layout (LLaVA-1.5's conversation format, the image block in place of `<image>`):

    <s> USER : <img> <seed_i1> ... <seed_iN> </img> what color is the circle ? ASSISTANT :

The text vocabulary is the tiny LLaVA's (`tiny_models.VOCABULARY`); `<img>`, `</img>` and one token per code
(`<seed_0>` .. `<seed_{K-1}>`) are appended after it, so SEED id `i` is token `offset + i` (SEED puts its codes
after LLaMA's 32000 words the same way). The model directory holds `save_pretrained` of the `LlamaForCausalLM`
and its tokenizer, plus `seed_vlm.json` (the marker the bench harness dispatches on) naming the SEED tokenizer.

The SEED tokenizer was trained on its own 32 px two-shape images (`tokenizers_visual/seed/data.py`); `shapes`
images (128 px, up to 8 objects) are resized to its input side, which is a domain shift (see eval/SEED_VLM.md).
Training: `eval/testbed/train_seed_vlm.py` (`mmreduce train-seed-vlm`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mmreduce import checkpoints
from mmreduce.flops import ModelDims, prefill_flops

from .accuracy import normalize_answer
from .runners import PeakMemory, Runner
from .tiny_models import PROMPT, VOCABULARY, build_tokenizer, resolve_checkpoint

__all__ = ["IMG_CLOSE", "IMG_OPEN", "MARKER", "SeedVLM", "SeedVLMConfig", "SeedVLMRunner", "format_seed_prompt",
           "image_token", "is_seed_vlm"]

MARKER = "seed_vlm.json"
IMG_OPEN, IMG_CLOSE = "<img>", "</img>"
_FORMAT = "mmreduce-seed-vlm/1"


def image_token(code: int) -> str:
    """The vocabulary entry of SEED code `code`."""
    return f"<seed_{code}>"


def format_seed_prompt(question: str, ids: Sequence[int]) -> str:
    """The prompt for one image given as SEED ids, answered after "ASSISTANT:"."""
    block = IMG_OPEN + "".join(image_token(int(i)) for i in ids) + IMG_CLOSE + "\n"
    return PROMPT.format(images=block, question=question)


@dataclass
class SeedVLMConfig:
    """The SEED-token VLM recipe (stored in `seed_vlm.json`).

    - seed_tokenizer: a SEED checkpoint directory, or a name under tokenizers_visual/checkpoints.
    - hidden / layers / heads / kv_heads / intermediate: the Llama's sizes (default: the tiny LLaVA's LLM, so the
      FLOPs comparison is the same LLM reading 8 ids instead of 256 patch features).
    - resample: PIL filter used to shrink benchmark images to the SEED input side.
    """

    seed_tokenizer: str = "seed-improved"
    hidden: int = 128
    layers: int = 8
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 256
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.resample not in ("bilinear", "box", "bicubic", "nearest"):
            raise ValueError(f"resample must be bilinear, box, bicubic or nearest, got {self.resample!r}")
        if not self.seed_tokenizer:
            raise ValueError("seed_tokenizer must name a SEED checkpoint")


def _seed_path(name: str) -> Path:
    """A SEED checkpoint directory from a path or a shipped checkpoint name."""
    from .. import tokenizers_visual

    root = Path(tokenizers_visual.__file__).resolve().parent / "checkpoints"
    return checkpoints.resolve_checkpoint(name, root, "SEED tokenizer checkpoint")


def is_seed_vlm(name_or_path: str | os.PathLike) -> bool:
    """True when the bench model (a directory or a bundled name) holds the SEED-VLM marker."""
    try:
        return (resolve_checkpoint(name_or_path) / MARKER).is_file()
    except ValueError:
        return False


class SeedVLM:
    """A frozen `SeedTokenizer` in front of a `LlamaForCausalLM` that reads its ids as offset vocabulary."""

    def __init__(self, seed, lm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, config: SeedVLMConfig):
        self.seed, self.lm, self.tokenizer, self.config = seed.eval(), lm, tokenizer, config
        self.offset = tokenizer.convert_tokens_to_ids(image_token(0))
        last = tokenizer.convert_tokens_to_ids(image_token(seed.codebook_size - 1))
        # ids map to tokens by addition only if the code tokens are contiguous
        if last - self.offset != seed.codebook_size - 1:
            raise ValueError(f"tokenizer's code tokens are not contiguous ({self.offset}..{last})")

    @property
    def num_image_tokens(self) -> int:
        return self.seed.num_tokens

    @classmethod
    def build(cls, config: SeedVLMConfig | None = None, seed: int = 0, seed_tokenizer=None) -> "SeedVLM":
        """A randomly initialised LM (seeded) behind the SEED tokenizer named in `config` (or given)."""
        from ..tokenizers_visual import SeedTokenizer

        config = config or SeedVLMConfig()
        visual = seed_tokenizer or SeedTokenizer.load(_seed_path(config.seed_tokenizer))
        tokenizer = build_tokenizer(VOCABULARY)
        specials = [IMG_OPEN, IMG_CLOSE, *(image_token(i) for i in range(visual.codebook_size))]
        tokenizer.add_tokens(specials, special_tokens=True)  # whole tokens, matched before pre-tokenization
        lm_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.intermediate,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
            max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(seed)
        return cls(visual, LlamaForCausalLM(lm_config).eval(), tokenizer, config)

    # ----- inputs -----
    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any size) -> (B, N) int64 SEED ids; each is resized to the SEED input side."""
        side = self.seed.image_size
        resample = getattr(Image.Resampling, self.config.resample.upper())
        arrays = [np.asarray(im.convert("RGB").resize((side, side), resample), dtype=np.float32) / 255.0
                  for im in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S) in [0, 1]
        return self.seed.encode(pixels)

    def prompts(self, questions: Sequence[str], ids: torch.Tensor, answers: Sequence[str] | None = None) -> dict:
        """Left-padded `input_ids` / `attention_mask` (B, T); with `answers`, each row ends in `answer </s>`."""
        if ids.dim() != 2 or ids.shape[0] != len(questions):
            raise ValueError(f"ids must be (B={len(questions)}, N), got {tuple(ids.shape)}")
        texts = [format_seed_prompt(q, row.tolist()) for q, row in zip(questions, ids)]
        if answers is not None:
            texts = [f"{t} {a}</s>" for t, a in zip(texts, answers)]
        return dict(self.tokenizer(texts, return_tensors="pt", padding=True))

    # ----- generation -----
    @torch.inference_mode()
    def generate(self, questions: Sequence[str], ids: torch.Tensor, max_new_tokens: int = 3) -> tuple[list[str], dict]:
        """Greedy answers (raw decoded text) and timings: prefill_ms, decode_ms, decode_steps, kv_cache_mb,
        prompt_tokens (per sample, padding excluded)."""
        inputs = self.prompts(questions, ids)
        mask = inputs["attention_mask"]  # (B, T)
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        start = time.perf_counter()
        out = self.lm(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=position, use_cache=True,
                      logits_to_keep=1)  # only the last position's logits are read
        prefill_ms = (time.perf_counter() - start) * 1e3
        cache, token = out.cache, out.logits[:, -1].argmax(-1)  # (B,)
        generated, done = [token], token == eos
        decode_ms, steps = 0.0, 0
        while len(generated) < max_new_tokens and not bool(done.all()):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position[:, -1:] + 1
            start = time.perf_counter()
            out = self.lm(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                          cache=cache, use_cache=True)
            decode_ms += (time.perf_counter() - start) * 1e3
            steps += 1
            cache = out.cache
            token = torch.where(done, torch.full_like(token, pad), out.logits[:, -1].argmax(-1))
            generated.append(token)
            done |= token == eos
        new = torch.stack(generated, dim=1)  # (B, new)
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        timing = dict(prefill_ms=prefill_ms, decode_ms=decode_ms, decode_steps=steps, kv_cache_mb=kv_bytes / 2**20,
                      prompt_tokens=inputs["attention_mask"].sum(-1).tolist())
        return self.tokenizer.batch_decode(new, skip_special_tokens=True), timing

    # ----- persistence -----
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """`save_pretrained` of the LM (safetensors) and tokenizer, plus the `seed_vlm.json` marker."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        marker = dict(format=_FORMAT, config=asdict(self.config), seed_image_size=self.seed.image_size,
                      num_image_tokens=self.num_image_tokens, codebook_size=self.seed.codebook_size,
                      image_token_offset=self.offset, **(extra or {}))
        (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "SeedVLM":
        """Offline load of a saved SEED-VLM (a directory or a name under eval/checkpoints)."""
        from ..tokenizers_visual import SeedTokenizer

        path = resolve_checkpoint(name_or_path)
        if not (path / MARKER).is_file():
            raise ValueError(f"{path} is not a SEED-VLM checkpoint (no {MARKER})")
        marker = json.loads((path / MARKER).read_text())
        if marker.get("format") != _FORMAT:
            raise ValueError(f"{path / MARKER}: format {marker.get('format')!r}, expected {_FORMAT!r}")
        known = {f.name for f in fields(SeedVLMConfig)}
        config = SeedVLMConfig(**{k: v for k, v in marker["config"].items() if k in known})
        lm = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return cls(SeedTokenizer.load(_seed_path(config.seed_tokenizer)), lm, tokenizer, config)


class SeedVLMRunner(Runner):
    """The harness's view of a SEED-VLM: greedy answers with `SeedVLM.generate`, batched, CPU only.

    Only methods without drop stages (`baseline`) apply: in-LLM reduction acts on patch tokens, and this model reads
    8 discrete ids per image instead. The SEED encoder's time is kept per batch and reported in the row's note
    (it is outside the LLM, so outside the prefill FLOPs).
    """

    kind = "seed-vlm"

    def __init__(self, vlm: SeedVLM, checkpoint: Path | None = None):
        self.vlm = vlm
        self.dims = ModelDims.from_config(vlm.lm.config)
        super().__init__(checkpoint, self.dims.num_layers)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device: str) -> "SeedVLMRunner":
        if device != "cpu":
            raise ValueError("the SEED-VLM bench path runs on the CPU only; use --device cpu or auto")
        return cls(SeedVLM.load(name_or_path), resolve_checkpoint(name_or_path))

    def vision_tokens(self, sample) -> int:
        return self.vlm.num_image_tokens

    def unsupported(self, method) -> str | None:
        if method.stages(self.num_layers):
            return "in-LLM vision-token reduction does not apply to a SEED-token VLM (8 discrete ids)"
        return None

    def run_batch(self, samples, method, max_new_tokens: int) -> dict:
        with PeakMemory("cpu") as memory:
            start = time.perf_counter()
            ids = self.vlm.encode_images([s.images[0] for s in samples])  # (B, N)
            vision_ms = (time.perf_counter() - start) * 1e3
            texts, timing = self.vlm.generate([s.question for s in samples], ids, max_new_tokens)
        flops = [prefill_flops([n] * self.dims.num_layers, self.dims) for n in timing["prompt_tokens"]]
        return {
            "answers": [normalize_answer(t, len(s.answer.split())) for t, s in zip(texts, samples)],
            "equivalent_vision_tokens": float(ids.shape[1]), "vision_tokens": float(ids.shape[1]),
            "prefill_flops": sum(flops) / len(samples), "baseline_prefill_flops": sum(flops) / len(samples),
            "prefill_ms": timing["prefill_ms"],
            "decode_ms_per_token": timing["decode_ms"] / timing["decode_steps"] if timing["decode_steps"] else None,
            "kv_cache_mb": timing["kv_cache_mb"],
            "peak_mem_mb": memory.peak_mb,
            "vision_ms": vision_ms,
        }

    def note(self, batches: list[dict]) -> str:
        encode_ms = sum(b["vision_ms"] for b in batches) / len(batches)
        return (f"SEED-token VLM: {self.vlm.num_image_tokens} ids + <img></img>; SEED encode {encode_ms:.1f} ms/batch, "
                "not in FLOPs")
