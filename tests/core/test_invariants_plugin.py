"""The invariant matrix covers a newly registered method with no edit to the tests.

A subprocess runs tests/core/test_invariants.py with the plugin tests/support/throwaway_method.py, which registers
`throwaway_every_other`: every matrix test must be collected for it and pass. Without the plugin none is collected.
The subprocess keeps the throw-away method out of this process's registry (there is no unregister).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.core import test_invariants
from tests.support.throwaway_method import NAME

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tests.support.throwaway_method"
MATRIX = "tests/core/test_invariants.py"


def _matrix_tests_per_method() -> int:
    """Tests the matrix runs for one method: each test parametrised by `method`, once per (adapter, attention)."""
    per_model = [name for name, function in vars(test_invariants).items()
                 if name.startswith("test_") and any(mark.name == "parametrize" and mark.args[0] == "method"
                                                     for mark in getattr(function, "pytestmark", []))]
    return len(per_model) * len(test_invariants.MODELS)


def _pytest(*args: str) -> subprocess.CompletedProcess:
    # Same interpreter and environment; no cache plugin, so this run leaves the caller's --lf state alone.
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=900)


def _counts(output: str) -> dict[str, int]:
    """The final summary line's counts, e.g. {'passed': 16, 'deselected': 76}."""
    summary = output.strip().splitlines()[-1]
    return {word.rstrip("s") if word.startswith("error") else word: int(number)
            for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                           summary)}


@pytest.mark.slow
def test_a_new_method_runs_through_the_whole_matrix():
    expected = _matrix_tests_per_method()
    assert expected >= 16  # 4 invariants x 2 adapters x 2 attention implementations today

    done = _pytest("-q", "-p", PLUGIN, MATRIX, "-k", NAME)
    counts = _counts(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert counts.get("passed") == expected, done.stdout[-4000:]
    assert not counts.get("failed") and not counts.get("skipped") and not counts.get("error"), done.stdout[-4000:]

    without = _pytest("-q", "--collect-only", MATRIX, "-k", NAME)
    assert without.returncode == 5, without.stdout[-4000:]  # pytest's "no tests collected"
    assert not re.search(rf"\[[^\]]*{NAME}[^\]]*\]", without.stdout), "collected without the plugin"
