"""``mmreduce tokenizer ...``: train, encode, decode and evaluate the visual tokenizers.

Wire into a top-level parser with ``add_subparser(subparsers)``; every leaf parser sets ``func(args)``.

A user mistake (a missing or unreadable input file, a file that is not an image, a missing or wrong checkpoint, bad
``--ids``, an output path that is a folder where a file is needed or the reverse, a count below 1) raises a
``ValueError`` before any work starts, or a ``MissingFileError`` (a ``FileNotFoundError`` that is also a
``ValueError``) for an input file that does not exist, with one line that names the file or flag and how to fix it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["MissingFileError", "add_subparser", "main"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


class MissingFileError(FileNotFoundError, ValueError):
    """An input file that does not exist: a `FileNotFoundError`, and a `ValueError` like every other user error."""


def _write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def _threads(n: int) -> None:
    import torch

    _at_least(1, threads=n)
    torch.set_num_threads(n)


def _at_least(low: int, **values: int) -> None:
    """ValueError naming the flag when a count is below `low` (keyword names are the flags, `_` for `-`)."""
    for name, value in values.items():
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is a file (so no folder can be made there), or None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, a file to write that is a folder or lies under a file."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path!r} is a folder; give a file path (e.g. {str(target / 'out')!r})")
    blocker = _blocking_file(target)
    if blocker is not None:
        raise ValueError(f"cannot write {flag} {path!r}: {str(blocker)!r} is a file, not a folder; choose another path")


def _output_folder(path: str, flag: str) -> None:
    """Refuse, before any work, a folder to write that is a file or lies under a file."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {path!r} is a file, not a folder; give a new or existing folder")
    blocker = _blocking_file(target)
    if blocker is not None:
        raise ValueError(f"cannot create {flag} {path!r}: {str(blocker)!r} is a file, not a folder; "
                         "choose another path")


def _resolve_checkpoint(name: str) -> Path:
    """A folder path, or the name of a shipped checkpoint under tokenizers_visual/checkpoints/ (ValueError listing
    the shipped names otherwise)."""
    from mmreduce.checkpoints import resolve_checkpoint

    return resolve_checkpoint(name, CHECKPOINT_DIR, "tokenizer checkpoint")


def _shipped(kind: str) -> str:
    from mmreduce.checkpoints import shipped_checkpoints

    names = [n for n in shipped_checkpoints(CHECKPOINT_DIR) if n.startswith(kind)]
    return ", ".join(names) if names else "none shipped"


def _checkpoint_config(name: str, kind: str, flag: str) -> tuple[Path, dict]:
    """Resolve `name` and read its config.json; ValueError naming the folder unless it is a `kind` checkpoint
    ("seed" or "tokenunify") with config.json and model.safetensors."""
    try:
        folder = _resolve_checkpoint(name)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    where = f"{flag} {str(folder)!r}"
    label = {"seed": "SEED tokenizer", "tokenunify": "TokenUnify"}[kind]
    fix = f"pass a folder written by `mmreduce tokenizer train {kind}` or a shipped one ({_shipped(kind)})"
    missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{where} is not a {label} checkpoint: it has no {' or '.join(missing)}; {fix}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: config.json is unreadable ({error}); {fix}") from None
    is_seed = isinstance(config, dict) and "qformer" in config
    is_tokenunify = isinstance(config, dict) and "volume" in config
    if (kind == "seed" and not is_seed) or (kind == "tokenunify" and not is_tokenunify):
        other = " (it is a TokenUnify checkpoint)" if is_tokenunify else " (it is a SEED checkpoint)" if is_seed else ""
        raise ValueError(f"{where} is not a {label} checkpoint{other}; {fix}")
    return folder, config


def _load_seed(name: str, flag: str = "--checkpoint"):
    """The SeedTokenizer of a checkpoint, or a ValueError naming the folder and how to fix it."""
    from .seed.tokenizer import SeedTokenizer

    folder, _ = _checkpoint_config(name, "seed", flag)
    try:
        return SeedTokenizer.load(folder)
    except Exception as error:  # a config or weights file that does not fit the model
        reason = str(error).splitlines()[0] if str(error) else "no message"
        raise ValueError(f"{flag} {str(folder)!r} cannot be loaded as a SEED tokenizer ({type(error).__name__}: "
                         f"{reason}); pass a folder written by `mmreduce tokenizer train seed` or a shipped one "
                         f"({_shipped('seed')})") from None


def _tokenunify_folder(name: str, flag: str) -> str:
    folder, _ = _checkpoint_config(name, "tokenunify", flag)
    return str(folder)


# ----- SEED -----
def _train_seed(args: argparse.Namespace) -> None:
    from .seed.config import SeedConfig
    from .seed.evaluate import evaluate_seed
    from .seed.train import SeedTrainConfig, train_seed
    from .vq import VQConfig

    _threads(args.threads)
    _at_least(1, codebook_size=args.codebook_size, code_dim=args.code_dim, num_queries=args.num_queries,
              batch_size=args.batch_size, tokenizer_steps=args.tokenizer_steps)
    if not args.init:  # stage 1 runs only without --init
        _at_least(1, clip_steps=args.clip_steps, qformer_steps=args.qformer_steps)
    _output_folder(args.out, "--out")
    _output_file(args.log, "--log")
    _output_file(args.eval_json, "--eval-json")
    init, init_config = _checkpoint_config(args.init, "seed", "--init") if args.init else (None, None)
    vq = getattr(VQConfig, args.vq)(codebook_size=args.codebook_size, dim=args.code_dim)
    config = SeedConfig(vq=vq)
    config.qformer.num_queries = args.num_queries
    if init_config is not None:  # stage 2 reuses the CLIP and Q-Former of --init: their shapes must match
        wanted = config.to_dict()
        differ = [f"{part}.{key}={init_config.get(part, {}).get(key)!r} there, {value!r} here"
                  for part in ("clip", "qformer") for key, value in wanted[part].items()
                  if init_config.get(part, {}).get(key) != value]
        if differ:
            more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise ValueError(f"--init {str(init)!r} does not fit this run: {'; '.join(differ[:3])}{more}; pass the "
                             "options it was trained with (e.g. --num-queries) or train without --init")
    train = SeedTrainConfig(clip_steps=args.clip_steps, qformer_steps=args.qformer_steps,
                            tokenizer_steps=args.tokenizer_steps, batch_size=args.batch_size, seed=args.seed,
                            stage="tokenizer" if args.init else "all")
    tok = train_seed(config, train, args.out, init=init, log_path=args.log)
    if args.eval_json:
        _write_json(args.eval_json, {"checkpoint": str(args.out), "vq": args.vq, "train_seed": args.seed,
                                     **evaluate_seed(tok)})


def _check_images(args: argparse.Namespace) -> None:
    """What to encode: image files that exist, or --generate N, not both and not neither."""
    if args.generate < 0:
        raise ValueError(f"--generate must be >= 1 (generated images to encode), got {args.generate}")
    if args.generate and args.images:
        raise ValueError(f"give image files or --generate N, not both (got {len(args.images)} file(s) and "
                         f"--generate {args.generate})")
    if not args.generate and not args.images:
        raise ValueError("nothing to encode: give image files (e.g. `mmreduce tokenizer encode photo.png`) or "
                         "--generate N")
    for name in args.images:
        path = Path(name)
        if not path.exists():
            raise MissingFileError(f"image file {name!r} does not exist; check the path")
        if path.is_dir():
            raise ValueError(f"{name!r} is a folder, not an image file; give the image files inside it")


def _read_image(name: str, size: int):
    """One RGB image as an (S, S, 3) float array in [0, 1]; ValueError naming the file when PIL cannot read it."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(name) as image:
            rgb = image.convert("RGB").resize((size, size))
    except PermissionError:
        raise ValueError(f"cannot read image file {name!r}: permission denied; check its permissions") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{name!r} is not an image PIL can read ({reason}); give PNG, JPEG or other image "
                         "files") from None
    return np.asarray(rgb, dtype=np.float32) / 255


def _load_pixels(args: argparse.Namespace, size: int):
    import numpy as np
    import torch

    _check_images(args)
    if args.generate:
        from .seed.data import make_pairs

        pixels, captions = make_pairs(args.generate, seed=args.data_seed, size=size)
        return pixels, captions
    arrays = [_read_image(name, size) for name in args.images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), [str(p) for p in args.images]


def _encode(args: argparse.Namespace) -> None:
    _threads(args.threads)
    _check_images(args)  # before loading the checkpoint: a wrong path fails at once
    tok = _load_seed(args.checkpoint)
    pixels, names = _load_pixels(args, tok.image_size)
    ids = tok.encode(pixels)
    for name, row in zip(names, ids.tolist()):
        print(json.dumps({"input": name, "ids": row}))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--ids must be comma-separated integers, one per token (as printed by `mmreduce tokenizer "
                         f"encode`, e.g. --ids 3,17,42), got {text!r}") from None


def _decode(args: argparse.Namespace) -> None:
    import torch

    _threads(args.threads)
    values = _parse_ids(args.ids)
    _output_file(args.out, "--out")
    tok = _load_seed(args.checkpoint)
    if len(values) != tok.num_tokens:
        raise ValueError(f"--ids has {len(values)} ids, but checkpoint {args.checkpoint!r} encodes an image as "
                         f"{tok.num_tokens}; give exactly {tok.num_tokens} (one image's ids from `tokenizer encode`)")
    bad = [v for v in values if not 0 <= v < tok.codebook_size]
    if bad:
        raise ValueError(f"--ids must lie in [0, {tok.codebook_size - 1}] for checkpoint {args.checkpoint!r} "
                         f"({tok.codebook_size} codes), got {bad}")
    ids = torch.tensor([values], dtype=torch.long)
    emb = tok.decode(ids)
    gen = tok.generation_embedding(ids)
    payload = {"causal_embeddings_shape": list(emb.shape),
               "generation_embedding": [round(v, 4) for v in gen[0].tolist()]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"causal": emb, "generation": gen}, args.out)
        payload["saved"] = args.out
    print(json.dumps(payload))


def _eval_seed(args: argparse.Namespace) -> None:
    from .seed.evaluate import evaluate_seed

    _threads(args.threads)
    _at_least(1, n=args.n)
    _output_file(args.json, "--json")
    tok = _load_seed(args.checkpoint)
    ckpt = _resolve_checkpoint(args.checkpoint)
    metrics = evaluate_seed(tok, n=args.n, seed=args.data_seed)
    _write_json(args.json, {"checkpoint": str(ckpt), **metrics})


# ----- TokenUnify -----
def _train_tokenunify(args: argparse.Namespace) -> None:
    from .tokenunify.experiment import pretrain_cli

    _threads(args.threads)
    _at_least(1, steps=args.steps, batch_size=args.batch_size)
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    _output_folder(args.out, "--out")
    _output_file(args.log, "--log")
    if args.init:
        args = argparse.Namespace(**{**vars(args), "init": _tokenunify_folder(args.init, "--init")})
    pretrain_cli(args)


def _eval_tokenunify(args: argparse.Namespace) -> None:
    from .tokenunify.experiment import eval_cli

    _threads(args.threads)
    _at_least(1, finetune_steps=args.finetune_steps)
    _output_file(args.json, "--json")
    named = {}
    for pair in args.checkpoints or []:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--checkpoints takes name=folder pairs (e.g. tu=tokenunify-tu), got {pair!r}")
        named[name] = folder if args.what == "segmentation" and folder == "scratch" else \
            _tokenunify_folder(folder, f"--checkpoints {name}")
    if args.what in ("prediction", "rollout") and not named:
        raise ValueError(f"--what {args.what} needs --checkpoints name=folder ... (e.g. --checkpoints "
                         "tu=tokenunify-tu next=tokenunify-next)")
    args = argparse.Namespace(**{**vars(args), "checkpoints": [f"{n}={f}" for n, f in named.items()] or None})
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
    """The stand-alone entry point; a user error (ValueError) ends it with one line on stderr and status 2."""
    parser = argparse.ArgumentParser(prog="python -m mmreduce.tokenizers_visual")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # MissingFileError included
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
