"""The classifier half of the downstream stage: the Keras head, its training, and the test-split metrics.

The head is what users of TF Hub put under a frozen `hub.KerasLayer` feature extractor: Dense(relu) → Dropout →
Dense(softmax), here over the precomputed (and tf.Transform-scaled) embeddings; the fine-tune mode puts the same
head under trainable encoders. Metrics are computed here in NumPy so that the frozen and fine-tuned runs are
scored by exactly the same code.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from encoders.runtime import tf, tf_keras
from schemas.training import ClassMetrics, SplitMetrics


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The head's shape and how it is trained (all from flags)."""

    hidden_units: tuple[int, ...] = (128,)
    dropout: float = 0.2
    l2: float = 0.0  # L2 penalty on the Dense kernels
    learning_rate: float = 3e-3
    epochs: int = 200
    batch_size: int = 32
    patience: int = 20
    class_weights: str = "none"
    modality_dropout: float = 0.0
    seed: int = 0


def build_head(n_classes: int, config: HeadConfig, name: str = "head") -> tf_keras.Sequential:
    """Dense(units, relu) → Dropout for each hidden size, then Dense(n_classes, softmax)."""
    layers = []
    regularizer = tf_keras.regularizers.L2(config.l2) if config.l2 else None
    for index, units in enumerate(config.hidden_units):
        layers.append(tf_keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer,
                                            name=f"hidden_{index}"))
        layers.append(tf_keras.layers.Dropout(config.dropout, seed=config.seed + index, name=f"dropout_{index}"))
    layers.append(tf_keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=regularizer,
                                        name="probabilities"))
    return tf_keras.Sequential(layers, name=name)


class ModalityDropout(tf_keras.layers.Layer):
    """Training only: hide one modality of a row, with probability `rate` each, as if it were missing.

    A head trained on concatenated modalities tends to learn one classifier of the image per value of the text
    (the first Dense layer mixes them) and leans on whichever modality fits the training rows fastest. Hiding a
    modality (its columns and its has_* mask set to 0: exactly how a missing modality looks after the transform)
    makes the head learn each modality alone as well as together, and copes with rows that lack one at serving.
    `columns[k]` lists the input columns of modality k. At inference the layer is the identity; the exported
    serving model does not contain it.
    """

    def __init__(self, columns: list[list[int]], width: int, rate: float, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.columns, self.width, self.rate, self.seed = columns, width, rate, seed
        membership = np.zeros((len(columns), width), np.float32)
        for modality, indices in enumerate(columns):
            membership[modality, indices] = 1.0
        self._membership = tf.constant(membership)
        self._generator = tf.random.Generator.from_seed(seed)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        draw = self._generator.uniform([tf.shape(inputs)[0], 1])
        # One draw per row: [0, rate) hides modality 0, [rate, 2 rate) modality 1, ...; never all of them.
        lower = tf.range(len(self.columns), dtype=tf.float32)[None, :] * self.rate
        hidden = tf.cast((draw >= lower) & (draw < lower + self.rate), tf.float32)  # [B, modalities]
        return inputs * (1.0 - tf.matmul(hidden, self._membership))

    def get_config(self):
        return {**super().get_config(), "columns": self.columns, "width": self.width, "rate": self.rate,
                "seed": self.seed}


def modality_columns(dims: list[int]) -> list[list[int]]:
    """The head-input columns of each modality when the input is [vector_0, vector_1, ..., mask_0, mask_1, ...]."""
    columns, offset = [], 0
    for dim in dims:
        columns.append(list(range(offset, offset + dim)))
        offset += dim
    for modality in range(len(dims)):
        columns[modality].append(offset + modality)
    return columns


def with_modality_dropout(head: tf_keras.Model, dims: list[int], config: HeadConfig) -> tf_keras.Model:
    """The model to train: `head` behind a ModalityDropout over its input (the head itself is what is served)."""
    if len(dims) < 2 or not config.modality_dropout:
        return head
    width = sum(dims) + len(dims)
    dropout = ModalityDropout(modality_columns(dims), width, config.modality_dropout, config.seed,
                              name="modality_dropout")
    inputs = tf_keras.Input(shape=(width,), name="head_input")
    return tf_keras.Model(inputs, head(dropout(inputs)), name="training_model")


def balanced_class_weights(class_counts: np.ndarray) -> dict[int, float]:
    """n_rows / (n_classes * rows of the class), as scikit-learn's 'balanced': rare labels weigh more."""
    counts = np.asarray(class_counts, np.float64)
    total, n_classes = counts.sum(), len(counts)
    return {index: float(total / (n_classes * count)) if count else 0.0 for index, count in enumerate(counts)}


def class_weight_for(config: HeadConfig, class_counts: np.ndarray) -> dict[int, float] | None:
    """The training split's rows per class (in the label vocabulary's order) → Keras' class_weight, or None."""
    return balanced_class_weights(class_counts) if config.class_weights == "balanced" else None


def fit(model: tf_keras.Model, train: tuple | tf.data.Dataset, validation: tuple | tf.data.Dataset,
        config: HeadConfig, learning_rate: float, class_weight: dict[int, float] | None = None) -> dict:
    """Train with Adam and early stopping on validation loss (best weights restored); returns the run's summary.
    `train` and `validation` are (inputs, label ids) in memory, or datasets of batches of them (already batched and
    shuffled: transforms.downstream.training_input)."""
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    stopper = tf_keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                               restore_best_weights=True)
    if isinstance(train, tf.data.Dataset):
        history = model.fit(train, validation_data=validation, epochs=config.epochs, class_weight=class_weight,
                            callbacks=[stopper], verbose=0)
    else:
        history = model.fit(train[0], train[1], validation_data=validation, epochs=config.epochs,
                            batch_size=config.batch_size, class_weight=class_weight, callbacks=[stopper], verbose=0,
                            shuffle=True)
    losses = history.history["val_loss"]
    return {
        "epochs_run": len(losses),
        "best_epoch": int(np.argmin(losses)) + 1,
        "history": {name: [round(float(value), 6) for value in values] for name, values in history.history.items()},
    }


def set_seed(seed: int) -> None:
    """Same data, same flags, same machine → same model: seeds for Python, NumPy and TF.

    Not `tf.config.experimental.enable_op_determinism()`: it is process-wide and permanent, and makes every
    unseeded random op of any other model loaded in the process fail (e.g. a Hub module's dropout). The head's
    ops on CPU are deterministic as they are.
    """
    tf_keras.utils.set_random_seed(seed)


def split_metrics(true_ids: np.ndarray, predicted_ids: np.ndarray, labels: list[str]) -> SplitMetrics:
    """Accuracy, macro-F1 (unweighted mean over the labels) and per-label precision/recall/F1/support."""
    n = len(labels)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (true_ids, predicted_ids), 1)
    per_class = []
    for index, label in enumerate(labels):
        true_positive = confusion[index, index]
        predicted = confusion[:, index].sum()
        support = confusion[index, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassMetrics(label, round(float(precision), 6), round(float(recall), 6), round(float(f1), 6),
                                      int(support)))
    total = confusion.sum()
    return SplitMetrics(
        accuracy=round(float(np.trace(confusion) / total), 6) if total else 0.0,
        macro_f1=round(float(np.mean([metrics.f1 for metrics in per_class])), 6) if per_class else 0.0,
        per_class=per_class,
        confusion_matrix=confusion.tolist(),
    )


def format_metrics(title: str, metrics: SplitMetrics) -> str:
    """The console table: accuracy, macro-F1, then one line per label."""
    width = max([len(m.label) for m in metrics.per_class] + [len("label")])
    lines = [title, f"  accuracy  {metrics.accuracy:.4f}", f"  macro-F1  {metrics.macro_f1:.4f}",
             f"  {'label':<{width}}  precision  recall      f1  support"]
    lines += [f"  {m.label:<{width}}  {m.precision:>9.4f}  {m.recall:>6.4f}  {m.f1:>6.4f}  {m.support:>7}"
              for m in metrics.per_class]
    return "\n".join(lines)
