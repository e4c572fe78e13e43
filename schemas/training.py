"""The training report (`training_report.json` beside the model) and the serving model's description.

The frozen-feature run and the fine-tuned run write the same report, so they compare side by side:

  job, mode ("frozen" | "fine_tune"), features ("image" | "text" | "both"), labels (the label vocabulary, in the
  model's output order), rows (how many rows were read, skipped and why, and fell in each split; skipped_non_finite
  and skipped_non_finite_<split> count rows with NaN or infinity in a vector the features use), metrics on the
  test split (accuracy, macro_f1, per_class precision/recall/f1/support, confusion_matrix[true][predicted]),
  training (epochs run, the best epoch, the Keras history per epoch), hyperparameters, seconds, outputs
  (where the model, transform graph, pictures and test predictions are) and the encoder metadata.
"""

from __future__ import annotations

import dataclasses

MODES = ("frozen", "fine_tune")
FEATURES = ("image", "text", "both")
CLASS_WEIGHT_MODES = ("none", "balanced")
MODEL_INFO_NAME = "model_info.json"  # in the serving model's assets.extra/
SERVING_SIGNATURE = "serving_default"


@dataclasses.dataclass
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclasses.dataclass
class SplitMetrics:
    accuracy: float
    macro_f1: float
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]  # [true label][predicted label], in `labels` order


@dataclasses.dataclass
class TrainingReport:
    job: str
    mode: str
    features: str
    labels: list[str]
    rows: dict[str, int]
    metrics: SplitMetrics
    training: dict
    hyperparameters: dict
    seconds: float
    outputs: dict[str, str]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelInfo:
    """What a serving model was trained on (`assets.extra/model_info.json`): `predict` checks its input against it.

    `inputs` maps each serving input name to its width (0 for a scalar per row); `encoder_identity` is
    `transforms.downstream.embeddings_input.embeddings_identity` of the training input, or of the encoders a
    fine-tuned model embeds: the encoders' content fingerprints and how they were called, not their paths.
    """

    mode: str
    features: str
    labels: list[str]
    inputs: dict[str, int]
    encoder_identity: dict
    signature: str = SERVING_SIGNATURE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})
