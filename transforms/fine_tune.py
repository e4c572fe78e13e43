"""Fine-tune mode: the raw corpus → records (the embedding job's own read and prepare steps) → a Keras model of
trainable `hub.KerasLayer` encoders under the classifier head.

The records come from the same `ReadCorpus` + `PrepareRecords` the embedding job runs, in a Beam pipeline whose
dead letters go to the same sink, and images are decoded by the same TensorFlow decoder
(`transforms.image_decode.make_image_decoder`), so the fine-tuned model sees the pixels the frozen encoders saw.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from encoders.hub_module import EncoderSpec, keras_layer
from encoders.runtime import hub, tf, tf_keras
from schemas import embeddings as cols
from schemas.layout import PARQUET_SUFFIX
from schemas.records import Reason, Record, Stage
from transforms.classify import HeadConfig, ModalityDropout, build_head, modality_columns
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter
from transforms.image_decode import ImageDecodeError, ImageDecoder, make_image_decoder
from transforms.prepare import PrepareRecords
from transforms.read import ReadCorpus
from transforms.write import WriteDeadLetters

RECORDS_SCHEMA = pa.schema([
    pa.field(cols.ID, pa.string(), nullable=False),
    pa.field(cols.LABEL, pa.string()),
    pa.field("image_bytes", pa.binary()),
    pa.field("text", pa.string()),
])
IMAGE_INPUT, TEXT_INPUT = "image", "text"  # the Keras model's input names, beside has_image / has_text
CHECK_IMAGE_SIZE = 32  # what CheckImagesDecode decodes to: whether an image decodes does not depend on the size


def record_row(record: Record) -> dict:
    return {cols.ID: record.id, cols.LABEL: record.label, "image_bytes": record.image_bytes, "text": record.text}


class CheckImagesDecode(beam.DoFn):
    """Decode each record's image once with the embedding job's decoder and dead-letter those it refuses (corrupt
    past the header, a JPEG whose data ends early), as the embedding job does: training decodes the images again
    outside the pipeline, where one bad image would stop it."""

    def __init__(self):
        self._decoder: ImageDecoder | None = None

    def setup(self):
        self._decoder = ImageDecoder(CHECK_IMAGE_SIZE)

    def process(self, record: Record):
        if record.image_bytes is not None:
            try:
                self._decoder(record.image_bytes)
            except ImageDecodeError as error:
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG,
                                               dead_letter(record, Stage.EMBED, Reason.IMAGE_CORRUPT, error))
                return
        yield record


def build_records_pipeline(pipeline: beam.Pipeline, path: str, input_format: str, use_image: bool,
                           use_text: bool, max_image_pixels: int, records_prefix: str,
                           dead_letters_prefix: str) -> None:
    """read → prepare → image decode check → records Parquet (id, label, image bytes, text); dead letters as the
    embedding job's."""
    read = ReadCorpus(path, input_format)
    records, unreadable = pipeline | "ReadCorpus" >> read
    prepared, _, unprepared = records | "PrepareRecords" >> PrepareRecords(
        read.again(), use_image=use_image, use_text=use_text, max_image_pixels=max_image_pixels)
    undecodable = []
    if use_image:
        checked = prepared | "CheckImagesDecode" >> beam.ParDo(CheckImagesDecode()).with_outputs(
            DEAD_LETTER_TAG, main="records")
        prepared, undecodable = checked.records, [checked[DEAD_LETTER_TAG]]
    _ = (prepared
         | "ToRows" >> beam.Map(record_row)
         | "WriteRecords" >> beam.io.WriteToParquet(records_prefix, schema=RECORDS_SCHEMA,
                                                    file_name_suffix=PARQUET_SUFFIX))
    _ = ((unreadable, unprepared, *undecodable)
         | "AllDeadLetters" >> beam.Flatten()
         | "WriteDeadLetters" >> WriteDeadLetters(dead_letters_prefix))


def read_records(records_prefix: str) -> pa.Table:
    """The records the pipeline wrote, in memory; the files are deleted once read (they are only a hand-over)."""
    paths = sorted(m.path for r in FileSystems.match([records_prefix + "*" + PARQUET_SUFFIX]) for m in r.metadata_list)
    tables = []
    for path in paths:
        with FileSystems.open(path) as handle:
            tables.append(pq.read_table(handle))
    if paths:
        FileSystems.delete(paths)
    return pa.concat_tables(tables) if tables else RECORDS_SCHEMA.empty_table()


def label_vocabulary(labels: Sequence[str], top_k: int | None, frequency_threshold: int | None) -> list[str]:
    """Most frequent first (ties: the greater string first, as tf.Transform orders them), with the same limits."""
    counts = collections.Counter(labels)
    ordered = sorted(counts.items(), key=lambda item: (item[1], item[0].encode("utf-8")), reverse=True)
    kept = [label for label, count in ordered if not frequency_threshold or count >= frequency_threshold]
    return kept[:top_k] if top_k else kept


def decode_images(image_bytes: Sequence[bytes | None], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images → [N, size, size, 3] float32 in [0, 1] and a has_image mask; no image is zeros."""
    decode = make_image_decoder(image_size)
    pixels = np.zeros((len(image_bytes), image_size, image_size, 3), np.float32)
    present = np.zeros(len(image_bytes), np.float32)
    for index, data in enumerate(image_bytes):
        if data:
            pixels[index] = decode(tf.constant(data)).numpy()
            present[index] = 1.0
    return pixels, present


def model_inputs(table: pa.Table, image_size: int | None, use_image: bool, use_text: bool) -> dict[str, np.ndarray]:
    """Records → the fine-tune model's inputs."""
    inputs = {}
    if use_image:
        inputs[IMAGE_INPUT], present = decode_images(table.column("image_bytes").to_pylist(), image_size)
        inputs[cols.HAS_IMAGE] = present[:, None]
    if use_text:
        texts = [text or "" for text in table.column("text").to_pylist()]
        inputs[TEXT_INPUT] = np.array(texts, object)
        inputs[cols.HAS_TEXT] = np.array([[1.0 if text.strip() else 0.0] for text in texts], np.float32)
    return inputs


def build_fine_tune_model(image: EncoderSpec | None, text: EncoderSpec | None, n_classes: int,
                          head: HeadConfig, train_inputs: dict[str, np.ndarray]) -> tf_keras.Model:
    """image → hub.KerasLayer(trainable) and/or text → hub.KerasLayer(trainable), masked, concatenated,
    z-scored per dimension (statistics of the training rows through the pretrained encoders), masks appended,
    then the head."""
    inputs, parts, masks = {}, [], []
    for spec, name, mask_name in ((image, IMAGE_INPUT, cols.HAS_IMAGE), (text, TEXT_INPUT, cols.HAS_TEXT)):
        if spec is None:
            continue
        shape = (spec.image_size, spec.image_size, 3) if name == IMAGE_INPUT else ()
        inputs[name] = tf_keras.Input(shape=shape, dtype=tf.float32 if name == IMAGE_INPUT else tf.string, name=name)
        inputs[mask_name] = tf_keras.Input(shape=(1,), dtype=tf.float32, name=mask_name)
        encoder = keras_layer(spec, trainable=True, name=f"{spec.modality}_encoder")
        parts.append(encoder(inputs[name]) * inputs[mask_name])
        masks.append(inputs[mask_name])
    vector = tf_keras.layers.Concatenate(name="embedding")(parts) if len(parts) > 1 else parts[0]
    # The frozen mode z-scores the vector with tf.Transform; here the encoders move, so the scale is learnt at
    # start from the pretrained encoders' outputs on the training rows (the same statistics frozen mode uses).
    embed = tf_keras.Model(inputs, vector)
    normalize = tf_keras.layers.Normalization(axis=-1, name="z_score")
    normalize.adapt(embed.predict({name: value for name, value in train_inputs.items()}, batch_size=64, verbose=0))
    scaled = normalize(vector)
    head_input = tf_keras.layers.Concatenate(name="with_masks")([scaled, *masks]) if len(masks) > 1 else scaled
    dims = [spec.dim for spec in (image, text) if spec is not None]
    if len(dims) > 1 and head.modality_dropout:  # as in frozen mode; the identity at inference
        head_input = ModalityDropout(modality_columns(dims), sum(dims) + len(dims), head.modality_dropout, head.seed,
                                     name="modality_dropout")(head_input)
    probabilities = build_head(n_classes, head)(head_input)
    return tf_keras.Model(inputs, probabilities, name="fine_tuned_classifier")


def set_encoders_trainable(model: tf_keras.Model, trainable: bool) -> None:
    """Freeze or unfreeze the hub.KerasLayer encoders (takes effect at the next compile)."""
    for layer in model.layers:
        if isinstance(layer, hub.KerasLayer):
            layer.trainable = trainable


def encoder_weights(model: tf_keras.Model) -> dict[str, np.ndarray]:
    """The hub.KerasLayer weights by name: to measure how far fine-tuning moved the encoders."""
    return {f"{layer.name}/{weight.name}": weight.numpy().copy() for layer in model.layers
            if isinstance(layer, hub.KerasLayer) for weight in layer.weights}


def weight_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute change of each encoder weight."""
    return {name: round(float(np.max(np.abs(after[name] - before[name]))), 8) for name in before}
