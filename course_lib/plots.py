"""Small matplotlib helpers the notebooks share (cross-cutting: imports nothing from the steps)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["flow_diagram"]


def flow_diagram(stages: Sequence[str], notes: Sequence[str] | None = None, title: str = "",
                 vertical: bool = False, ax=None):
    """Draw boxes joined by arrows: ``stages`` in order, with an optional note under each.

    Returns the matplotlib ``Axes``. Used for the course pipeline and the GPT blueprint.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    n = len(stages)
    if n == 0:
        raise ValueError("stages must name at least one box")
    if notes is not None and len(notes) != n:
        raise ValueError(f"notes must have one entry per stage ({n}), got {len(notes)}")
    if ax is None:
        size = (4.2, 0.9 * n + 0.6) if vertical else (2.9 * n, 2.2)
        _, ax = plt.subplots(figsize=size)
    colors = plt.cm.Pastel1.colors
    for i, label in enumerate(stages):
        x, y = (0.0, -i * 1.4) if vertical else (i * 2.6, 0.0)
        box = FancyBboxPatch((x, y), 2.0, 0.9, boxstyle="round,pad=0.05", fc=colors[i % len(colors)], ec="0.3")
        ax.add_patch(box)
        ax.text(x + 1.0, y + 0.45, label, ha="center", va="center", fontsize=10, weight="bold")
        if notes is not None and notes[i]:
            if vertical:
                ax.text(x + 2.2, y + 0.45, notes[i], ha="left", va="center", fontsize=8.5, color="0.25")
            else:
                ax.text(x + 1.0, y - 0.25, notes[i], ha="center", va="top", fontsize=8.5, color="0.25")
        if i + 1 < n:
            start, end = ((x + 1.0, y), (x + 1.0, y - 0.5)) if vertical else ((x + 2.05, y + 0.45), (x + 2.55, y + 0.45))
            ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.5, color="0.3"))
    if vertical:
        ax.set_xlim(-0.2, 6.5)
        ax.set_ylim(-(n - 1) * 1.4 - 0.3, 1.1)
    else:
        ax.set_xlim(-0.2, n * 2.6)
        ax.set_ylim(-1.2, 1.1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
