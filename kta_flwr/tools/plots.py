"""Headless matplotlib helpers shared by the benchmarks' plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def figure(size: tuple[float, float], rows: int = 1, columns: int = 1, **options: Any) -> tuple[Any, Any]:
    """A matplotlib figure and its axes (one, or a ``rows x columns`` array), headless
    (Agg); ``size`` in inches; ``options`` go to ``plt.subplots``."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt.subplots(rows, columns, figsize=size, **options)


def close_figure(fig: Any, path: Path, tight_layout: bool = True) -> None:
    """Tight layout (else a tight bounding box, e.g. for a colour bar shared by several
    axes); write ``path`` (PNG, 120 dpi) and close."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if tight_layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches=None if tight_layout else "tight")
    plt.close(fig)


def panels(count: int, size: tuple[float, float] = (3.6, 3.0), columns: int = 4) -> tuple[Any, list[Any]]:
    """A headless figure of ``count`` panels (``columns`` per row, each ``size`` inches,
    one y scale) and the flat list of their axes (unused cells hidden)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    cols = max(1, min(columns, count))
    rows = -(-max(count, 1) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False,
                             sharey=True)
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:max(count, 1)]


def save_panels(fig: Any, axes: list[Any], path: Path) -> None:
    """Grids, one legend for all panels (below them), tight layout; write ``path`` and close."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    entries: dict[str, Any] = {}
    for ax in axes:
        ax.grid(True, alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    longest = max((len(label) for label in entries), default=1)
    per_row = max(1, int(fig.get_figwidth() * 11 // (longest + 4)))  # ~11 characters an inch
    fig.legend(list(entries.values()), list(entries), loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=max(1, min(len(entries), per_row)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the panels included
    plt.close(fig)


def save_figure(fig: Any, ax: Any, path: Path, legend_beside: bool = False) -> None:
    """Grid, legend (beside the axes when asked or with many entries), tight layout;
    write ``path`` (PNG, 120 dpi) and close."""
    ax.grid(True, which="both", alpha=0.3)
    if legend_beside or len(ax.get_legend_handles_labels()[1]) > 8:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend()
    close_figure(fig, path)


def colours(count: int) -> list[Any]:
    """``count`` distinct colours (tab10, or tab20 beyond ten)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]
