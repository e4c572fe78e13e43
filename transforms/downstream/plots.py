"""The training job's two pictures: the test-split confusion matrix and the training curves (PNG, Agg backend)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402


def _save(figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    with FileSystems.create(path) as handle:  # local or gs://
        handle.write(buffer.getvalue())


def plot_confusion_matrix(confusion: list[list[int]], labels: list[str], title: str, path: str) -> None:
    matrix = np.asarray(confusion)
    size = max(4.0, 0.6 * len(labels) + 2.5)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
             xlabel="predicted label", ylabel="true label", title=title)
    plt.setp(axes.get_xticklabels(), rotation=45, ha="right")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > threshold else "black")
    _save(figure, path)


def plot_training_curves(history: dict[str, list[float]], best_epoch: int, title: str, path: str) -> None:
    """Loss and accuracy per epoch, training and validation, with the restored (best) epoch marked."""
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                axes.plot(range(1, len(values) + 1), values, style,
                          label=("validation " if prefix else "training ") + metric)
        axes.axvline(best_epoch, color="grey", linewidth=0.8, linestyle=":", label=f"best epoch ({best_epoch})")
        axes.set(xlabel="epoch", ylabel=metric)
        axes.legend()
    figure.suptitle(title)
    _save(figure, path)


def plot_embedding_map(points: np.ndarray, labels: Sequence[str | None], coloured: Sequence[str], title: str,
                       axis_names: tuple[str, str], path: str) -> None:
    """Embedded rows as dots on a 2-D map (beam_jobs.inspect_output): the `coloured` labels each in a colour of its
    own, with a legend; every other label and the unlabeled rows in grey; all one colour when nothing is coloured."""
    figure, axes = plt.subplots(figsize=(7.5, 6))
    dot = float(np.clip(3000 / max(len(points), 1), 3, 30))  # a few thousand dots stay apart, a few dozen show
    rest = np.array([label not in coloured for label in labels], dtype=bool)
    if rest.any():
        axes.scatter(points[rest, 0], points[rest, 1], s=dot, linewidths=0,
                     color="lightgrey" if coloured else "tab:blue",
                     label=f"other labels, unlabeled ({int(rest.sum())})" if coloured else None)
    palette = plt.get_cmap("tab10" if len(coloured) <= 10 else "tab20")
    for index, label in enumerate(coloured):
        chosen = np.array([value == label for value in labels], dtype=bool)
        axes.scatter(points[chosen, 0], points[chosen, 1], s=dot, linewidths=0, color=palette(index % palette.N),
                     label=f"{label} ({int(chosen.sum())})")
    if coloured:
        axes.legend(fontsize="small", markerscale=max(1.0, 6 / np.sqrt(dot)), loc="best")
    axes.set(title=title, xlabel=axis_names[0], ylabel=axis_names[1])
    _save(figure, path)


def plot_contact_sheet(tiles: Sequence[Sequence[tuple[np.ndarray | None, str, str | None]]], title: str,
                       path: str) -> None:
    """Rows of image tiles (beam_jobs.inspect_output: a query record, then its nearest neighbours), each tile
    (pixels, caption, problem) with its caption above; a tile without pixels is grey, its problem written on it."""
    columns = max(len(row) for row in tiles)
    # Constrained layout keeps the title above the first row whatever the rows (a fixed top margin grows with them).
    figure, grid = plt.subplots(len(tiles), columns, figsize=(1.8 * columns, 2.0 * len(tiles) + 0.4), squeeze=False,
                                layout="constrained")
    for row, cells in zip(grid, tiles, strict=True):
        for axes, cell in zip(row, [*cells, *[None] * (columns - len(cells))], strict=True):
            axes.axis("off")
            if cell is None:
                continue
            pixels, caption, problem = cell
            if pixels is None:
                axes.imshow(np.full((1, 1, 3), 0.8))  # a square, scaled to the tile
                axes.text(0.5, 0.5, textwrap.fill(problem or "no image", 18), transform=axes.transAxes,
                          ha="center", va="center", fontsize=6.5, color="dimgrey")
            else:
                axes.imshow(pixels)
            axes.set_title(caption, fontsize=7)
    figure.suptitle(title)
    _save(figure, path)
