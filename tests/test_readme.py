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
