"""Shared by the demo tests: nothing leaves the machine (no Gradio analytics, no hub), and a launched app.

The environment defaults are set here, before any test module of this folder imports gradio or the demo.
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url():
    """The URL of the demo app serving the bundled tiny models on a free local port (one app per test module)."""
    pytest.importorskip("gradio")
    from mmreduce.demo.app import ModelStore, build_app, launch

    app = build_app(ModelStore())
    _, url, _ = launch(app, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        app.close()
