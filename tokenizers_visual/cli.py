"""``mmreduce tokenizer ...``: train, encode, decode and evaluate the visual tokenizers.

Wire into a top-level parser with ``add_subparser(subparsers)``; every leaf parser sets ``func(args)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_subparser"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


def _write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _resolve_checkpoint(name: str) -> Path:
    """A folder path, or the name of a shipped checkpoint under tokenizers_visual/checkpoints/."""
    from mmreduce.checkpoints import resolve_checkpoint

    try:
        return resolve_checkpoint(name, CHECKPOINT_DIR, "tokenizer checkpoint")
    except ValueError as error:
        raise SystemExit(str(error)) from None


# ----- SEED -----
def _train_seed(args: argparse.Namespace) -> None:
    from .seed.config import SeedConfig
    from .seed.evaluate import evaluate_seed
    from .seed.train import SeedTrainConfig, train_seed
    from .vq import VQConfig

    _threads(args.threads)
    vq = getattr(VQConfig, args.vq)(codebook_size=args.codebook_size, dim=args.code_dim)
    config = SeedConfig(vq=vq)
    config.qformer.num_queries = args.num_queries
    train = SeedTrainConfig(clip_steps=args.clip_steps, qformer_steps=args.qformer_steps,
                            tokenizer_steps=args.tokenizer_steps, batch_size=args.batch_size, seed=args.seed,
                            stage="tokenizer" if args.init else "all")
    init = _resolve_checkpoint(args.init) if args.init else None
    tok = train_seed(config, train, args.out, init=init, log_path=args.log)
    if args.eval_json:
        _write_json(args.eval_json, {"checkpoint": str(args.out), "vq": args.vq, "train_seed": args.seed,
                                     **evaluate_seed(tok)})


def _load_pixels(args: argparse.Namespace, size: int):
    import numpy as np
    import torch

    if args.generate:
        from .seed.data import make_pairs

        pixels, captions = make_pairs(args.generate, seed=args.data_seed, size=size)
        return pixels, captions
    if not args.images:
        raise SystemExit("give image files or --generate N")
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32) / 255
              for p in args.images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), [str(p) for p in args.images]


def _encode(args: argparse.Namespace) -> None:
    from .seed.tokenizer import SeedTokenizer

    _threads(args.threads)
    tok = SeedTokenizer.load(_resolve_checkpoint(args.checkpoint))
    pixels, names = _load_pixels(args, tok.image_size)
    ids = tok.encode(pixels)
    for name, row in zip(names, ids.tolist()):
        print(json.dumps({"input": name, "ids": row}))


def _decode(args: argparse.Namespace) -> None:
    import torch

    from .seed.tokenizer import SeedTokenizer

    _threads(args.threads)
    tok = SeedTokenizer.load(_resolve_checkpoint(args.checkpoint))
    try:
        ids = torch.tensor([[int(v) for v in args.ids.split(",")]], dtype=torch.long)
    except ValueError as err:
        raise SystemExit(f"--ids must be comma-separated integers: {err}") from err
    emb = tok.decode(ids)
    gen = tok.generation_embedding(ids)
    payload = {"causal_embeddings_shape": list(emb.shape),
               "generation_embedding": [round(v, 4) for v in gen[0].tolist()]}
    if args.out:
        torch.save({"causal": emb, "generation": gen}, args.out)
        payload["saved"] = args.out
    print(json.dumps(payload))


def _eval_seed(args: argparse.Namespace) -> None:
    from .seed.evaluate import evaluate_seed
    from .seed.tokenizer import SeedTokenizer

    _threads(args.threads)
    ckpt = _resolve_checkpoint(args.checkpoint)
    metrics = evaluate_seed(SeedTokenizer.load(ckpt), n=args.n, seed=args.data_seed)
    _write_json(args.json, {"checkpoint": str(ckpt), **metrics})


# ----- TokenUnify -----
def _train_tokenunify(args: argparse.Namespace) -> None:
    from .tokenunify.experiment import pretrain_cli

    _threads(args.threads)
    pretrain_cli(args)


def _eval_tokenunify(args: argparse.Namespace) -> None:
    from .tokenunify.experiment import eval_cli

    _threads(args.threads)
    eval_cli(args)


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tokenizer {train seed|tokenunify, encode, decode, eval seed|tokenunify}`` to `subparsers`."""
    top = subparsers.add_parser("tokenizer", help="visual tokenizers: SEED and TokenUnify")
    sub = top.add_subparsers(dest="tokenizer_command", required=True)

    train = sub.add_parser("train", help="train a tokenizer (<= 30 min on 2 CPU cores)")
    tsub = train.add_subparsers(dest="model", required=True)
    s = tsub.add_parser("seed", help="tiny CLIP -> causal Q-Former (stage 1) -> VQ tokenizer (stage 2)")
    s.add_argument("--out", required=True, help="checkpoint folder to write")
    s.add_argument("--init", help="reuse CLIP + Q-Former of this checkpoint and train stage 2 only")
    s.add_argument("--vq", choices=("original", "improved"), default="original")
    s.add_argument("--codebook-size", type=int, default=512)
    s.add_argument("--code-dim", type=int, default=32)
    s.add_argument("--num-queries", type=int, default=8)
    s.add_argument("--clip-steps", type=int, default=1200)
    s.add_argument("--qformer-steps", type=int, default=600)
    s.add_argument("--tokenizer-steps", type=int, default=1500)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--log", help="JSON-lines training log")
    s.add_argument("--eval-json", help="evaluate on held-out pairs after training and write the metrics here")
    s.set_defaults(func=_train_seed)

    t = tsub.add_parser("tokenunify", help="pretrain a bidirectional Mamba on EM-like volumes")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--objective", choices=("masked", "next", "tokenunify"), default="tokenunify")
    t.add_argument("--steps", type=int, default=600, help="steps per stage")
    t.add_argument("--batch-size", type=int, default=32, help="volumes per step")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--init", help="start from this checkpoint (e.g. the masked stage, for the two-stage schedule)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--log", help="JSON-lines training log")
    t.set_defaults(func=_train_tokenunify)

    for name, helptext in (("encode", "images -> SEED ids"), ("decode", "SEED ids -> embeddings")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", default="seed-improved", help="folder or shipped checkpoint name")
        p.add_argument("--threads", type=int, default=2)
        if name == "encode":
            p.add_argument("images", nargs="*", help="image files (resized to the tokenizer's size)")
            p.add_argument("--generate", type=int, default=0, help="encode N generated shapes images instead")
            p.add_argument("--data-seed", type=int, default=2)
            p.set_defaults(func=_encode)
        else:
            p.add_argument("--ids", required=True, help="comma-separated ids of one image")
            p.add_argument("--out", help="save the embeddings to this .pt file")
            p.set_defaults(func=_decode)

    ev = sub.add_parser("eval", help="held-out metrics")
    esub = ev.add_subparsers(dest="model", required=True)
    e = esub.add_parser("seed", help="retrieval R@1/R@5 (continuous vs quantised), codebook usage, reconstruction")
    e.add_argument("--checkpoint", default="seed-improved")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--data-seed", type=int, default=2)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", help="write the metrics here too")
    e.set_defaults(func=_eval_seed)
    e = esub.add_parser("tokenunify", help="next-token MSE vs baselines, roll-out error, few-label segmentation")
    e.add_argument("--what", choices=("prediction", "rollout", "segmentation"), required=True)
    e.add_argument("--checkpoints", nargs="+", help="name=folder pairs (prediction/rollout) or pretraining folders")
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    e.add_argument("--finetune-steps", type=int, default=300)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", help="write the metrics here too")
    e.set_defaults(func=_eval_tokenunify)
    return top


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmreduce.tokenizers_visual")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
