"""The serving SavedModels: raw inputs in, label out; and the per-worker loading of one for the predict job.

Signature `serving_default` (both modes) returns, per row:
  predicted_label  string [B]       the most probable label
  probability      float32 [B]      its probability
  probabilities    float32 [B, n]   the full distribution, in the order of the label vocabulary
Signature `labels` (no inputs) returns `labels`: string [n], the label vocabulary in that order; the same list
is in `assets.extra/model_info.json`.
Inputs of `serving_default`:
  frozen mode (embeddings in): image_embedding float32 [B, d_image] and has_image bool [B] (features image or
    both), text_embedding float32 [B, d_text] and has_text bool [B] (features text or both). The tf.Transform
    layer written by the training job scales them, then the head classifies.
  fine-tune mode (raw data in): image_bytes string [B] (encoded JPEG/PNG/GIF/BMP/WebP; "" for no image) and/or
    text string [B] ("" for no text); the trainable encoders embed them, then the head classifies.
"""

from __future__ import annotations

import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from encoders.preprocessing import AREA
from encoders.runtime import tf, tf_keras
from schemas import embeddings as cols
from schemas.training import MODEL_INFO_NAME, SERVING_SIGNATURE, ModelInfo
from transforms.downstream.embeddings_input import MASK_OF
from transforms.downstream.tft_features import FEATURES, MODALITY_MASK, vector_columns
from transforms.image_decode import decode_batch_or_zeros

LABELS_SIGNATURE = "labels"
IMAGE_BYTES = "image_bytes"  # fine-tune serving input
TEXT = "text"  # fine-tune serving input


def head_inputs(transformed: dict) -> tf.Tensor:
    """The transform layer's outputs → the head's one input: the scaled vector, then the modality mask if any."""
    if MODALITY_MASK in transformed:
        return tf.concat([transformed[FEATURES], transformed[MODALITY_MASK]], axis=1)
    return transformed[FEATURES]


def _prediction_outputs(probabilities: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
    best = tf.argmax(probabilities, axis=1, output_type=tf.int32)
    return {"predicted_label": tf.gather(labels, best), "probability": tf.reduce_max(probabilities, axis=1),
            "probabilities": probabilities}


class FrozenFeatureModel(tf.Module):
    """Raw embedding vectors → tf.Transform layer → head → label; what `export_frozen` saves."""

    def __init__(self, transform_layer, head: tf_keras.Model, labels: list[str], features: str,
                 dims: dict[str, int]):
        super().__init__(name="hubembed_classifier")
        self.transform_layer = transform_layer  # tracked: its assets (the label vocabulary) are saved with it
        self.head = head
        self.labels = tf.constant(labels)
        self.features = features
        spec = {}
        for column in vector_columns(features):
            spec[column] = tf.TensorSpec([None, dims[column]], tf.float32, name=column)
            spec[MASK_OF[column]] = tf.TensorSpec([None], tf.bool, name=MASK_OF[column])
        self.serve = tf.function(self._serve, input_signature=[spec])
        self.label_vocabulary = tf.function(lambda: {"labels": self.labels}, input_signature=[])

    def _serve(self, inputs: dict) -> dict:
        raw = {name: tf.cast(value, tf.float32) for name, value in inputs.items()}
        probabilities = self.head(head_inputs(self.transform_layer(raw)), training=False)
        return _prediction_outputs(probabilities, self.labels)

    def probabilities(self, raw: dict[str, tf.Tensor]) -> np.ndarray:
        """In-process scoring of raw inputs (masks as 0/1 floats), exactly as the signature does it."""
        return self.head(head_inputs(self.transform_layer(raw)), training=False).numpy()


class FineTunedModel(tf.Module):
    """Raw image bytes and/or text → the fine-tuned encoders and head (one Keras model) → label."""

    def __init__(self, keras_model: tf_keras.Model, labels: list[str], use_image: bool, use_text: bool,
                 image_size: int | None, image_resize: str = AREA):
        super().__init__(name="hubembed_fine_tuned_classifier")
        self.keras_model = keras_model
        self.labels = tf.constant(labels)
        self.use_image, self.use_text, self.image_size = use_image, use_text, image_size
        self.image_resize = image_resize
        spec = {}
        if use_image:
            spec[IMAGE_BYTES] = tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)
        if use_text:
            spec[TEXT] = tf.TensorSpec([None], tf.string, name=TEXT)
        self.serve = tf.function(self._serve, input_signature=[spec])
        self.label_vocabulary = tf.function(lambda: {"labels": self.labels}, input_signature=[])

    def _serve(self, inputs: dict) -> dict:
        model_inputs = {}
        if self.use_image:
            data = inputs[IMAGE_BYTES]
            # The embed step's batch decode: one Exif loop for the batch, parallel decodes, one scaling to [0, 1].
            model_inputs["image"] = decode_batch_or_zeros(data, self.image_size, self.image_resize)
            model_inputs[cols.HAS_IMAGE] = tf.cast(tf.strings.length(data) > 0, tf.float32)[:, None]
        if self.use_text:
            text = inputs[TEXT]
            model_inputs["text"] = text
            model_inputs[cols.HAS_TEXT] = tf.cast(tf.strings.length(tf.strings.strip(text)) > 0, tf.float32)[:, None]
        probabilities = self.keras_model(model_inputs, training=False)
        return _prediction_outputs(probabilities, self.labels)


def export(module: tf.Module, model_dir: str, info: ModelInfo) -> None:
    """Save the module with its two signatures, and model_info.json in assets.extra/ (any Beam filesystem)."""
    tf.saved_model.save(module, model_dir, signatures={
        SERVING_SIGNATURE: module.serve.get_concrete_function(),
        LABELS_SIGNATURE: module.label_vocabulary.get_concrete_function(),
    })
    extra = FileSystems.join(model_dir, "assets.extra")
    if not FileSystems.exists(extra):
        FileSystems.mkdirs(extra)
    with FileSystems.create(FileSystems.join(extra, MODEL_INFO_NAME)) as handle:
        handle.write(json.dumps(info.to_dict(), indent=2, sort_keys=True).encode())


def read_model_info(model_dir: str) -> ModelInfo:
    """The model's model_info.json; raises FileNotFoundError / ValueError for a folder that is not such a model."""
    path = FileSystems.join(model_dir, "assets.extra", MODEL_INFO_NAME)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"{model_dir} is not a hubembed serving model (no assets.extra/{MODEL_INFO_NAME})")
    with FileSystems.open(path) as handle:
        return ModelInfo.from_dict(json.loads(handle.read()))


def check_serving_model(model_dir: str, info: ModelInfo) -> None:
    """Load the model once where the job starts: a folder with model_info.json but no loadable SavedModel (or one
    whose serving signature does not take the inputs model_info.json lists) raises ValueError in one line, instead
    of failing in every worker's setup(). The frozen-mode model is small (the transform graph and the head)."""
    if not tf.saved_model.contains_saved_model(model_dir):
        raise ValueError(f"{model_dir} holds {MODEL_INFO_NAME} but no SavedModel (no saved_model.pb)")
    try:
        model = tf.saved_model.load(model_dir)
    except Exception as error:  # OSError, NotFoundError (variables missing), DecodeError, DataLossError
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"{model_dir} is not a loadable SavedModel: {reason[:300]}") from error
    if info.signature not in model.signatures:
        raise ValueError(f"{model_dir} has no {info.signature!r} signature (it has {', '.join(model.signatures)})")
    _, inputs = model.signatures[info.signature].structured_input_signature
    widths = {name: int(spec.shape[1]) if spec.shape.rank == 2 else 0 for name, spec in inputs.items()}
    if widths != info.inputs:
        raise ValueError(f"{model_dir}'s {info.signature!r} signature takes {widths}, but its {MODEL_INFO_NAME} "
                         f"says {info.inputs}")


class LoadedClassifier:
    """One serving model loaded in this process (built by `shared.Shared`, shared by every DoFn thread)."""

    def __init__(self, model_dir: str):
        self.model = tf.saved_model.load(model_dir)
        self.signature = self.model.signatures[SERVING_SIGNATURE]  # a concrete function: no retracing, thread-safe

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.signature(**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: value.numpy() for name, value in outputs.items()}
