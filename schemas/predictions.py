"""The predictions Parquet written by `beam_jobs.predict`, and the reasons a row can be dead-lettered there.

One row per scored input row:
  id: string (not null)
  predicted_label: string (not null)       the most probable label
  probability: float32 (not null)          its probability
  top_k_labels: list<string>               the k most probable labels, most probable first
  top_k_probabilities: list<float32>       their probabilities, in the same order
Key-value metadata: `hubembed.model` (the serving model's folder) and `hubembed.model_info` (its model_info.json).
The training job writes its in-process test-split predictions (`test_predictions.parquet`) in this schema too,
so the two can be compared row by row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import pyarrow as pa

from schemas.embeddings import META_PREFIX
from schemas.report import RunReport

ID = "id"
PREDICTED_LABEL = "predicted_label"
PROBABILITY = "probability"
TOP_K_LABELS = "top_k_labels"
TOP_K_PROBABILITIES = "top_k_probabilities"

META_MODEL = META_PREFIX + "model"  # the serving model's folder
META_MODEL_INFO = META_PREFIX + "model_info"  # JSON: the model's model_info.json

STAGE_PREDICT = "predict"  # the dead-letter `stage` of rows the predict job could not score


class PredictReason:
    """Stable codes for the predict job's run report and dead-letter `reason` column."""

    MISSING_ID = "missing_id"
    MISSING_EMBEDDING = "missing_embedding"  # a null vector in a column the model takes
    WRONG_WIDTH = "wrong_width"  # a vector whose length is not what the model was trained on
    NOT_FINITE = "not_finite"  # NaN or infinity in a vector the model takes (a missing modality's too)
    MODEL_FAILED = "model_failed"


def predictions_schema(metadata: Mapping[str, str] | None = None) -> pa.Schema:
    return pa.schema([
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PREDICTED_LABEL, pa.string(), nullable=False),
        pa.field(PROBABILITY, pa.float32(), nullable=False),
        pa.field(TOP_K_LABELS, pa.list_(pa.string()), nullable=False),
        pa.field(TOP_K_PROBABILITIES, pa.list_(pa.float32()), nullable=False),
    ], metadata=dict(metadata or {}))


@dataclasses.dataclass
class PredictRunReport(RunReport):
    """The predict job's `run_report.json`: the embedding job's report with rows predicted in place of embedded."""

    OUTPUT_NAME: ClassVar[str] = "predicted"
    OUTPUT_COUNTER: ClassVar[str] = "records_predicted"

    predicted: int = 0
