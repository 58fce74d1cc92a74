"""Figures a person reads to judge a noisy-label run (matplotlib, no display needed): the loss histogram
with the fitted two-component mixture (the MixNN paper's Fig. 4), labelled confusion matrices, and a grid of
the training images most likely mislabelled (as cleanlab users expect)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from index.gmm import CleanFit  # noqa: E402


def gmm_figure(fit: CleanFit, truly_noisy: np.ndarray | None = None, epoch: int | None = None):
    """Histogram of the min-max normalised losses with the two weighted Gaussian components; with the true
    labels known, the truly clean and truly mislabelled samples are stacked in two colours."""
    x = fit.normalised
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    bins = np.linspace(0, 1, 51)
    if truly_noisy is not None:
        ax.hist([x[~truly_noisy], x[truly_noisy]], bins=bins, stacked=True, color=["tab:green", "tab:red"],
                alpha=0.6, label=["truly clean", "truly mislabelled"])
    else:
        ax.hist(x, bins=bins, color="tab:gray", alpha=0.6, label="samples")
    grid = np.linspace(0, 1, 400)
    scale = len(x) * (bins[1] - bins[0])
    for mean, std, weight, name, colour in zip(fit.means, fit.stds, fit.weights, ("clean", "noisy"),
                                               ("darkgreen", "darkred")):
        std = max(std, 1e-3)
        pdf = weight * np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
        ax.plot(grid, pdf * scale, color=colour, lw=2, label=f"GMM {name}: mean {mean:.2f}, weight {weight:.2f}")
    ax.set_xlabel(f"per-sample {'log-' if fit.scale == 'log' else ''}loss vs given label (min-max normalised)")
    ax.set_ylabel("samples")
    ax.set_title("loss distribution and the fitted mixture" + (f" (epoch {epoch})" if epoch is not None else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def confusion_figure(rows: np.ndarray, cols: np.ndarray, class_names: list[str], row_title: str, col_title: str):
    """Confusion matrix with class names; colour = share of the row, numbers = counts (up to 20 classes)."""
    c = len(class_names)
    matrix = np.zeros((c, c), dtype=np.int64)
    np.add.at(matrix, (rows, cols), 1)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * c + 2), 14)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(c) if c <= 50 else np.arange(0, c, max(c // 25, 1))
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=7)
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    ax.set_title(f"{row_title} vs {col_title} ({int(matrix.sum())} samples)")
    fig.tight_layout()
    return fig


def label_issues_figure(images: list, captions: list[str], columns: int = 8):
    """A grid of images, each captioned (given -> corrected (probability))."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        array = np.asarray(image)
        ax.imshow(array, cmap="gray" if array.ndim == 2 else None)
        ax.set_title(caption, fontsize=6)
    fig.suptitle("training images most likely mislabelled: given -> corrected (its probability)", fontsize=9)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Write a figure to a PNG and release it."""
    from data.atomic import atomic_write

    atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
