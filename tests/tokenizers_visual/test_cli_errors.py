"""Every user mistake in `mmreduce tokenizer ...` is one clear line naming the file or flag, never a traceback.

Each case runs the sub-command's `func(args)` (as `mmreduce.cli` does) and checks the exception type and message.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from mmreduce.tokenizers_visual.cli import MissingFileError, add_subparser, main
from mmreduce.tokenizers_visual.seed.config import ClipConfig, QFormerConfig, SeedConfig, TokenizerHeadConfig
from mmreduce.tokenizers_visual.seed.model import SeedModel
from mmreduce.tokenizers_visual.seed.tokenizer import SeedTokenizer
from mmreduce.tokenizers_visual.vq import VQConfig

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny SEED checkpoint (4 ids per image, 16 codes) and every kind of bad input, by name."""
    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    cfg = SeedConfig(clip=ClipConfig(image_size=24, patch_size=8, width=16, depth=1, heads=2, text_width=16,
                                     text_depth=1, text_heads=2, embed_dim=8),
                     qformer=QFormerConfig(num_queries=4, width=16, depth=1, heads=2, proj_dim=8),
                     vq=VQConfig(codebook_size=16, dim=4), heads=TokenizerHeadConfig(rec_depth=1, gen_token_dim=2))
    seed = root / "seed"
    SeedTokenizer(SeedModel(cfg)).save(seed)
    tokenunify = root / "tokenunify"  # only its config is read before the refusal
    tokenunify.mkdir()
    (tokenunify / "config.json").write_text(json.dumps({"volume": [8, 32, 32], "patch": [2, 8, 8]}))
    (tokenunify / "model.safetensors").write_bytes(b"")
    (root / "empty").mkdir()
    bad_json = root / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "model.safetensors").write_bytes(b"")
    bad_weights = root / "bad-weights"
    bad_weights.mkdir()
    (bad_weights / "config.json").write_text((seed / "config.json").read_text())
    (bad_weights / "model.safetensors").write_bytes(b"not safetensors at all")
    (root / "notes.txt").write_text("a shopping list, not an image\n")
    (root / "truncated.png").write_bytes(PNG_HEADER + b"\x00\x00\x00\x0dIHDR\x00\x00")
    (root / "a-file").write_text("x")
    (root / "images").mkdir()
    return {name: str(root / name) for name in ("seed", "tokenunify", "empty", "bad-json", "bad-weights",
                                                "notes.txt", "truncated.png", "a-file", "images")} | {
        "root": str(root), "missing": str(root / "nope.png")}


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tokenizer", *argv])


ENCODE = ["encode", "--threads", "1", "--checkpoint", "{seed}"]
DECODE = ["decode", "--threads", "1", "--checkpoint", "{seed}"]
SHIPPED = r"\['seed-improved', 'seed-original', 'tokenunify-masked'"  # the shipped names are listed

# (case id, argv with {file} placeholders, exception type, regex the message must match)
CASES = [
    ("encode-missing-file", [*ENCODE, "{missing}"], MissingFileError,
     r"^image file '{missing}' does not exist; check the path$"),
    ("encode-text-file", [*ENCODE, "{notes.txt}"], ValueError,
     r"^'{notes.txt}' is not an image PIL can read \(cannot identify image file .*\); give PNG, JPEG"),
    ("encode-truncated-png", [*ENCODE, "{truncated.png}"], ValueError, r"^'{truncated.png}' is not an image PIL"),
    ("encode-folder-as-image", [*ENCODE, "{images}"], ValueError,
     r"^'{images}' is a folder, not an image file; give the image files inside it$"),
    ("encode-nothing", ENCODE, ValueError, r"^nothing to encode: give image files .* or --generate N$"),
    ("encode-files-and-generate", [*ENCODE, "{notes.txt}", "--generate", "2"], ValueError,
     r"^give image files or --generate N, not both"),
    ("encode-negative-generate", [*ENCODE, "--generate", "-1"], ValueError, r"^--generate must be >= 1"),
    ("encode-threads-0", ["encode", "--threads", "0", "--generate", "1"], ValueError,
     r"^--threads must be >= 1, got 0$"),
    ("encode-missing-checkpoint", ["encode", "--checkpoint", "/no/such/folder", "--generate", "1"], ValueError,
     r"^--checkpoint: no tokenizer checkpoint '/no/such/folder': not a folder and not one of " + SHIPPED),
    ("encode-empty-checkpoint", ["encode", "--checkpoint", "{empty}", "--generate", "1"], ValueError,
     r"^--checkpoint '{empty}' is not a SEED tokenizer checkpoint: it has no config.json or model.safetensors; "
     r"pass a folder written by `mmreduce tokenizer train seed` or a shipped one \(seed-improved, seed-original\)$"),
    ("encode-tokenunify-checkpoint", ["encode", "--checkpoint", "{tokenunify}", "--generate", "1"], ValueError,
     r"^--checkpoint '{tokenunify}' is not a SEED tokenizer checkpoint \(it is a TokenUnify checkpoint\); pass"),
    ("encode-corrupt-config", ["encode", "--checkpoint", "{bad-json}", "--generate", "1"], ValueError,
     r"^--checkpoint '{bad-json}': config.json is unreadable \(.*\); pass a folder"),
    ("encode-corrupt-weights", ["encode", "--checkpoint", "{bad-weights}", "--generate", "1"], ValueError,
     r"^--checkpoint '{bad-weights}' cannot be loaded as a SEED tokenizer \(.*\); pass a folder"),
    ("decode-not-integers", [*DECODE, "--ids", "1,x"], ValueError,
     r"^--ids must be comma-separated integers, one per token .* got '1,x'$"),
    ("decode-empty-ids", [*DECODE, "--ids", ""], ValueError, r"^--ids must be comma-separated integers"),
    ("decode-wrong-count", [*DECODE, "--ids", "1,2,3"], ValueError,
     r"^--ids has 3 ids, but checkpoint '{seed}' encodes an image as 4; give exactly 4"),
    ("decode-id-too-large", [*DECODE, "--ids", "1,2,3,16"], ValueError,
     r"^--ids must lie in \[0, 15\] for checkpoint '{seed}' \(16 codes\), got \[16\]$"),
    ("decode-negative-id", [*DECODE, "--ids=-1,2,3,4"], ValueError, r"^--ids must lie in \[0, 15\].*got \[-1\]$"),
    ("decode-out-is-folder", [*DECODE, "--ids", "1,2,3,4", "--out", "{images}"], ValueError,
     r"^--out '{images}' is a folder; give a file path"),
    ("decode-out-under-a-file", [*DECODE, "--ids", "1,2,3,4", "--out", "{a-file}/emb.pt"], ValueError,
     r"^cannot write --out '{a-file}/emb.pt': '{a-file}' is a file, not a folder; choose another path$"),
    ("decode-missing-checkpoint", ["decode", "--checkpoint", "nope", "--ids", "1"], ValueError,
     r"^--checkpoint: no tokenizer checkpoint 'nope'"),
    ("eval-seed-n-0", ["eval", "seed", "--checkpoint", "{seed}", "--n", "0", "--threads", "1"], ValueError,
     r"^--n must be >= 1, got 0$"),
    ("eval-seed-json-is-folder", ["eval", "seed", "--checkpoint", "{seed}", "--json", "{images}", "--threads", "1"],
     ValueError, r"^--json '{images}' is a folder"),
    ("eval-seed-tokenunify", ["eval", "seed", "--checkpoint", "{tokenunify}", "--threads", "1"], ValueError,
     r"is not a SEED tokenizer checkpoint \(it is a TokenUnify checkpoint\)"),
    ("train-seed-out-is-file", ["train", "seed", "--out", "{a-file}", "--threads", "1"], ValueError,
     r"^--out '{a-file}' is a file, not a folder; give a new or existing folder$"),
    ("train-seed-out-under-a-file", ["train", "seed", "--out", "{a-file}/ckpt", "--threads", "1"], ValueError,
     r"^cannot create --out '{a-file}/ckpt': '{a-file}' is a file, not a folder"),
    ("train-seed-missing-init", ["train", "seed", "--out", "{root}/new", "--init", "nope", "--threads", "1"],
     ValueError, r"^--init: no tokenizer checkpoint 'nope'"),
    ("train-seed-init-tokenunify", ["train", "seed", "--out", "{root}/new", "--init", "{tokenunify}",
                                    "--threads", "1"], ValueError,
     r"^--init '{tokenunify}' is not a SEED tokenizer checkpoint \(it is a TokenUnify checkpoint\)"),
    ("train-seed-init-other-shapes", ["train", "seed", "--out", "{root}/new", "--init", "{seed}", "--threads", "1"],
     ValueError, r"^--init '{seed}' does not fit this run: clip.image_size=24 there, 32 here; .*pass the options"),
    ("train-seed-codebook-0", ["train", "seed", "--out", "{root}/new", "--codebook-size", "0", "--threads", "1"],
     ValueError, r"^--codebook-size must be >= 1, got 0$"),
    ("train-seed-clip-steps-0", ["train", "seed", "--out", "{root}/new", "--clip-steps", "0", "--threads", "1"],
     ValueError, r"^--clip-steps must be >= 1, got 0$"),
    ("train-seed-log-is-folder", ["train", "seed", "--out", "{root}/new", "--log", "{images}", "--threads", "1"],
     ValueError, r"^--log '{images}' is a folder"),
    ("train-tokenunify-out-is-file", ["train", "tokenunify", "--out", "{a-file}", "--threads", "1"], ValueError,
     r"^--out '{a-file}' is a file, not a folder"),
    ("train-tokenunify-init-seed", ["train", "tokenunify", "--out", "{root}/tu", "--init", "{seed}",
                                    "--threads", "1"], ValueError,
     r"^--init '{seed}' is not a TokenUnify checkpoint \(it is a SEED checkpoint\); pass a folder written by "
     r"`mmreduce tokenizer train tokenunify` or a shipped one \(tokenunify-masked, tokenunify-next"),
    ("train-tokenunify-steps-0", ["train", "tokenunify", "--out", "{root}/tu", "--steps", "0", "--threads", "1"],
     ValueError, r"^--steps must be >= 1, got 0$"),
    ("train-tokenunify-lr-0", ["train", "tokenunify", "--out", "{root}/tu", "--lr", "0", "--threads", "1"],
     ValueError, r"^--lr must be > 0, got 0.0$"),
    ("eval-tokenunify-not-a-pair", ["eval", "tokenunify", "--what", "rollout", "--checkpoints", "tokenunify-tu",
                                    "--threads", "1"], ValueError,
     r"^--checkpoints takes name=folder pairs \(e.g. tu=tokenunify-tu\), got 'tokenunify-tu'$"),
    ("eval-tokenunify-no-checkpoints", ["eval", "tokenunify", "--what", "prediction", "--threads", "1"], ValueError,
     r"^--what prediction needs --checkpoints name=folder"),
    ("eval-tokenunify-missing", ["eval", "tokenunify", "--what", "rollout", "--checkpoints", "tu=/no/such",
                                 "--threads", "1"], ValueError,
     r"^--checkpoints tu: no tokenizer checkpoint '/no/such'"),
    ("eval-tokenunify-seed-folder", ["eval", "tokenunify", "--what", "segmentation", "--checkpoints", "s={seed}",
                                     "--threads", "1"], ValueError,
     r"^--checkpoints s '{seed}' is not a TokenUnify checkpoint \(it is a SEED checkpoint\)"),
    ("eval-tokenunify-finetune-0", ["eval", "tokenunify", "--what", "segmentation", "--finetune-steps", "0",
                                    "--threads", "1"], ValueError, r"^--finetune-steps must be >= 1, got 0$"),
]


def _fill(text: str, files: dict[str, str], escape: bool = False) -> str:
    return re.sub(r"\{([\w.-]+)\}", lambda m: re.escape(files[m[1]]) if escape else files[m[1]], text)


@pytest.mark.parametrize("argv, error, pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_bad_input_is_one_clear_line(files, argv, error, pattern):
    args = _args([_fill(a, files) for a in argv])
    with pytest.raises(error) as caught:
        args.func(args)
    message = str(caught.value)
    assert type(caught.value) is error  # not a bare OSError, not SystemExit
    assert re.search(_fill(pattern, files, escape=True), message), message
    assert "\n" not in message and "Traceback" not in message
    assert caught.value.__cause__ is None  # no chained library error under it
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    assert not Path(files["root"], "new").exists() and not Path(files["root"], "tu").exists()  # nothing started


def test_a_missing_file_is_both_file_not_found_and_a_user_error(files):
    args = _args(["encode", "--checkpoint", files["seed"], files["missing"]])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    with pytest.raises(ValueError):  # the CLI's user-error path catches ValueError
        args.func(args)


def test_the_stand_alone_entry_point_prints_one_line_and_exits_2(files, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["tokenizer", "encode", "--checkpoint", files["seed"], files["notes.txt"]])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an image PIL can read" in err and "Traceback" not in err


def test_good_inputs_still_work(files, tmp_path, capsys):
    """The checks refuse only mistakes: a real image, ids of the right count and range, a new --out folder."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    args = _args([*(_fill(a, files) for a in ENCODE), str(tmp_path / "red.png")])
    args.func(args)
    ids = json.loads(capsys.readouterr().out)["ids"]
    assert len(ids) == 4 and all(0 <= i < 16 for i in ids)
    out = tmp_path / "new" / "emb.pt"  # a missing parent folder is created
    args = _args([*(_fill(a, files) for a in DECODE), "--ids", ",".join(map(str, ids)), "--out", str(out)])
    args.func(args)
    assert out.is_file() and json.loads(capsys.readouterr().out)["saved"] == str(out)
