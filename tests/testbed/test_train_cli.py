"""train.cli: the `train-tiny` sub-command parses, and `--finish-*` runs a finishing stage from the first
stage's weights (validated before anything is trained)."""

from __future__ import annotations

import argparse
import json

import pytest

from mmreduce.eval.testbed.train.cli import add_subparser, main


def test_cli_hook_parses_and_sets_func():
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-tiny", "tiny-llava-shapes", "--steps", "3", "--seed", "2"])
    assert args.func.__name__ == "_run" and args.steps == 3 and args.seed == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["train-tiny", "tiny-nope"])


def test_finishing_stage_runs_as_a_second_stage_from_the_first_stages_weights(tmp_path, monkeypatch):
    """`--finish-steps` = a second command with --init-from OUT --data-offset STEPS: one log, two configs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "two"
    common = ["tiny-llava-shapes", "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--eval-samples", "2",
              "--question-first", "--extra-questions", "0", "--vision-steps", "1", "--vision-batch-size", "2",
              "--out", str(out)]
    with pytest.raises(ValueError, match="qtypes"):  # before the first stage: nothing is trained or written
        main([*common, "--finish-steps", "1", "--finish-qtypes", "count,nope"])
    with pytest.raises(ValueError, match="--finish-lr need --finish-steps"):
        main([*common, "--finish-lr", "1e-4"])
    assert not out.exists()
    assert main([*common, "--finish-steps", "1", "--finish-qtypes", "count", "--finish-lr", "1e-4"]) == 0
    log = (tmp_path / "two.train.log").read_text().splitlines()
    configs = [json.loads(line.split(" config ", 1)[1]) for line in log if " config " in line]
    assert len(configs) == 2
    first, second = configs
    assert (first["init_from"], first["vision_steps"], first["qtypes"]) == ("", 1, [])
    assert second["init_from"] == str(out) and second["data_offset"] == 2 and second["steps"] == 1
    assert (second["vision_steps"], second["qtypes"], second["lr"]) == (0, ["count"], 1e-4)
    assert json.loads((out / "train_config.json").read_text())["config"]["steps"] == 1  # the last stage's
