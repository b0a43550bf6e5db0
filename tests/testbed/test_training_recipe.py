"""The documented training commands (docs/TRAINING.md) are valid CLI calls whose stages are the shipped
checkpoints' recipes."""

import pathlib


def test_documented_training_commands_parse_and_match_the_shipped_configs():
    """docs/TRAINING.md's `mmreduce train-tiny` commands are valid CLI calls whose first stage is the shipped run's
    config."""
    import json
    import shlex
    from dataclasses import asdict, fields

    from mmreduce.cli import build_parser
    from mmreduce.eval.testbed.train.cli import _config_from_args, _items
    from mmreduce.eval.testbed.train.config import TrainConfig, finishing_stage

    root = pathlib.Path(__file__).parents[2]
    text = (root / "docs" / "TRAINING.md").read_text().replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("mmreduce train-tiny ")]
    assert {shlex.split(c)[2] for c in commands} == {"tiny-llava-shapes", "tiny-llava-next-docs",
                                                     "tiny-internvl-docs", "tiny-llava-video"}
    # Where a run wrote its files (`out`, and the finishing stage's `init_from`) and the --max-minutes guard are not
    # part of the recipe. An option added after a run is at its default there.
    defaults = {f.name: f.default for f in fields(TrainConfig)}

    def recipe(config: dict) -> dict:
        return {k: v for k, v in {**defaults, **config}.items() if k not in ("out", "init_from", "max_minutes")}

    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        documented = _config_from_args(args)
        # The shipped train_config.json is the last stage's; a two-stage command's first stage is its
        # `previous_stage`.
        stages = [documented]
        if args.finish_steps:
            stages.append(finishing_stage(documented, args.finish_steps, tuple(_items(args.finish_qtypes)),
                                          args.finish_lr, args.finish_warmup))
        record = json.loads((root / "eval" / "checkpoints" / args.model / "train_config.json").read_text())
        shipped = [record["config"]]
        while len(shipped) < len(stages):
            record = record["previous_stage"]
            shipped.insert(0, record["config"])
        for stage, config in zip(stages, shipped):
            assert recipe(config) == recipe(json.loads(json.dumps(asdict(stage)))), (args.model, stage.steps)
