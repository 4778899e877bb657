"""Figures people look at: contact sheets, a painting beside its neighbours, evaluation charts.

Figures are drawn on a ``matplotlib.figure.Figure`` (no pyplot state, no display needed) and saved
atomically as PNG; ``show=True`` opens the saved figure in a window for ``--show``.
"""
from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


def _short(text: str, width: int) -> str:
    text = " ".join(str(text or "").split())
    return textwrap.shorten(text, width=width, placeholder="…") if text else ""


def save_figure(fig, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG through a temp file + rename."""
    from .artifacts import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def show_png(path: str | os.PathLike[str]) -> None:
    """Open a saved PNG in a matplotlib window (``--show``); warns instead of failing headless."""
    import matplotlib

    if matplotlib.get_backend().lower() in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        log.warning("--show: no interactive matplotlib backend (%s); the figure is at %s",
                    matplotlib.get_backend(), path)
        return
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    img = mpimg.imread(str(path))
    h, w = img.shape[:2]
    plt.figure(figsize=(w / 100, h / 100))
    plt.imshow(img)
    plt.axis("off")
    plt.tight_layout(pad=0)
    plt.show()


def contact_sheet(image_paths: Sequence[str | os.PathLike[str]], captions: Sequence[str],
                  output: str | os.PathLike[str], columns: int = 6, thumb_size: int = 200,
                  title: str | None = None, show: bool = False) -> Path:
    """Draw a grid of images with a caption under each (title / artist) and save it as PNG.

    Images that cannot be decoded are drawn as a grey tile captioned with the reason, so one bad
    file never hides the rest. Decoding is bounded (``paintsim.images``).
    """
    import numpy as np
    from matplotlib.figure import Figure

    from .images import ImageDecodeError, load_rgb

    if len(image_paths) != len(captions):
        raise ValueError(f"{len(image_paths)} images but {len(captions)} captions")
    n = max(1, len(image_paths))
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    cell_w, cell_h = thumb_size / 100, thumb_size / 100 + 0.55
    fig_h = rows * cell_h + (0.4 if title else 0.0)
    fig = Figure(figsize=(columns * cell_w, fig_h))
    if title:
        fig.suptitle(title, fontsize=11)
    for i in range(n):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.set_axis_off()
        if i >= len(image_paths):
            ax.text(0.5, 0.5, "no images", ha="center", va="center", fontsize=10)
            continue
        caption = captions[i]
        try:
            img = load_rgb(image_paths[i])
            img.thumbnail((thumb_size, thumb_size))
            ax.imshow(np.asarray(img))
        except ImageDecodeError as exc:
            ax.imshow(np.full((thumb_size, thumb_size, 3), 200, dtype=np.uint8))
            caption = f"unreadable: {_short(str(exc), 60)}"
        wrapped = "\n".join(textwrap.wrap(caption, width=max(12, thumb_size // 7))[:3])
        ax.text(0.5, -0.03, wrapped, fontsize=7, ha="center", va="top", transform=ax.transAxes)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.5 / fig_h, top=1 - (0.45 if title else 0.05) / fig_h,
                        wspace=0.05, hspace=0.45)
    out = save_figure(fig, output)
    log.info("wrote contact sheet of %d images to %s", len(image_paths), out)
    if show:
        show_png(out)
    return out


# --------------------------------------------------------------------------- display & evaluation

def neighbor_grid(query_image, query_caption: str, images: Sequence, captions: Sequence[str],
                  output: str | os.PathLike[str], columns: int = 6, thumb_size: int = 200,
                  title: str | None = None, show: bool = False) -> Path:
    """The query painting (first cell, red frame) followed by its neighbours, captioned.

    ``query_image`` and each of ``images`` is a PIL image, a path, or None (drawn as a grey tile
    saying "unreadable"). The PNG is ``columns * thumb_size`` pixels wide and each row of cells
    ``thumb_size + 75`` pixels high (plus 40 for a one-line title, 15 more per further line: at most
    three), so its size is predictable.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .images import ImageDecodeError, load_rgb

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} neighbour images but {len(captions)} captions")
    cells = [(query_image, query_caption)] + list(zip(images, captions))
    columns = max(1, min(columns, len(cells)))
    rows = (len(cells) + columns - 1) // columns
    title_lines = [_short(t, 140) for t in str(title or "").split("\n")[:3] if t.strip()]
    cell_w, cell_h = thumb_size / 100, (thumb_size + 75) / 100
    title_h = 0.25 + 0.15 * len(title_lines) if title_lines else 0.0
    fig = Figure(figsize=(columns * cell_w, rows * cell_h + title_h))
    if title_lines:
        fig.suptitle("\n".join(title_lines), fontsize=10 if len(title_lines) == 1 else 9)
    total_h = rows * cell_h + title_h
    for i, (img, caption) in enumerate(cells):
        r, c = divmod(i, columns)
        left = c * cell_w / (columns * cell_w)
        bottom = (total_h - title_h - r * cell_h - thumb_size / 100 - 0.05) / total_h
        ax = fig.add_axes((left + 0.02 / columns, bottom, 0.96 / columns, (thumb_size / 100) / total_h))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        try:
            if img is None:
                raise ImageDecodeError("image missing")
            pil = img if hasattr(img, "size") and hasattr(img, "convert") else load_rgb(img)
            pil = pil.convert("RGB") if pil.mode != "RGB" else pil.copy()
            pil.thumbnail((thumb_size, thumb_size))
            arr = np.asarray(pil)
        except ImageDecodeError as exc:
            arr = np.full((thumb_size, thumb_size, 3), 200, dtype=np.uint8)
            caption = f"unreadable: {_short(str(exc), 50)}\n{caption}"
        ax.imshow(arr)
        ax.set_xlim(-0.5 - (thumb_size - arr.shape[1]) / 2, arr.shape[1] - 0.5 + (thumb_size - arr.shape[1]) / 2)
        ax.set_ylim(arr.shape[0] - 0.5 + (thumb_size - arr.shape[0]) / 2, -0.5 - (thumb_size - arr.shape[0]) / 2)
        if i == 0:
            ax.add_patch(Rectangle((-0.5, -0.5), arr.shape[1], arr.shape[0], fill=False,
                                   edgecolor="red", linewidth=3))
        lines = []
        for part in str(caption).split("\n"):
            lines.extend(textwrap.wrap(part, width=max(14, thumb_size // 6)) or [""])
        ax.text(0.5, -0.03, "\n".join(lines[:5]), transform=ax.transAxes, ha="center", va="top",
                fontsize=6.5, color="darkred" if i == 0 else "black")
    out = save_figure(fig, output)
    log.debug("wrote a neighbour figure of %d paintings to %s", len(images), out)
    if show:
        show_png(out)
    return out


def similarity_histogram(distributions: dict, output: str | os.PathLike[str],
                         title: str | None = None, xlabel: str = "cosine similarity",
                         bins: int = 60, show: bool = False) -> Path:
    """Overlaid, normalised histograms of several score distributions, each mean marked.

    Used for "similarity to the top-k neighbours" against "similarity of random pairs".
    The PNG is 800 x 450 pixels.
    """
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in distributions.items()}
    arrays = {k: v[np.isfinite(v)] for k, v in arrays.items() if v.size}
    if not arrays:
        raise ValueError("similarity_histogram needs at least one non-empty distribution")
    lo = min(float(v.min()) for v in arrays.values())
    hi = max(float(v.max()) for v in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (label, values), color in zip(arrays.items(), colors * 4):
        ax.hist(values, bins=edges, density=True, alpha=0.55, color=color,
                label=f"{label} (n={values.size:,}, mean {values.mean():.3f})")
        ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper left")
    return _finish_chart(fig, ax, title, output, show)


def _finish_chart(fig, ax, title: str | None, output: str | os.PathLike[str], show: bool) -> Path:
    """Title, margins, save (atomically) and optionally show a one-axes chart."""
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.9)
    out = save_figure(fig, output)
    if show:
        show_png(out)
    return out


def metric_bars(groups: dict[str, dict[str, float]], output: str | os.PathLike[str],
                title: str | None = None, ylabel: str = "value", show: bool = False,
                intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
                chance: dict[str, dict[str, float]] | None = None) -> Path:
    """Grouped bar chart: ``groups[group][metric] = value`` (e.g. precision@k per k). 800 x 450 px.

    ``intervals[group][metric] = (lo, hi)`` draws error bars (a 95% interval), and
    ``chance[group][metric]`` a black tick across the bar at what a random ranking scores, so a
    bar is read against both; a missing entry draws nothing for that bar.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    intervals, chance = intervals or {}, chance or {}
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    group_names = list(groups)
    metrics = list(dict.fromkeys(m for g in groups.values() for m in g))
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(group_names))
    for j, metric in enumerate(metrics):
        vals = np.array([groups[g].get(metric, np.nan) for g in group_names], dtype=np.float64)
        pos = x + (j - (len(metrics) - 1) / 2) * width
        ax.bar(pos, vals, width, label=metric)
        ci = np.array([intervals.get(g, {}).get(metric, (v, v)) for g, v in zip(group_names, vals)],
                      dtype=np.float64)
        if intervals:
            err = np.clip(np.stack([vals - ci[:, 0], ci[:, 1] - vals]), 0, None)
            ax.errorbar(pos, vals, yerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=2)
        for px, v, top in zip(pos, vals, np.fmax(vals, ci[:, 1])):
            if np.isfinite(v):  # the value above its interval, where no error bar hides it
                ax.text(px, top + 0.012, f"{v:.2f}", ha="center", va="bottom", fontsize=6.5)
        lvl = np.array([chance.get(g, {}).get(metric, np.nan) for g in group_names], dtype=np.float64)
        ok = np.isfinite(lvl)
        if ok.any():
            ax.hlines(lvl[ok], pos[ok] - width / 2, pos[ok] + width / 2, colors="black", linewidth=2)
    ax.set_xticks(x, group_names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    handles, labels = ax.get_legend_handles_labels()
    if intervals:
        handles.append(Line2D([], [], color="black", linewidth=1, marker="|", markersize=8))
        labels.append("95% interval")
    if chance:
        handles.append(Line2D([], [], color="black", linewidth=2))
        labels.append("chance (random ranking)")
    ax.legend(handles, labels, fontsize=7.5, ncols=min(6, len(labels)), loc="upper center", frameon=False,
              handlelength=1.5, columnspacing=1.0)
    return _finish_chart(fig, ax, title, output, show)
