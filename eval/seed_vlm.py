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

    python -m mmreduce.eval.seed_vlm train-seed-vlm --steps 800 --out eval/checkpoints/tiny-seed-shapes
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tiny_models import CHECKPOINT_DIR, PROMPT, VOCABULARY, build_tokenizer

__all__ = ["IMG_CLOSE", "IMG_OPEN", "MARKER", "SeedTrainConfig", "SeedVLM", "SeedVLMConfig", "add_subparser",
           "format_seed_prompt", "image_token", "is_seed_vlm", "main", "run_seed_bench", "train"]

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
    if Path(name).is_dir():
        return Path(name)
    from .. import tokenizers_visual

    shipped = Path(tokenizers_visual.__file__).resolve().parent / "checkpoints" / name
    if shipped.is_dir():
        return shipped
    raise ValueError(f"seed_tokenizer={name!r} is neither a directory nor a shipped checkpoint ({shipped})")


def _checkpoint_path(name_or_path: str | os.PathLike) -> Path:
    candidate = Path(name_or_path)
    return candidate if candidate.is_dir() else CHECKPOINT_DIR / str(name_or_path)


def is_seed_vlm(name_or_path: str | os.PathLike) -> bool:
    """True when the bench model (a directory or a bundled name) holds the SEED-VLM marker."""
    return (_checkpoint_path(name_or_path) / MARKER).is_file()


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

        path = _checkpoint_path(name_or_path)
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


# ----------------------------------------------------------------------------------------------------------------
# bench harness path


def run_seed_bench(config, specs, log: Callable[[str], None] = print) -> list[dict]:
    """`mmreduce bench` for a SEED-VLM: baseline rows evaluated with `SeedVLM.generate` (batched); any other spec
    gives a `skipped:` row, since in-LLM reduction methods act on patch tokens the model does not have.
    Writes results.json / results.md / the plot like `harness.run_bench`; single process, no batch cache."""
    from tqdm.auto import tqdm

    from .accuracy import normalize_answer
    from .benchmarks import load_benchmark
    from .harness import RESULT_FIELDS, _summarise, plot_results, results_markdown
    from mmreduce.flops import ModelDims, prefill_flops

    if config.device == "cuda":
        raise ValueError("the SEED-VLM bench path runs on the CPU only; use --device cpu or auto")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    vlm = SeedVLM.load(config.model)
    dims = ModelDims.from_config(vlm.lm.config)
    samples = load_benchmark(config.dataset, config.split, config.samples, seed=config.seed, **config.benchmark_options)
    log(f"{config.model} (SEED-VLM) on {config.dataset}/{config.split}: {len(samples)} samples, {dims.num_layers} "
        f"layers, {vlm.num_image_tokens} SEED ids per image, batch {config.batch_size}, cpu")
    rows = []
    for spec in specs:
        if not spec.is_baseline:
            note = "skipped: in-LLM vision-token reduction does not apply to a SEED-token VLM (8 discrete ids)"
            log(f"  {spec.text}: {note}")
            rows.append({**{key: None for key in RESULT_FIELDS}, "method": spec.name, "spec": spec.text,
                         "samples": 0, "note": note})
            continue
        batches, vision_ms = [], 0.0
        for start in tqdm(range(0, len(samples), config.batch_size), desc=spec.text, disable=not config.progress,
                          leave=False):
            batch = samples[start:start + config.batch_size]
            t0 = time.perf_counter()
            ids = vlm.encode_images([s.images[0] for s in batch])  # (B, N)
            vision_ms += (time.perf_counter() - t0) * 1e3
            texts, timing = vlm.generate([s.question for s in batch], ids, config.max_new_tokens)
            answers = [normalize_answer(t) for t in texts]
            flops = [prefill_flops([n] * dims.num_layers, dims) for n in timing["prompt_tokens"]]
            batches.append({
                "start": start, "correct": [a == s.answer for a, s in zip(answers, batch)], "answers": answers,
                "equivalent_vision_tokens": float(ids.shape[1]), "vision_tokens": float(ids.shape[1]),
                "prefill_flops": sum(flops) / len(batch), "baseline_prefill_flops": sum(flops) / len(batch),
                "prefill_ms": timing["prefill_ms"],
                "decode_ms_per_token": timing["decode_ms"] / timing["decode_steps"] if timing["decode_steps"] else None,
                "kv_cache_mb": timing["kv_cache_mb"],
                "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            })
        note = (f"SEED-token VLM: {vlm.num_image_tokens} ids + <img></img>; SEED encode "
                f"{vision_ms / len(batches):.1f} ms/batch, not in FLOPs")
        row = _summarise(spec, None, batches, note=note)
        rows.append(row)
        log(f"  {spec.text}: accuracy {row['accuracy']:.3f}, {row['vision_tokens']:.0f} vision tokens, "
            f"prefill {row['prefill_flops'] / 1e6:.1f} MFLOPs")
    meta = {"config": {k: v for k, v in asdict(config).items() if k != "progress"}, "device": "cpu", "processes": 1,
            "model_kind": "seed-vlm"}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "results.md").write_text(results_markdown(rows) + "\n")
    plot_results(rows, out / "accuracy_vs_flops.png", title=f"{config.model} on {config.dataset}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# training


@dataclass
class SeedTrainConfig:
    """A SEED-VLM training run on `shapes` (every field goes into the log and `train_config.json`).

    images: distinct training images (encoded once); extra_questions: extra (question, answer) turns per image
    besides its own, each a separate training row; steps / batch_size / lr / warmup / weight_decay: AdamW with
    linear warm-up and cosine decay; eval_every / eval_samples: calibration accuracy during training.
    """

    out: str = str(CHECKPOINT_DIR / "tiny-seed-shapes")
    images: int = 12000
    extra_questions: int = 4
    steps: int = 800
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 200
    eval_samples: int = 200
    threads: int = 1  # others measured 2 threads stalling on the shared 2 cores
    max_minutes: float = 27.0
    cache: str = "runs/seed_vlm_cache"

    def __post_init__(self) -> None:
        for name in ("images", "steps", "batch_size", "eval_samples", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("extra_questions", "warmup", "weight_decay", "eval_every", "max_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def _encoded(vlm: SeedVLM, split: str, n: int, seed: int, cache: str, log) -> tuple[list, torch.Tensor]:
    """Samples of `split` and their SEED ids (n, N), the ids cached on disk so a rerun skips the encoder."""
    from tqdm.auto import tqdm

    from .benchmarks import load_benchmark

    samples = load_benchmark("shapes", split, n, seed=seed)
    file = Path(cache) / f"shapes-{split}-{n}-{seed}-{vlm.config.seed_tokenizer.replace('/', '_')}.pt"
    if file.is_file():
        log.info("ids from cache %s", file)
        return samples, torch.load(file)
    chunks = [vlm.encode_images([s.images[0] for s in samples[i:i + 256]])
              for i in tqdm(range(0, n, 256), desc=f"SEED-encode {split}", leave=False)]
    ids = torch.cat(chunks)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, file)
    return samples, ids


def _accuracy(vlm: SeedVLM, samples, ids: torch.Tensor, batch: int = 100) -> float:
    from .accuracy import normalize_answer

    vlm.lm.eval()
    correct = 0
    for i in range(0, len(samples), batch):
        texts, _ = vlm.generate([s.question for s in samples[i:i + batch]], ids[i:i + batch])
        correct += sum(normalize_answer(t) == s.answer for t, s in zip(texts, samples[i:i + batch]))
    return correct / len(samples)


def train(cfg: SeedTrainConfig) -> dict:
    """Train a SEED-VLM from scratch on `shapes` train (SEED frozen), save it to `cfg.out`, return a summary."""
    from tqdm.auto import tqdm

    from ._extra_questions import extra_questions

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("mmreduce.seed_vlm")
    log.setLevel(logging.INFO)
    log.handlers = [logging.FileHandler(out / "train.log", mode="w")]  # inside the checkpoint: it ships with it
    log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.info("config %s", json.dumps(asdict(cfg)))
    start = time.time()

    vlm = SeedVLM.build(SeedVLMConfig(), seed=cfg.seed)
    samples, ids = _encoded(vlm, "train", cfg.images, cfg.seed, cfg.cache, log)
    calib, calib_ids = _encoded(vlm, "calibration", cfg.eval_samples, cfg.seed, cfg.cache, log)
    # Rows: (image index, question, answer); the extra questions reuse the image's ids at no encoding cost.
    rows = [(i, s.question, s.answer) for i, s in enumerate(samples)]
    rows += [(i, q, a) for i, s in enumerate(samples) for q, a in extra_questions(s, cfg.extra_questions, cfg.seed)]
    distinct = len(torch.unique(ids))
    log.info("encoded %d images (%d distinct codes used), %d training rows in %.0fs", len(samples), distinct,
             len(rows), time.time() - start)

    model = vlm.lm
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    order = np.random.default_rng(cfg.seed).permutation  # a fresh shuffle of the rows per epoch
    queue: list[int] = []
    epoch = 0
    history = []
    train_start = time.time()
    bar = tqdm(range(cfg.steps), desc="train tiny-seed-shapes", dynamic_ncols=True)
    for step in bar:
        while len(queue) < cfg.batch_size:
            queue += order(len(rows)).tolist()
            epoch += 1
        pick, queue = [rows[j] for j in queue[:cfg.batch_size]], queue[cfg.batch_size:]
        batch_ids = ids[torch.tensor([r[0] for r in pick])]
        inputs = vlm.prompts([r[1] for r in pick], batch_ids, answers=[r[2] for r in pick])
        mask = inputs["attention_mask"]
        model.train()
        logits = model(input_ids=inputs["input_ids"], attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits  # (B, T, V)
        # Left padding: every row ends "... : answer </s>", so positions -3 and -2 predict answer and </s>.
        pred = logits[:, -3:-1].reshape(-1, logits.shape[-1])  # (2B, V)
        target = inputs["input_ids"][:, -2:].reshape(-1)  # (2B,)
        loss = torch.nn.functional.cross_entropy(pred, target)
        progress = max(0.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        lr = cfg.lr * (min(1.0, (step + 1) / cfg.warmup) if step < cfg.warmup else 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        answer_acc = (logits[:, -3].argmax(-1) == inputs["input_ids"][:, -2]).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{answer_acc:.2f}")
        log.info("step %d loss %.4f batch_answer_acc %.3f lr %.2e epoch %d elapsed %.0fs", step, loss.item(),
                 answer_acc, lr, epoch, time.time() - start)
        last = step == cfg.steps - 1
        over_time = bool(cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last or over_time:
            acc = _accuracy(vlm, calib, calib_ids)
            history.append(dict(step=step + 1, calibration_accuracy=acc, elapsed_s=round(time.time() - start, 1)))
            log.info("eval step %d calibration_accuracy %.3f", step + 1, acc)
            tqdm.write(f"step {step + 1}: calibration accuracy {acc:.3f} ({time.time() - start:.0f}s)")
            vlm.save(out, extra=dict(training=dict(steps_done=step + 1, calibration_accuracy=acc)))
        if over_time:
            log.info("stopping at step %d (max_minutes=%s)", step + 1, cfg.max_minutes)
            break
    summary = dict(config=asdict(cfg), wall_time_s=round(time.time() - start, 1),
                   train_loop_s=round(time.time() - train_start, 1), distinct_codes=distinct, history=history)
    (out / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done in %.0fs", time.time() - start)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add the `train-seed-vlm` sub-command to an argparse `subparsers` object (sets `func`)."""
    parser = subparsers.add_parser("train-seed-vlm", help="train the SEED-token VLM on shapes (CPU)")
    defaults = SeedTrainConfig()
    for f in fields(SeedTrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    cfg = SeedTrainConfig(**{f.name: getattr(args, f.name) for f in fields(SeedTrainConfig)})
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("wall_time_s", "history")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.seed_vlm")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subparser(subparsers)
    argv = list(argv) if argv is not None else sys.argv[1:]
    if not argv or argv[0] != "train-seed-vlm":
        argv = ["train-seed-vlm", *argv]  # `python -m mmreduce.eval.seed_vlm --steps ...` works without the verb
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
