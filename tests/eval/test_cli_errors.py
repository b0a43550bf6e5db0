"""Every user mistake at the command line: exit status 2, one line naming what is wrong, no traceback, no files.

The table runs `mmreduce.cli.main` in-process (an exception escaping it fails the test); one subprocess run shows
the whole command prints no traceback, and that --debug does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmreduce.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, untrained_tiny_checkpoint) -> dict[str, str]:
    """A checkpoint whose weights were cut short, and a folder that holds no model."""
    root = tmp_path_factory.mktemp("bad-checkpoints")
    truncated = Path(shutil.copytree(untrained_tiny_checkpoint, root / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    (root / "empty").mkdir()
    return {"truncated": str(truncated), "empty": str(root / "empty")}


# (id, arguments after `mmreduce`, text the one line must contain); {ckpt}, {truncated}, {empty}, {file} and {out}
# are filled in per test.
BAD_INPUTS = [
    ("non-number-ratio", ["bench", "--methods", "pdrop:keep_ratio=abc"], "keep_ratio must be a number, got 'abc'"),
    ("non-integer-layers", ["bench", "--methods", "pdrop:layers=a+b"], "layers must be one or more integers"),
    ("unknown-method", ["bench", "--methods", "nope"], "unknown method 'nope'"),
    ("unknown-field", ["bench", "--methods", "fastv:ratio=1"], "fastv has no field 'ratio'"),
    ("not-key-value", ["bench", "--methods", "fastv:layer"], "is not key=value"),
    ("field-twice", ["bench", "--methods", "fastv:layer=1,layer=2"], "layer is given twice"),
    ("ratio-out-of-range", ["bench", "--methods", "fastv:keep_ratio=2"], "FastV.keep_ratio must be in (0, 1]"),
    ("equivalent-not-number", ["bench", "--methods", "fastv:equivalent=lots"], "equivalent must be a number"),
    ("single-layer-out-of-range", ["bench", "--model", "{ckpt}", "--methods", "pdrop:layers=99"],
     "drop at layer 99 is out of range for a model with 8 decoder layers"),
    ("late-layer-out-of-range", ["bench", "--model", "{ckpt}", "--methods", "baseline", "fastv:layer=2",
                                 "pdrop:layers=2+99"], "'pdrop:layers=2+99' does not fit"),
    ("zero-samples", ["bench", "--samples", "0"], "--samples: must be an integer >= 1, got '0'"),
    ("non-integer-samples", ["bench", "--samples", "x"], "--samples: must be an integer >= 1, got 'x'"),
    ("zero-batch", ["bench", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    ("missing-model", ["bench", "--model", "/no/such/model"], "no tiny checkpoint '/no/such/model'"),
    ("not-a-model-folder", ["bench", "--model", "{empty}"], "is not a saved model (no config.json)"),
    ("truncated-weights", ["bench", "--model", "{truncated}"], "{truncated}"),
    ("unknown-dataset", ["bench", "--model", "{ckpt}", "--dataset", "nope"], "benchmark must be one of"),
    ("out-is-a-file", ["bench", "--out", "{file}"], "is a file; give a folder"),
    ("unknown-split", ["bench", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    ("unknown-command", ["nope"], "invalid choice: 'nope'"),
    ("unknown-option", ["bench", "--nope"], "unrecognized arguments: --nope"),
]


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_status_2(argv, expected, bad_checkpoints, untrained_tiny_checkpoint,
                                              tmp_path, capsys):
    names = {"ckpt": untrained_tiny_checkpoint, "file": str(tmp_path / "a-file.txt"), "out": str(tmp_path / "out"),
             **bad_checkpoints}
    (tmp_path / "a-file.txt").write_text("not a folder\n")
    argv = [part.format(**names) for part in argv]
    argv += ["--out", names["out"]] if argv[0] == "bench" and "--out" not in argv else []
    try:
        status = main(argv + ["--no-progress"] if argv[0] == "bench" and "--nope" not in argv else argv)
    except SystemExit as stop:  # argparse's own exit, after its one line
        status = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if not line.startswith("Loading weights")]  # transformers' progress bar
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert expected.format(**names) in lines[0], lines[0]
    assert "Traceback" not in lines[0]
    assert not (tmp_path / "out" / "cache").exists() or not any((tmp_path / "out" / "cache").iterdir())
    assert not (tmp_path / "out" / "results.json").exists()


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmreduce.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def test_the_command_prints_no_traceback_unless_debug_is_asked():
    quiet = _run("bench", "--methods", "pdrop:keep_ratio=abc")
    assert quiet.returncode == 2
    assert quiet.stderr.strip() == ("mmreduce bench: pdrop: keep_ratio must be a number, got 'abc' "
                                    "(spec 'pdrop:keep_ratio=abc')")
    loud = _run("--debug", "bench", "--methods", "pdrop:keep_ratio=abc")
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "keep_ratio must be a number" in loud.stderr
    by_env = _run("bench", "--methods", "pdrop:keep_ratio=abc", env={"MMREDUCE_DEBUG": "1"})
    assert "Traceback" in by_env.stderr


def test_an_internal_error_says_where_to_look(monkeypatch, capsys, tmp_path):
    import mmreduce.eval.harness as harness

    def broken(config, log=print):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(harness, "run_bench", broken)
    status = main(["bench", "--out", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip()
    assert status == 1
    assert line.startswith("mmreduce bench: internal error RuntimeError: something inside broke (at ")
    assert "test_cli_errors.py" in line and "--debug" in line
