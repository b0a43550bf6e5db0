"""The Gradio demo: baseline and reduced model side by side (`mmreduce demo`, `python -m mmreduce.demo`).

Gradio is imported only when the UI is built, so the pure functions (`run_demo`, the charts, the overlays) and
the CLI's argument parsing work without it.
"""

__all__ = ["app", "cli"]
