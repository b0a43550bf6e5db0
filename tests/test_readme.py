"""The README's quick start really runs (and prints what it says it prints)."""

import contextlib
import io
import pathlib
import re


def test_readme_quick_start_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), {})
    printed = output.getvalue()
    assert "[[16, 16, 8, 8, 4, 4, 2, 2]]" in printed
    assert "% of the prefill FLOPs" in printed


def test_readme_training_commands_parse_and_match_the_shipped_configs():
    """The README's `mmreduce train-tiny` commands are valid CLI calls whose first stage is the shipped run's config."""
    import json
    import shlex

    from mmreduce.cli import build_parser
    from mmreduce.eval.train_tiny import _config_from_args

    root = pathlib.Path(__file__).parent.parent
    text = (root / "README.md").read_text().replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("mmreduce train-tiny ")]
    assert {shlex.split(c)[2] for c in commands} == {"tiny-llava-shapes", "tiny-llava-next-docs"}
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        documented = _config_from_args(args)
        shipped = json.loads((root / "eval" / "checkpoints" / args.model / "train_config.json").read_text())["config"]
        # The shipped train_config.json is the last stage's: for a two-stage command, the finishing stage.
        assert shipped["steps"] == (args.finish_steps or documented.steps)
        assert shipped["seed"] == documented.seed and shipped["question_first"] is True
        if args.finish_steps:
            assert shipped["data_offset"] == documented.steps and shipped["lr"] == args.finish_lr
            assert shipped["qtypes"] == args.finish_qtypes.split(",")
        else:
            assert (shipped["vision_steps"], shipped["lr"], shipped["batch_size"]) == (
                documented.vision_steps, documented.lr, documented.batch_size)
