"""SEED-VLM training: its config validation and the `train-seed-vlm` CLI hook."""

from __future__ import annotations

import argparse

import pytest

from mmreduce.eval.testbed.train_seed_vlm import SeedTrainConfig, add_subparser


def test_train_config_validation_and_cli_hook():
    with pytest.raises(ValueError, match="steps"):
        SeedTrainConfig(steps=0)
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-seed-vlm", "--steps", "3", "--batch-size", "8"])
    assert args.func.__name__ == "_run" and args.steps == 3 and args.batch_size == 8
