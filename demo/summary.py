"""The side-by-side columns: one per method, baseline first, each with its answer, what it saved, its latency with
the spread of the timed runs, and its kept-token pictures per drop stage with their full captions."""

from __future__ import annotations

import base64
import io
from html import escape

__all__ = ["CARDS_CSS", "cards_html", "latency_notes"]

#: Above this IQR / median of the timed totals, the comparison says the latency is not to be trusted.
NOISY_SPREAD = 0.25

CARDS_CSS = """
.mmr-cards {display: grid; grid-auto-flow: column; grid-auto-columns: minmax(260px, 1fr); gap: 12px;
             overflow-x: auto; align-items: start;}
.mmr-card {border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 12px; background: #fff; color: #1f2328;
           min-width: 0;}
.mmr-card.mmr-baseline {border-color: #8250df;}
.mmr-card h4 {margin: 0 0 6px; font-size: 13px; color: #57606a; overflow-wrap: anywhere;}
.mmr-answer {font-size: 22px; font-weight: 600; margin-bottom: 6px;}
.mmr-card table {font-size: 12px; border-collapse: collapse;}
.mmr-card td {padding: 1px 6px 1px 0; vertical-align: top;}
.mmr-same {color: #1a7f37;} .mmr-diff {color: #cf222e;}
.mmr-stages {display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 8px;
              margin-top: 8px;}
.mmr-stage {margin: 0;}
.mmr-stage img {width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #eaeef2;}
.mmr-stage figcaption {font-size: 12px; color: #57606a; white-space: normal; overflow-wrap: anywhere;}
.mmr-notes {margin: 0 0 8px; padding: 6px 10px; border-left: 4px solid #bf8700; background: #fff8c5;
            color: #1f2328; font-size: 13px;}
.mmr-notes li {margin: 2px 0;}
"""


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _with_spread(median: float, iqr: float, runs: int) -> str:
    return f"{median:.1f} ms ± {iqr / 2:.1f} (IQR {iqr:.1f}, {runs} runs)" if iqr else f"{median:.1f} ms ({runs} runs)"


def _png(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def latency_notes(results) -> list[str]:
    """Warnings a reader needs before trusting the latency numbers (empty when there is nothing to say)."""
    if not results:
        return []
    notes = []
    runs = results[0].runs
    if runs < 4:
        notes.append(f"only {runs} timed run(s): no spread can be given; use at least 4 (default 7) to trust "
                     "the latency")
    noisy = [r for r in results if r.spread > NOISY_SPREAD]
    for result in noisy:
        notes.append(f"{result.label}: the timed totals spread by {result.spread:.0%} of their median (IQR "
                     f"{result.total_iqr_ms:.1f} ms): the machine is busy; rerun or raise the timed runs")
    baseline = results[0]
    for result in results[1:]:
        if result.total_ms >= baseline.total_ms:
            notes.append(f"{result.label} is not faster than the baseline here ({result.total_ms:.1f} vs "
                         f"{baseline.total_ms:.1f} ms total): at this model size the tokens it saves cost less "
                         "than its own work")
    return notes


def cards_html(results, question: str = "", overlays: dict[str, list[tuple[object, str]]] | None = None,
               notes: list[str] | None = None, overlay_note: str = "") -> str:
    """HTML for the results (the first is the baseline the others are compared with); `overlays` maps a label to
    its (picture, caption) per drop stage, shown in that method's column."""
    if not results:
        return "<div class='mmr-cards'></div>"
    overlays = overlays or {}
    baseline = results[0]
    cards = []
    for index, result in enumerate(results):
        counts = result.vision_tokens_per_layer
        agreement = ""
        if index:
            same = result.answer == baseline.answer
            agreement = (f"<div class='{'mmr-same' if same else 'mmr-diff'}'>"
                         f"{'same answer as' if same else 'differs from'} baseline</div>")
        rows = [
            ("vision tokens", f"{counts[0]} → {counts[-1]} (mean {result.equivalent_vision_tokens:.1f})"),
            ("prefill FLOPs", f"{result.prefill_flops / 1e9:.3f} G ({result.flops_ratio:.0%})"),
            ("vision tower", _ms(result.vision_ms)),
            ("prefill", _with_spread(result.prefill_ms, result.prefill_iqr_ms, result.runs)),
            ("decode", f"{_ms(result.decode_ms_per_token)} / token"),
            ("total", _with_spread(result.total_ms, result.total_iqr_ms, result.runs)),
        ]
        table = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
        stages = "".join(f"<figure class='mmr-stage'><img src='{_png(picture)}' alt='{escape(caption, quote=True)}'>"
                         f"<figcaption>{escape(caption)}</figcaption></figure>"
                         for picture, caption in overlays.get(result.label, []))
        if index and not stages and result.kept_positions and overlay_note:
            stages = f"<p class='mmr-stage'>{escape(overlay_note)}</p>"
        kind = "mmr-baseline" if index == 0 else "mmr-method"
        cards.append(
            f"<div class='mmr-card {kind}' data-label='{escape(result.label, quote=True)}'>"
            f"<h4>{escape(result.label)}</h4><div class='mmr-answer'>{escape(result.answer) or '(empty)'}</div>"
            f"{agreement}<table>{table}</table><div class='mmr-stages'>{stages}</div></div>"
        )
    header = f"<p><b>Q:</b> {escape(question)}</p>" if question else ""
    warning = ("<ul class='mmr-notes'>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>") if notes else ""
    return f"{header}{warning}<div class='mmr-cards'>{''.join(cards)}</div>"
