"""The classifier's rows, streamed from the embedding job's Parquet a record batch at a time, never all at once.

Every reader here goes through `RowSource.labeled_chunks` (one record batch of a file at a time, the rows a
classifier can learn from, each with its split by id hash; tf.Transform's analysis reads the same chunks as Arrow
through TFXIO, transforms.downstream.tft_features):
- `survey`: one pass that counts what was read, skipped and kept, and each split's labels: counts, not rows;
- `split_dataset`: a split as a tf.data pipeline of (head input, label id), transformed a chunk at a time and
  shuffled in a bounded buffer: what Keras trains and validates on;
- `split_chunks`: a split's raw inputs, label ids and row ids chunk by chunk, for the test predictions.
Memory is the model, the transform and these buffers, whatever the number of rows.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from encoders.runtime import tf
from schemas import embeddings as cols
from transforms.downstream.serving import head_inputs
from transforms.downstream.split import SPLITS, TRAIN
from transforms.downstream.tft_features import SPLIT, RowSource, SkippedRows

SHUFFLE_ROWS = 16_384  # rows a training epoch shuffles among: 90 MB of 1,408-d vectors, a few record batches' worth
# A split whose transformed rows fit in this many bytes is read and transformed at the first epoch only, then kept in
# memory (tf.data's cache): a small corpus does not re-read its files at each of a hundred epochs, a large one still
# streams. 256 MiB: about 47,000 rows of 1,408-d vectors, beside the 90 MB shuffle buffer.
CACHE_BYTES = 256 << 20


@dataclasses.dataclass
class Survey:
    """One streaming pass's counts: the rows read, those skipped and why, and each split's label counts."""

    read: int = 0
    skipped: SkippedRows = dataclasses.field(default_factory=SkippedRows)
    labels: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {split: collections.Counter() for split in SPLITS})

    def kept(self, split: str, vocabulary: Sequence[str]) -> int:
        """Rows of `split` whose label is in `vocabulary`: what the split trains, validates or tests on."""
        return sum(self.labels[split][label] for label in vocabulary)

    def outside(self, vocabulary: Sequence[str]) -> int:
        """Rows of every split whose label the vocabulary left out (--top_k_labels, rarer than the threshold)."""
        return sum(self.labels[split].total() for split in SPLITS) - sum(self.kept(split, vocabulary)
                                                                         for split in SPLITS)

    def class_counts(self, vocabulary: Sequence[str]) -> np.ndarray:
        """The training split's rows per label, in the vocabulary's order (for balanced class weights)."""
        return np.array([self.labels[TRAIN][label] for label in vocabulary], np.int64)


def survey(source: RowSource) -> Survey:
    """The counting pass: every row read once, only counts kept."""
    counts = Survey()
    for rows, skipped in source.labeled_chunks():
        counts.read += skipped.total + len(rows[cols.ID])
        counts.skipped.add(skipped)
        for split in SPLITS:
            counts.labels[split].update(rows[cols.LABEL][rows[SPLIT] == split])
    return counts


def split_chunks(source: RowSource, split: str,
                 vocabulary: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """(raw inputs, label ids, row ids) of `split`'s rows whose label is in `vocabulary`, a record batch at a time."""
    index = {label: position for position, label in enumerate(vocabulary)}
    for rows, _ in source.labeled_chunks():
        label_ids = np.array([index.get(label, -1) for label in rows[cols.LABEL]], np.int64)
        keep = (rows[SPLIT] == split) & (label_ids >= 0)
        if keep.any():
            yield {name: rows[name][keep] for name in source.raw_names}, label_ids[keep], rows[cols.ID][keep]


def fits_in_memory(rows: int, dims: dict[str, int]) -> bool:
    """Whether `rows` rows of float32 vectors of widths `dims` (and a mask each) stay within CACHE_BYTES."""
    return rows * 4 * sum(width + 1 for width in dims.values()) <= CACHE_BYTES


def split_dataset(source: RowSource, split: str, vocabulary: Sequence[str], transform_layer, batch_size: int,
                  shuffle_rows: int = 0, seed: int = 0, cache: bool = False) -> tf.data.Dataset:
    """A split as batches of (head input, label id) for Keras: read chunk by chunk at every epoch, transformed by
    the layer the serving model embeds, and (shuffle_rows > 0) shuffled among that many rows, again each epoch.
    With `cache`, the transformed chunks of the first epoch are kept in memory and the files read once (the same
    rows in the same order: the shuffle and so the training are the same)."""
    spec = {name: tf.TensorSpec([None, source.dims[name]] if name in source.dims else [None], tf.float32)
            for name in source.raw_names}

    def chunks() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for inputs, label_ids, _ in split_chunks(source, split, vocabulary):
            yield inputs, label_ids

    dataset = (tf.data.Dataset.from_generator(chunks, output_signature=(spec, tf.TensorSpec([None], tf.int64)))
               .map(lambda raw, label_ids: (head_inputs(transform_layer(raw)), label_ids)))
    if cache:
        dataset = dataset.cache()
    dataset = dataset.unbatch()
    if shuffle_rows:
        dataset = dataset.shuffle(shuffle_rows, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(2)
