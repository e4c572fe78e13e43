"""tf.Transform on Beam: the full-pass analysis of the classifier's inputs, and the graph that applies it.

The analysis runs over the training split only (validation and test rows must not leak into the statistics) and
yields one transform graph (`transform_fn`), written beside the model. It holds:
- the label vocabulary (`tft.compute_and_apply_vocabulary`, most frequent first, with --top_k_labels and
  --label_frequency_threshold): label string → id, the model's output order;
- the per-dimension mean and variance of the feature vector (`tft.scale_to_z_score(elementwise=True)`), so a
  1024-d image vector and a unit-norm 384-d text vector are on one scale once concatenated.
Training transforms its rows through that graph (`TFTransformOutput.transform_features_layer()`), and the serving
model embeds the same layer, so training and serving cannot scale differently.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa

# isort: off
# tf.Transform follows TensorFlow's Keras choice: import it only after encoders.runtime set TF_USE_LEGACY_KERAS.
from encoders.runtime import tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.analyzers import get_empy_vocabulary_dummy_value
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx_bsl.public import tfxio

# isort: on
from schemas import embeddings as cols
from transforms.downstream.embeddings_input import FEATURE_COLUMNS, MASK_OF, VECTOR_COLUMNS, iter_tables, vectors
from transforms.downstream.split import SPLITS, TRAIN, split_of

FEATURES = "features"  # transformed: the z-scored vector (concatenated, image first, for `both`) [B, d]
MODALITY_MASK = "modality_mask"  # transformed, `both` only: [has_image, has_text] as float32 [B, 2]
LABEL_ID = "label_id"  # transformed: the label's index in the vocabulary, -1 when it is not in it
LABEL_VOCABULARY = "label"  # the vocabulary file's name inside transform_fn/assets
SPLIT = "split"  # not a tf.Transform feature: the split of each row read in memory


def vector_columns(features: str) -> tuple[str, ...]:
    return tuple(name for name in FEATURE_COLUMNS[features] if name in VECTOR_COLUMNS)


def make_preprocessing_fn(features: str, top_k: int | None, frequency_threshold: int | None) -> Callable:
    columns = vector_columns(features)

    def preprocessing_fn(inputs: dict) -> dict:
        parts, masks = [], []
        for column in columns:
            parts.append(inputs[column])
            present = tf.reshape(inputs[MASK_OF[column]], [-1, 1])
            masks.append(tf.tile(present, [1, tf.shape(inputs[column])[1]]))
        vector = tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        mask = tf.concat(masks, axis=1) if len(masks) > 1 else masks[0]
        # A missing modality is zeros in the Parquet; after scaling it is set to 0 again, which is the column's
        # mean: the head sees "no information" there, and the mask inputs tell it why.
        outputs = {FEATURES: tft.scale_to_z_score(vector, elementwise=True) * mask}
        if len(columns) > 1:
            outputs[MODALITY_MASK] = tf.stack([inputs[MASK_OF[column]] for column in columns], axis=1)
        outputs[LABEL_ID] = tft.compute_and_apply_vocabulary(
            inputs[cols.LABEL], top_k=top_k, frequency_threshold=frequency_threshold, default_value=-1,
            vocab_filename=LABEL_VOCABULARY)
        return outputs

    return preprocessing_fn


@dataclasses.dataclass
class SkippedRows:
    """The rows of a table a classifier cannot learn from, by reason; each row counts under its first reason."""

    unlabeled: int = 0
    missing_modality: int = 0
    non_finite: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {split: [] for split in SPLITS})  # split → ids of rows with NaN / inf vectors

    @property
    def total(self) -> int:
        return self.unlabeled + self.missing_modality + sum(len(ids) for ids in self.non_finite.values())

    def add(self, other: SkippedRows) -> None:
        """Count `other`'s rows too (the rows of one more record batch)."""
        self.unlabeled += other.unlabeled
        self.missing_modality += other.missing_modality
        for split, ids in other.non_finite.items():
            self.non_finite[split] += ids

    def counts(self) -> dict[str, int]:
        """The training report's `rows` entries: skipped_non_finite in total and per split."""
        return {"skipped_unlabeled": self.unlabeled, "skipped_missing_modality": self.missing_modality,
                "skipped_non_finite": sum(len(ids) for ids in self.non_finite.values()),
                **{f"skipped_non_finite_{split}": len(self.non_finite[split]) for split in SPLITS}}


def labeled_rows(table: pa.Table, features: str, dims: dict[str, int], validation_ratio: float,
                 test_ratio: float) -> tuple[dict[str, np.ndarray], SkippedRows]:
    """A Table of embeddings → the rows a classifier can learn from, as arrays with their split, and what was
    skipped.

    Skipped: rows without a label; (single-modality features) rows without that modality, whose vector is only
    the zeros the embedding job writes for a missing modality; rows with NaN or infinity in a vector the features
    use (for `both`, a missing modality's vector too: the transform scales it before masking it). One such row
    would make the z-score statistics NaN, and with them every transformed row.
    """
    labels = table.column(cols.LABEL).to_pylist()
    keep = np.array([label is not None and label.strip() != "" for label in labels], bool)
    skipped = SkippedRows(unlabeled=int((~keep).sum()))
    columns = vector_columns(features)
    if len(columns) == 1:
        present = np.asarray(table.column(MASK_OF[columns[0]]).to_numpy(zero_copy_only=False), bool)
        skipped.missing_modality = int((keep & ~present).sum())
        keep &= present
    all_vectors = {column: vectors(table.column(column), dims[column]) for column in columns}
    finite = np.logical_and.reduce([np.isfinite(values).all(axis=1) for values in all_vectors.values()])
    ids = np.array(table.column(cols.ID).to_pylist(), object)
    for row_id in ids[keep & ~finite]:
        skipped.non_finite[split_of(row_id, validation_ratio, test_ratio)].append(row_id)
    keep &= finite
    rows = {cols.ID: ids[keep], cols.LABEL: np.array(labels, object)[keep]}
    for column in columns:
        rows[column] = all_vectors[column][keep]
        rows[MASK_OF[column]] = np.asarray(table.column(MASK_OF[column]).to_numpy(zero_copy_only=False),
                                           np.float32)[keep]
    rows[SPLIT] = np.array([split_of(row_id, validation_ratio, test_ratio) for row_id in rows[cols.ID]], object)
    return rows, skipped


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Where a classifier's rows come from and how they are judged: the files, the features, the split ratios."""

    paths: tuple[str, ...]
    features: str
    dims: dict[str, int]
    validation_ratio: float
    test_ratio: float

    @property
    def columns(self) -> tuple[str, ...]:
        return (cols.ID, cols.LABEL, *FEATURE_COLUMNS[self.features])

    @property
    def raw_names(self) -> tuple[str, ...]:
        """The transform layer's inputs: each vector column and its mask (the label is not one: as at serving)."""
        return tuple(name for column in vector_columns(self.features) for name in (column, MASK_OF[column]))

    def labeled_chunks(self) -> Iterator[tuple[dict[str, np.ndarray], SkippedRows]]:
        """`labeled_rows` of each record batch of each file, in file order: one record batch in memory at a time."""
        for path in self.paths:
            for table in iter_tables(path, self.columns):
                yield labeled_rows(table, self.features, self.dims, self.validation_ratio, self.test_ratio)


def _list_array(values: np.ndarray) -> pa.ListArray:
    """[rows, d] (or [rows]) values → a list column of d (or 1) values a row: the dense tensor layout of TFXIO."""
    width = values.shape[1] if values.ndim == 2 else 1
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * width)
    flat = pa.array(values.reshape(-1), pa.binary() if values.dtype == object else pa.float32())
    return pa.ListArray.from_arrays(offsets, flat)


def training_record_batches(path: str, source: RowSource) -> Iterator[pa.RecordBatch]:
    """One embeddings file → its labeled training-split rows, as RecordBatches of `tensor_adapter_config`'s layout."""
    for rows, _ in dataclasses.replace(source, paths=(path,)).labeled_chunks():
        train = rows[SPLIT] == TRAIN
        if train.any():
            labels = np.array([label.encode("utf-8") for label in rows[cols.LABEL][train]], object)
            columns = {name: _list_array(rows[name][train]) for name in source.raw_names}
            yield pa.record_batch({**columns, cols.LABEL: _list_array(labels)})


def tensor_adapter_config(source: RowSource) -> tfxio.TensorAdapterConfig:
    """The Arrow layout of training_record_batches, and the dense tensors TFXIO makes of it for tf.Transform."""

    def dense(name: str, dim: int | None) -> schema_pb2.TensorRepresentation:
        shape = schema_pb2.FixedShape(dim=[schema_pb2.FixedShape.Dim(size=dim)] if dim else [])
        return schema_pb2.TensorRepresentation(
            dense_tensor=schema_pb2.TensorRepresentation.DenseTensor(column_name=name, shape=shape))

    fields = [pa.field(name, pa.list_(pa.float32())) for name in source.raw_names]
    schema = pa.schema([*fields, pa.field(cols.LABEL, pa.list_(pa.binary()))])
    representations = {name: dense(name, source.dims.get(name)) for name in source.raw_names}
    representations[cols.LABEL] = dense(cols.LABEL, None)
    return tfxio.TensorAdapterConfig(schema, representations)


def analyze_training_split(source: RowSource, top_k: int | None, frequency_threshold: int | None,
                           transform_output_dir: str, pipeline_options=None, temp_dir: str | None = None) -> None:
    """Run the analysis as a Beam pipeline over the training split's record batches (TFXIO), and write
    `transform_output_dir` (transform_fn/, transformed_metadata/)."""
    with tempfile.TemporaryDirectory(prefix="hubembed-tft-") as local_temp:
        with beam.Pipeline(options=pipeline_options) as pipeline, tft_beam.Context(temp_dir=temp_dir or local_temp):
            record_batches = (pipeline
                              | "EmbeddingFiles" >> beam.Create(list(source.paths))
                              | "TrainingRows" >> beam.FlatMap(training_record_batches, source))
            transform_fn = ((record_batches, tensor_adapter_config(source))
                            | "Analyze" >> tft_beam.AnalyzeDataset(
                                make_preprocessing_fn(source.features, top_k, frequency_threshold)))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_output_dir)


def load_transform(transform_output_dir: str) -> tft.TFTransformOutput:
    return tft.TFTransformOutput(transform_output_dir)


def label_vocabulary(transform_output: tft.TFTransformOutput) -> list[str]:
    """The labels in the model's output order; empty when the limits kept none (tf.Transform then writes a
    placeholder entry so its lookup tables can initialise, which is not a label)."""
    placeholder = get_empy_vocabulary_dummy_value(tf.string)[1]
    return [label.decode("utf-8") if isinstance(label, bytes) else label
            for label in transform_output.vocabulary_by_name(LABEL_VOCABULARY) if label != placeholder]


def raw_inputs(rows: dict[str, np.ndarray], features: str, index: np.ndarray | None = None) -> dict[str, tf.Tensor]:
    """In-memory rows → the raw feature tensors the transform layer takes (no label: as at serving time)."""
    inputs = {}
    for column in vector_columns(features):
        for name in (column, MASK_OF[column]):
            values = rows[name] if index is None else rows[name][index]
            inputs[name] = tf.constant(values, tf.float32)
    return inputs
