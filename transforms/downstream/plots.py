"""The training job's two pictures: the test-split confusion matrix and the training curves (PNG, Agg backend)."""

from __future__ import annotations

import io

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
