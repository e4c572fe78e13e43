"""The predict job's steps: embeddings Parquet rows → checked rows → batches scored by the serving model.

Shaped like the embedding step (`transforms.embedding.embed`): the SavedModel is loaded once per worker process in
`DoFn.setup` through `shared.Shared`, batches come from `BatchElements`, and a batch the model rejects is scored
row by row so that only the poisonous rows are dead-lettered. Every row read ends in the predictions or in the
dead letters, and the counters say how many went where.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from schemas import embeddings as cols
from schemas import predictions as pred
from schemas.records import DeadLetter
from schemas.training import ModelInfo
from transforms.dead_letters import (
    DEAD_LETTER_TAG,
    METRICS_NAMESPACE,
    FailureRun,
    batch_or_one_by_one,
    route,
    telling_message,
)
from transforms.downstream.embeddings_input import MASK_OF, iter_tables

RECORDS_PREDICTED = pred.PredictRunReport.OUTPUT_COUNTER


@dataclasses.dataclass
class ScoringRow:
    """One input row that passed the checks: its id, where it came from, and the model's inputs for it."""

    id: str
    source: str
    inputs: dict[str, np.ndarray]


def _dead(row_id: str | None, source: str, reason: str, message: str, error_class: str = "check") -> DeadLetter:
    return DeadLetter(id=row_id, source=source, stage=pred.STAGE_PREDICT, reason=reason, error_class=error_class,
                      message=message[:2000])


def check_row(row: dict, source: str, info: ModelInfo) -> ScoringRow | DeadLetter:
    """A Parquet row → the model's inputs, or a dead letter saying why it cannot be scored."""
    row_id = row.get(cols.ID)
    if row_id is None or not str(row_id).strip():
        return _dead(None, source, pred.PredictReason.MISSING_ID, "the row has no id")
    inputs = {}
    for name, width in info.inputs.items():
        value = row.get(name)
        if value is None:
            return _dead(row_id, source, pred.PredictReason.MISSING_EMBEDDING, f"{name} is null")
        if name in MASK_OF:  # a vector
            vector = np.asarray(value, np.float32)
            if vector.shape != (width,):
                return _dead(row_id, source, pred.PredictReason.WRONG_WIDTH,
                             f"{name} has {vector.size} values, the model was trained on {width}")
            if not np.isfinite(vector).all():
                return _dead(row_id, source, pred.PredictReason.NOT_FINITE, f"{name} holds NaN or infinity")
            inputs[name] = vector
        else:  # a has_image / has_text mask
            inputs[name] = np.asarray(bool(value))
    return ScoringRow(str(row_id), source, inputs)


def read_rows(path: str, info: ModelInfo) -> Iterator[ScoringRow | DeadLetter]:
    """One embeddings file → checked rows; the source of each is `file#rowN` (1-based, as the embedding job's)."""
    number = 0
    for table in iter_tables(path, (cols.ID, *info.inputs)):
        for row in table.to_pylist():
            number += 1
            yield check_row(row, f"{path}#row{number}", info)


def prediction_table(ids: Sequence[str], probabilities: np.ndarray, labels: Sequence[str], top_k: int,
                     schema: pa.Schema, predicted_labels: Sequence[str] | None = None,
                     probability: np.ndarray | None = None) -> pa.Table:
    """Scores → a Table of the predictions schema. The top label and its probability come from the model's own
    outputs when given, else from the distribution; the top k from the distribution, most probable first."""
    probabilities = np.asarray(probabilities, np.float32)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    top_probabilities = np.take_along_axis(probabilities, order, axis=1)
    label_array = np.asarray(labels, object)
    if predicted_labels is None:
        predicted_labels = label_array[order[:, 0]]
        probability = top_probabilities[:, 0]
    k = order.shape[1]
    offsets = pa.array(np.arange(0, (len(ids) + 1) * k, k, dtype=np.int32))
    return pa.Table.from_arrays([
        pa.array(list(ids), pa.string()),
        pa.array(list(predicted_labels), pa.string()),
        pa.array(np.asarray(probability, np.float32), pa.float32()),
        pa.ListArray.from_arrays(offsets, pa.array(label_array[order].reshape(-1), pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(top_probabilities.reshape(-1), pa.float32())),
    ], schema=schema)


class PredictBatch(beam.DoFn):
    """A batch of checked rows → a predictions Table, and dead letters for rows the model fails on."""

    def __init__(self, model_dir: str, info: ModelInfo, schema: pa.Schema, top_k: int, model_cache: shared.Shared):
        self._model_dir = model_dir
        self._info = info
        self._schema = schema
        self._top_k = top_k
        self._model_cache = model_cache
        self._predicted = Metrics.counter(METRICS_NAMESPACE, RECORDS_PREDICTED)
        self._model = None
        self._failure_run: FailureRun | None = None

    def setup(self):
        from transforms.downstream.serving import LoadedClassifier  # TensorFlow only on workers that score

        self._failure_run = FailureRun()
        model_dir = self._model_dir
        self._model = self._model_cache.acquire(lambda: LoadedClassifier(model_dir), tag=model_dir)

    def _score(self, rows: Sequence[ScoringRow]) -> pa.Table:
        inputs = {name: np.stack([row.inputs[name] for row in rows]) for name in self._info.inputs}
        outputs = self._model(inputs)
        return prediction_table([row.id for row in rows], outputs["probabilities"], self._info.labels, self._top_k,
                                self._schema, [label.decode("utf-8") for label in outputs["predicted_label"]],
                                outputs["probability"])

    def process(self, batch: list[ScoringRow]) -> Iterator:
        tables, failures = batch_or_one_by_one(batch, self._score, self._failure_run)
        dead = [_dead(row.id, row.source, pred.PredictReason.MODEL_FAILED, telling_message(error),
                      type(error).__name__) for row, error in failures]
        self._predicted.inc(sum(table.num_rows for table in tables))
        yield from tables
        for letter in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


class ScoreEmbeddings(beam.PTransform):
    """embedding file paths → (prediction Tables, dead letters); `records_read` counts every row read."""

    def __init__(self, model_dir: str, info: ModelInfo, schema: pa.Schema, top_k: int, min_batch_size: int,
                 max_batch_size: int):
        super().__init__()
        self._model_dir, self._info, self._schema, self._top_k = model_dir, info, schema, top_k
        self._min_batch_size, self._max_batch_size = min(min_batch_size, max_batch_size), max_batch_size

    def expand(self, paths):
        rows, unusable = route("ReadRows", paths, read_rows, self._info, count_read=True)
        outputs = (rows
                   | "FanOut" >> beam.Reshuffle()  # one file is read by one worker; spread its rows
                   | "Batch" >> beam.BatchElements(min_batch_size=self._min_batch_size,
                                                   max_batch_size=self._max_batch_size)
                   | "Predict" >> beam.ParDo(PredictBatch(self._model_dir, self._info, self._schema, self._top_k,
                                                          shared.Shared()))
                   .with_outputs(DEAD_LETTER_TAG, main="predictions"))
        dead = (unusable, outputs[DEAD_LETTER_TAG]) | "MergeDeadLetters" >> beam.Flatten()
        return outputs.predictions, dead
