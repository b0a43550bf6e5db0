"""Matplotlib charts of a comparison (vision tokens per layer, latency) and of an uploaded schedule.

Figures are built with the object API (no pyplot state), so concurrent requests cannot draw into each other.
"""

from __future__ import annotations

from matplotlib.figure import Figure

__all__ = ["latency_chart", "schedule_chart", "tokens_chart"]

_SIZE = (10.0, 3.8)  # shown full width, one chart per tab


def _figure(size: tuple[float, float] = _SIZE) -> tuple[Figure, object]:
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _legend_outside(figure: Figure, axes, count: int) -> None:
    """The legend below the plot, never over the data."""
    if count:
        figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=min(count, 3), fontsize=8,
                      frameon=False)


def tokens_chart(results) -> Figure:
    """Vision tokens entering each decoder layer, one step line per method (measured, not planned)."""
    figure, axes = _figure()
    for result in results:
        counts = result.vision_tokens_per_layer
        axes.step(range(len(counts)), counts, where="post", marker="o", markersize=3,
                  label=f"{result.label} (mean {result.equivalent_vision_tokens:.0f})")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("vision tokens")
    axes.set_title("Vision tokens per layer")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    _legend_outside(figure, axes, len(results))
    return figure


def latency_chart(results) -> Figure:
    """Grouped bars per method: vision tower, prefill, decode per token and whole generate() time (medians of the
    timed runs), the total and prefill with their interquartile range as error bars."""
    figure, axes = _figure()
    groups = ("vision tower", "prefill", "decode / token", "total")
    width = 0.8 / max(1, len(results))
    for i, result in enumerate(results):
        values = (result.vision_ms, result.prefill_ms, result.decode_ms_per_token or 0.0, result.total_ms)
        errors = (0.0, result.prefill_iqr_ms / 2, 0.0, result.total_iqr_ms / 2)
        xs = [g + (i - (len(results) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(xs, values, width=width, yerr=errors, capsize=3, label=result.label)
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("ms")
    runs = results[0].runs if results else 0
    axes.set_title(f"Latency: median of {runs} timed runs after warm-up; bars: ± half the IQR")
    axes.grid(axis="y", alpha=0.3)
    _legend_outside(figure, axes, len(results))
    return figure


def schedule_chart(curves: list[tuple[str, list[int]]], title: str = "Planned schedule") -> Figure:
    """Share of the vision tokens each method plans to keep at every layer (`curves`: label, counts per layer)."""
    figure, axes = _figure((6.4, 3.2))
    for label, counts in curves:
        full = counts[0] if counts and counts[0] else 1
        axes.step(range(len(counts)), [100 * c / full for c in counts], where="post", marker="o", markersize=3,
                  label=label)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("% of vision tokens kept")
    axes.set_ylim(0, 105)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _legend_outside(figure, axes, len(curves))
    return figure
