"""Report figures: poison grids, attack x defense heatmaps, curves with optional confidence bands.

Figures are built with the object-oriented API on an Agg canvas attached inside each function, so
nothing here touches pyplot's global backend or state (safe in workers and at import time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from poison_core.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def poison_grid(clean: np.ndarray, poisoned: np.ndarray, n: int = 8, amplify: float = 10,
                orig_labels: Sequence[int] | None = None, poison_labels: Sequence[int] | None = None,
                title: str = "", class_names: Sequence[str] | None = None, total: int | None = None) -> Figure:
    """Rows: clean images, poisoned images, and the perturbation ``128 + amplify * (poisoned - clean)``.

    The third row is centred at grey: brighter pixels were pushed up, darker ones down, and a pure-grey
    tile means no change. `clean` and `poisoned` are uint8 NHWC of equal shape; the first `n` are shown.
    With labels, each column is titled ``original -> poison`` label (red when the label was changed), so a
    label flip or a backdoor's relabelling shows even where the pixels do not; `title` (the attack's name)
    heads the figure. `total` (the PoisonSet's size) makes the title say what is shown of how many:
    ``8 of 404 poisons shown``; the L-inf and relabelled counts are those of the shown ones.
    """
    clean, poisoned = np.asarray(clean), np.asarray(poisoned)
    if clean.dtype != np.uint8 or poisoned.dtype != np.uint8 or clean.ndim != 4 or clean.shape != poisoned.shape:
        raise InputError(f"poison_grid needs two uint8 NHWC arrays of equal shape, got {clean.dtype} "
                         f"{clean.shape} and {poisoned.dtype} {poisoned.shape}")
    if n < 1 or amplify <= 0:
        raise InputError(f"poison_grid: n must be >= 1 and amplify > 0, got n={n}, amplify={amplify}")
    count = min(n, len(clean))
    if count == 0:
        raise InputError("poison_grid: no images to show")
    delta = poisoned[:count].astype(np.float32) - clean[:count].astype(np.float32)
    shown = np.clip(128.0 + amplify * delta, 0, 255).astype(np.uint8)
    rows = [("clean", clean[:count]), ("poisoned", poisoned[:count]), (f"delta x{amplify:g}", shown)]
    fig = _figure(1.3 * count + 0.8, 4.2)
    axes = fig.subplots(3, count, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            image = images[c]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)
            if r == 0 and orig_labels is not None and poison_labels is not None:
                before, after = (_class_name(int(v[c]), class_names) for v in (orig_labels, poison_labels))
                changed = int(orig_labels[c]) != int(poison_labels[c])
                ax.set_title(f"{before} -> {after}" if changed else before, fontsize=9,
                             color="tab:red" if changed else "black")
    linf = int(np.abs(delta).max())
    flipped = "" if orig_labels is None or poison_labels is None else \
        f", {int(np.sum(np.asarray(orig_labels)[:count] != np.asarray(poison_labels)[:count]))} labels changed"
    shown_of = f"{count} of {total} poisons shown" if total is not None and total > count else f"{count} poisons"
    fig.suptitle(f"{title + ': ' if title else ''}{shown_of}, L-inf {linf}/255{flipped}")
    return fig


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[label]) if class_names is not None and 0 <= label < len(class_names) else str(label)


def heatmap(values: Mapping[tuple[str, str], float], title: str = "", fmt: str = ".2f",
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> Figure:
    """Attacks as rows, defenses as columns (first-seen order), each cell annotated with ``format(v, fmt)``.

    Missing (attack, defense) pairs and NaN values are left blank. `vmin`/`vmax` fix the colour scale
    (0 and 1 for rates, so equal colours mean equal rates across runs); by default it spans the values.
    """
    if not values:
        raise InputError("heatmap: no (attack, defense) values")
    attacks = list(dict.fromkeys(a for a, _ in values))
    defenses = list(dict.fromkeys(d for _, d in values))
    grid = np.full((len(attacks), len(defenses)), np.nan)
    for (attack, defense), value in values.items():
        grid[attacks.index(attack), defenses.index(defense)] = float(value)
    fig = _figure(1.2 * len(defenses) + 2.5, 0.6 * len(attacks) + 1.6)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    ax.set_xlabel("defense")
    ax.set_ylabel("attack")
    finite = grid[np.isfinite(grid)]
    low = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    high = vmax if vmax is not None else (finite.max() if finite.size else 0.0)
    middle = (low + high) / 2
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, format(grid[i, j], fmt), ha="center", va="center",
                        color="black" if grid[i, j] > middle else "white")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    return fig


def curve(xs: Sequence[float], ys_by_label: Mapping[str, Sequence[float]], xlabel: str = "", ylabel: str = "",
          title: str = "", bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Figure:
    """One line per label over `xs`; `bands` maps a label to (low, high) for a shaded interval."""
    x = np.asarray(xs, dtype=float)
    if not ys_by_label:
        raise InputError("curve: no series to plot")
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    for label, ys in ys_by_label.items():
        y = np.asarray(ys, dtype=float)
        if y.shape != x.shape:
            raise InputError(f"curve: series {label!r} has {y.size} points, xs has {x.size}")
        (line,) = ax.plot(x, y, marker="o", label=label)
        if bands and label in bands:
            low, high = (np.asarray(b, dtype=float) for b in bands[label])
            if low.shape != x.shape or high.shape != x.shape:
                raise InputError(f"curve: band of {label!r} does not match xs ({x.size} points)")
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig
