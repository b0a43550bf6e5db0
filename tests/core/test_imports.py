"""`import mmreduce` stays light: the CLI loads eval, the demo and their heavy dependencies only when needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_AT_IMPORT = ("gradio", "matplotlib", "mmreduce.eval", "mmreduce.demo")


def test_import_mmreduce_does_not_import_eval_demo_gradio_or_matplotlib():
    # A fresh interpreter: this process has long imported all of them.
    code = ("import json, sys, mmreduce; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'matplotlib') "
            "or m.startswith(('mmreduce.eval', 'mmreduce.demo')))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"import mmreduce pulled in {loaded} (of {NOT_AT_IMPORT})"
