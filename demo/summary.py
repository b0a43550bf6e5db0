"""The side-by-side cards: one per method, baseline first, with the answer and what the method saved."""

from __future__ import annotations

from html import escape

__all__ = ["CARDS_CSS", "cards_html"]

CARDS_CSS = """
.mmr-cards {display: flex; flex-wrap: wrap; gap: 10px;}
.mmr-card {flex: 1 1 170px; border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 12px; background: #fff;
           color: #1f2328;}
.mmr-card.mmr-baseline {border-color: #8250df;}
.mmr-card h4 {margin: 0 0 6px; font-size: 13px; color: #57606a;}
.mmr-answer {font-size: 22px; font-weight: 600; margin-bottom: 6px;}
.mmr-card table {font-size: 12px; border-collapse: collapse;}
.mmr-card td {padding: 1px 6px 1px 0;}
.mmr-same {color: #1a7f37;} .mmr-diff {color: #cf222e;}
"""


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def cards_html(results, question: str = "") -> str:
    """HTML for the results (the first is the baseline the others are compared with)."""
    if not results:
        return "<div class='mmr-cards'></div>"
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
            ("prefill", _ms(result.prefill_ms)),
            ("decode", f"{_ms(result.decode_ms_per_token)} / token"),
            ("total", _ms(result.total_ms)),
        ]
        table = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
        kind = "mmr-baseline" if index == 0 else "mmr-method"
        cards.append(
            f"<div class='mmr-card {kind}' data-label='{escape(result.label, quote=True)}'>"
            f"<h4>{escape(result.label)}</h4><div class='mmr-answer'>{escape(result.answer) or '(empty)'}</div>"
            f"{agreement}<table>{table}</table></div>"
        )
    header = f"<p><b>Q:</b> {escape(question)}</p>" if question else ""
    return f"{header}<div class='mmr-cards'>{''.join(cards)}</div>"
