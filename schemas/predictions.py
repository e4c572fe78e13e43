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

import pyarrow as pa

from schemas.embeddings import META_PREFIX

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
    NOT_FINITE = "not_finite"  # NaN or infinity in a vector
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
class PredictRunReport:
    """The predict job's `run_report.json`: the embedding job's report with rows predicted in place of embedded."""

    job: str
    read: int
    predicted: int
    dead_lettered: int
    dead_lettered_by_reason: dict[str, int]
    seconds: float
    rows_per_second: float
    error_rate: float
    max_error_rate: float
    outputs: dict[str, str]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def reconciled(self) -> bool:
        """Every row read ended in exactly one place."""
        return self.read == self.predicted + self.dead_lettered

    @property
    def passed(self) -> bool:
        return self.reconciled and self.error_rate <= self.max_error_rate

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reconciled": self.reconciled, "passed": self.passed}
