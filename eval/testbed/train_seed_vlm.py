"""Training of the SEED-token VLM `tiny-seed-shapes` (the frozen SEED tokenizer in front of a small Llama).

    mmreduce train-seed-vlm --steps 800 --out eval/checkpoints/tiny-seed-shapes
    python -m mmreduce.eval.testbed.train_seed_vlm --steps 800 ...     # the same without the console script

The model, its prompt layout and loading are in `eval/seed_vlm.py`; this module only trains it. The recipe and its
figures: docs/SEED_VLM.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..seed_vlm import SeedVLM, SeedVLMConfig
from ..tiny_models import CHECKPOINT_DIR
from .optim import WarmupCosine, WarmupCosineAdamW

__all__ = ["SeedTrainConfig", "add_subparser", "main", "train"]


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
    threads: int = 1  # one thread: on 2 cores two threads stalled on each other
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

    from ..benchmarks import load_benchmark

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
    from ..accuracy import normalize_answer

    vlm.lm.eval()
    correct = 0
    for i in range(0, len(samples), batch):
        texts, _ = vlm.generate([s.question for s in samples[i:i + batch]], ids[i:i + batch])
        correct += sum(normalize_answer(t) == s.answer for t, s in zip(texts, samples[i:i + batch]))
    return correct / len(samples)


def train(cfg: SeedTrainConfig) -> dict:
    """Train a SEED-VLM from scratch on `shapes` train (SEED frozen), save it to `cfg.out`, return a summary."""
    from tqdm.auto import tqdm

    from .extra_questions import extra_questions

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
    # Cosine down to 0; the warm-up's arithmetic is the one the shipped checkpoint was trained with (optim.py).
    schedule = WarmupCosine(cfg.lr, cfg.warmup, cfg.steps, fraction_first=True)
    optimizer = WarmupCosineAdamW(model.parameters(), schedule, cfg.weight_decay)
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
        lr = optimizer.step(loss, step)
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
    parser = argparse.ArgumentParser(prog="python -m mmreduce.eval.testbed.train_seed_vlm")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subparser(subparsers)
    argv = list(argv) if argv is not None else sys.argv[1:]
    if not argv or argv[0] != "train-seed-vlm":
        argv = ["train-seed-vlm", *argv]  # `python -m ... --steps ...` works without the sub-command
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
