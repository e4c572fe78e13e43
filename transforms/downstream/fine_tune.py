"""Fine-tune mode: the raw corpus → records (the embedding job's own read and prepare steps) → a Keras model of
trainable `hub.KerasLayer` encoders under the classifier head.

The records come from the same `ReadCorpus` + `PrepareRecords` the embedding job runs, in a Beam pipeline whose
dead letters go to the same sink, and images are decoded by the same TensorFlow decoder
(`transforms.image_decode.decode_or_zeros`), so the fine-tuned model sees the pixels the frozen encoders saw. The
records reach training through Parquet files, read back a batch at a time at every epoch (`RecordsSource`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from encoders.hub_module import EncoderSpec, keras_layer, model_inputs
from encoders.preprocessing import AREA
from encoders.runtime import hub, tf, tf_keras
from schemas import embeddings as cols
from schemas.layout import PARQUET_SUFFIX
from schemas.records import Reason, Record, Stage
from transforms.dead_letters import DEAD_LETTER_TAG, dead_letter
from transforms.downstream.classify import HeadConfig, ModalityDropout, build_head, modality_columns
from transforms.downstream.split import split_of
from transforms.downstream.training_input import Survey
from transforms.embedding.prepare import PrepareRecords
from transforms.embedding.read import ReadCorpus
from transforms.embedding.write import WriteDeadLetters
from transforms.image_decode import ImageDecodeError, ImageDecoder, decode_or_zeros

RECORDS_SCHEMA = pa.schema([
    pa.field(cols.ID, pa.string(), nullable=False),
    pa.field(cols.LABEL, pa.string()),
    pa.field("image_bytes", pa.binary()),
    pa.field("text", pa.string()),
])
IMAGE_INPUT, TEXT_INPUT = "image", "text"  # the Keras model's input names, beside has_image / has_text
CHECK_IMAGE_SIZE = 32  # what CheckImagesDecode decodes to: whether an image decodes does not depend on the size
RECORDS_BATCH = 256  # records read at a time for training: 14 MB of 640x480 JPEGs, 75 MB of 2048x1536 ones
SHUFFLE_RECORDS = 2048  # records an epoch shuffles among, still encoded: about 110 MB of 640x480 JPEGs


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


def records_files(records_prefix: str) -> list[str]:
    """The records files the pipeline wrote: a hand-over, deleted by the caller once training is done."""
    return sorted(m.path for r in FileSystems.match([records_prefix + "*" + PARQUET_SUFFIX]) for m in r.metadata_list)


@dataclasses.dataclass(frozen=True)
class RecordsSource:
    """The records files and how their rows are split and fed to the model."""

    paths: tuple[str, ...]
    validation_ratio: float
    test_ratio: float
    use_image: bool
    use_text: bool
    image_size: int | None
    image_resize: str = AREA  # encoders.preprocessing.RESIZE_METHODS

    def chunks(self, columns: Sequence[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
        """(the labeled rows of a record batch, `columns` of them; how many of its rows were unlabeled):
        RECORDS_BATCH rows at a time, so a batch of photos is tens of MB whatever the corpus."""
        for path in self.paths:
            with FileSystems.open(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=RECORDS_BATCH, columns=list(columns)):
                    labels = batch.column(cols.LABEL).to_pylist()
                    labeled = pa.array([label is not None and label.strip() != "" for label in labels])
                    yield batch.filter(labeled), batch.num_rows - labeled.true_count

    def survey(self) -> Survey:
        """One pass over the ids and labels alone: rows read, unlabeled, and each split's label counts."""
        counts = Survey()
        for batch, unlabeled in self.chunks((cols.ID, cols.LABEL)):
            counts.read += batch.num_rows + unlabeled
            counts.skipped.unlabeled += unlabeled
            for row_id, label in zip(batch.column(cols.ID).to_pylist(), batch.column(cols.LABEL).to_pylist(),
                                     strict=True):
                counts.labels[split_of(row_id, self.validation_ratio, self.test_ratio)][label] += 1
        return counts

    def dataset(self, split: str, vocabulary: Sequence[str], batch_size: int, shuffle_rows: int = 0,
                seed: int = 0, with_ids: bool = False) -> tf.data.Dataset:
        """A split as batches of (model inputs, label ids[, row ids]): records read a batch at a time at every
        epoch, shuffled (shuffle_rows > 0) as encoded bytes, then decoded in parallel by the project's decoder."""
        index = {label: position for position, label in enumerate(vocabulary)}
        columns = (cols.ID, cols.LABEL, *(("image_bytes",) if self.use_image else ()),
                   *(("text",) if self.use_text else ()))

        def rows() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
            for batch, _ in self.chunks(columns):
                ids = batch.column(cols.ID).to_pylist()
                label_ids = np.array([index.get(label, -1) for label in batch.column(cols.LABEL).to_pylist()],
                                     np.int64)
                keep = np.array([split_of(row_id, self.validation_ratio, self.test_ratio) == split for row_id in ids],
                                bool) & (label_ids >= 0)
                if keep.any():
                    chosen = batch.filter(pa.array(keep))
                    # Missing values as empty strings: the decoder gives zeros for them, the masks say 0.
                    yield {name: np.array([value or b"" if name == "image_bytes" else value or ""
                                           for value in chosen.column(name).to_pylist()], object)
                           for name in columns if name != cols.LABEL}, label_ids[keep]

        signature = ({name: tf.TensorSpec([None], tf.string) for name in columns if name != cols.LABEL},
                     tf.TensorSpec([None], tf.int64))
        dataset = tf.data.Dataset.from_generator(rows, output_signature=signature).unbatch()
        if shuffle_rows:
            dataset = dataset.shuffle(shuffle_rows, seed=seed, reshuffle_each_iteration=True)
        size = self.image_size

        def row_inputs(row: dict, label_id: tf.Tensor):
            inputs = {}
            if self.use_image:
                inputs[IMAGE_INPUT] = decode_or_zeros(row["image_bytes"], size, self.image_resize)
                inputs[cols.HAS_IMAGE] = tf.cast(tf.strings.length(row["image_bytes"]) > 0, tf.float32)[None]
            if self.use_text:
                inputs[TEXT_INPUT] = row["text"]
                inputs[cols.HAS_TEXT] = tf.cast(tf.strings.length(row["text"]) > 0, tf.float32)[None]
            return (inputs, label_id, row[cols.ID]) if with_ids else (inputs, label_id)

        return dataset.map(row_inputs, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)


def label_vocabulary(counts: Mapping[str, int], top_k: int | None, frequency_threshold: int | None) -> list[str]:
    """The training split's label counts → the labels, most frequent first (ties: the greater string first, as
    tf.Transform orders them), with the same limits."""
    ordered = sorted(counts.items(), key=lambda item: (item[1], item[0].encode("utf-8")), reverse=True)
    kept = [label for label, count in ordered if not frequency_threshold or count >= frequency_threshold]
    return kept[:top_k] if top_k else kept


def build_fine_tune_model(image: EncoderSpec | None, text: EncoderSpec | None, n_classes: int,
                          head: HeadConfig, train_batches: tf.data.Dataset) -> tf_keras.Model:
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
        parts.append(encoder(model_inputs(spec, inputs[name])) * inputs[mask_name])
        masks.append(inputs[mask_name])
    vector = tf_keras.layers.Concatenate(name="embedding")(parts) if len(parts) > 1 else parts[0]
    # The frozen mode z-scores the vector with tf.Transform; here the encoders move, so the scale is learnt at
    # start from the pretrained encoders' outputs on the training rows (the same statistics frozen mode uses).
    embed = tf_keras.Model(inputs, vector)
    normalize = tf_keras.layers.Normalization(axis=-1, name="z_score")
    # Adapted batch by batch, as the training split streams: the statistics of every row, none held at once.
    normalize.adapt(train_batches.map(lambda inputs, _: embed(inputs, training=False)))
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
