"""EmbedRecords: batches of records → Arrow RecordBatches holding both modalities' vectors and their concatenation.

Shaped like Beam's ModelHandler: `Encoders` is the load_model half (run once per worker process through
`shared.Shared`, so every DoFn thread of the process uses one copy), `EmbedBatch.process` the run_inference half.
One DoFn holds both encoders and embeds both columns of the same batch, so no shuffle joins the modalities.
Images are decoded and resized in TensorFlow, a batch at a time on all the process's cores, off the runner's thread
(EmbedBatch); vectors go from the model's NumPy arrays to Arrow without Python floats in between.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from encoders.hub_module import EncoderSpec, LoadedEncoder
from encoders.preprocessing import AREA
from encoders.runtime import configure_devices, stop_mixed_precision, tf, use_mixed_precision
from schemas import embeddings as cols
from schemas.records import DeadLetter, Reason, Record, Stage
from transforms.dead_letters import (
    DEAD_LETTER_TAG,
    METRICS_NAMESPACE,
    RECORDS_EMBEDDED,
    FailureRun,
    batch_or_one_by_one,
    dead_letter,
)
from transforms.embedding.decode_threads import DecodeThreads
from transforms.embedding.in_flight import InFlight, at_end_of_window
from transforms.embedding.rows import choose_arrow_memory_pool, record_columns
from transforms.image_decode import ImageDecoder
from transforms.report import ProgressLog


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Everything a worker needs to embed: the probed encoder specs and the output layout."""

    image: EncoderSpec | None
    text: EncoderSpec | None
    schema: pa.Schema
    passthrough: tuple[str, ...] = ()
    l2_normalize: bool = False
    device: str = "auto"
    mixed_precision: bool = False

    @property
    def cache_tag(self) -> str:
        return ("|".join(spec.cache_tag if spec else "-" for spec in (self.image, self.text)) + "|" + self.device
                + ("|mixed" if self.mixed_precision else ""))


class Encoders:
    """The per-process models: built once by `shared.Shared`, shared by every thread (hence weak-referenceable)."""

    def __init__(self, config: EmbedConfig, device: str):
        self.image = LoadedEncoder(config.image, device) if config.image else None
        self.text = LoadedEncoder(config.text, device) if config.text else None
        self.image_decoder = (ImageDecoder(config.image.image_size, config.image.resize or AREA) if config.image
                              else None)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def to_record_batch(records: Sequence[Record], config: EmbedConfig, image_vectors: np.ndarray | None,
                    has_image: np.ndarray, text_vectors: np.ndarray | None, has_text: np.ndarray) -> pa.RecordBatch:
    """Embedded records → one RecordBatch of `config.schema` (a missing modality is zeros, with its mask false):
    the vector columns the schema holds (per modality, concatenated, or both) in its value type."""
    vectors = {cols.IMAGE_EMBEDDING: image_vectors, cols.TEXT_EMBEDDING: text_vectors}
    parts = [part for part in (image_vectors, text_vectors) if part is not None]
    vectors[cols.EMBEDDING] = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return record_columns(records, config.schema, config.passthrough, has_image, has_text, vectors)


@dataclasses.dataclass
class EmbeddedBatch:
    """What one batch came to: its output tables and its dead letters."""

    tables: list[pa.Table]
    dead_letters: list[DeadLetter]


class EmbedBatch(beam.DoFn):
    """Batches of prepared records → Tables of the embedded ones, and dead letters for the rest, in stages that
    overlap: the runner's thread hands a batch over and goes on reading and preparing the next ones, while the
    model thread runs the encoders on it. The batch's images are decoded side by side on all the process's cores
    first, by the model thread itself or by decode threads of their own, two batches at a time, overlapping the
    model's previous batch (DecodeThreads chooses). At most IN_FLIGHT_BATCHES are handed over and not yet emitted
    (both decoding, or one decoding and one in the model); a batch's outputs leave in a later `process` call or at
    the end of the bundle, which is why the DoFn runs in the global window only (batch pipelines' window).

    Counters and progress are counted in the runner's thread: Beam's metrics belong to the thread of the bundle.
    """

    IN_FLIGHT_BATCHES = DecodeThreads.CONCURRENT_DECODES

    def __init__(self, config: EmbedConfig, model_cache: shared.Shared, progress: ProgressLog):
        self._config = config
        self._model_cache = model_cache
        self._progress = progress
        self._embedded = Metrics.counter(METRICS_NAMESPACE, RECORDS_EMBEDDED)
        self._encoders: Future[Encoders] | None = None
        self._failure_run: FailureRun | None = None
        self._decode_threads: DecodeThreads | None = None
        self._embedding: ThreadPoolExecutor | None = None
        self._in_flight: InFlight[EmbeddedBatch] = InFlight(self.IN_FLIGHT_BATCHES)

    def setup(self):
        config = self._config
        self._progress.start()
        self._failure_run = FailureRun()
        device = configure_devices(config.device)
        choose_arrow_memory_pool()  # on a remote worker, before the first batch's tables and row groups
        # Before the encoders' graphs first run, which is when TensorFlow rewrites them, and for as long as this DoFn
        # runs batches (each new batch size is a new first run); taken back in teardown, for whatever else the
        # process runs after this pipeline (an in-process run).
        if config.mixed_precision:
            use_mixed_precision(device)
        self._embedding = ThreadPoolExecutor(1, thread_name_prefix="hubembed-embed")
        self._decode_threads = DecodeThreads(self._embedding, on_gpu=device.startswith("/GPU"))
        # The encoders load on the model thread, the first task it runs: loading a module takes seconds (once per
        # process), and the runner's thread reads and prepares the first batches meanwhile. A load that fails
        # raises from the first batch's result, in `process`.
        self._encoders = self._embedding.submit(
            self._model_cache.acquire, lambda: Encoders(config, device), tag=config.cache_tag)

    def start_bundle(self):
        self._in_flight.clear()

    def process(self, batch: list[Record]) -> Iterator:
        decoded = self._decode_threads.submit(lambda: self._decode_images(batch))
        for done in self._in_flight.add(self._embedding.submit(self._embed_decoded, decoded)):
            yield from self._emit(done)

    def finish_bundle(self) -> Iterator:
        for done in self._in_flight.drain():
            yield from self._emit(done, at_end_of_window)

    def teardown(self):
        if self._decode_threads is not None:
            self._decode_threads.shutdown()
        if self._embedding is not None:
            self._embedding.shutdown(cancel_futures=True)
        if self._config.mixed_precision:
            stop_mixed_precision()

    def _emit(self, done: EmbeddedBatch, wrap=lambda value: value) -> Iterator:
        embedded = sum(table.num_rows for table in done.tables)
        self._embedded.inc(embedded)
        self._progress.add(embedded=embedded)
        yield from (wrap(table) for table in done.tables)
        for letter in done.dead_letters:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, wrap(letter))

    def _decode_images(self, records: Sequence[Record]) -> tuple[list[Record], tf.Tensor | None, list[DeadLetter]]:
        """The batch's images decoded together (ImageDecoder.decode_batch): (the records kept, the pixels of those
        with an image, in their order, as one tensor, the dead letters of the images that would not decode)."""
        with_image = [record for record in records if record.image_bytes is not None]
        if not with_image:
            return list(records), None, []
        decoder = self._encoders.result().image_decoder
        pixels, errors = decoder.decode_batch([record.image_bytes for record in with_image])
        failed = {id(record): error for record, error in zip(with_image, errors, strict=True) if error is not None}
        if not failed:
            return list(records), pixels, []
        kept_rows = np.array([row for row, error in enumerate(errors) if error is None], np.int64)  # int64 if empty
        dead = [dead_letter(record, Stage.EMBED, Reason.IMAGE_CORRUPT, failed[id(record)]) for record in with_image
                if id(record) in failed]
        return [record for record in records if id(record) not in failed], tf.gather(pixels, kept_rows), dead

    def _embed_decoded(self, decoded: Future) -> EmbeddedBatch:
        """The model thread: one decoded batch through the encoders (batch_or_one_by_one: a record that fails alone
        is dead-lettered, a machine error raised for the runner to retry)."""
        records, pixels, dead = decoded.result()
        tables: list[pa.Table] = []
        if records:
            # Each record with its row in `pixels` (None without an image): the batch, or one record, is then
            # embedded from those rows; the whole batch's rows are the array itself, never a copy of it.
            rows = np.cumsum([record.image_bytes is not None for record in records]) - 1
            items = [(record, int(row) if record.image_bytes is not None else None)
                     for record, row in zip(records, rows, strict=True)]
            start = time.perf_counter()
            outputs, failures = batch_or_one_by_one(items, lambda chosen: self._embed(chosen, pixels),
                                                    self._failure_run)
            self._decode_threads.model_ran(time.perf_counter() - start)
            dead += [dead_letter(record, Stage.EMBED, Reason.ENCODER_FAILED, error) for (record, _), error in failures]
            # Beam's Parquet sink writes pyarrow Tables (ParquetWriter.write_table); wrapping a batch copies nothing.
            tables = [pa.Table.from_batches([output]) for output in outputs]
        return EmbeddedBatch(tables, dead)

    def _encode(self, encoder: LoadedEncoder, inputs: np.ndarray | tf.Tensor) -> np.ndarray:
        vectors = encoder(inputs)
        return l2_normalize(vectors) if self._config.l2_normalize else vectors

    def _embed(self, items: Sequence[tuple[Record, int | None]], pixels: tf.Tensor | None) -> pa.RecordBatch:
        """(record, its row in `pixels` or None) pairs → one RecordBatch; each model runs once on the batch."""
        encoders = self._encoders.result()
        records = [record for record, _ in items]
        rows = [row for _, row in items if row is not None]
        size = len(records)
        image_vectors = text_vectors = None
        has_image = np.array([row is not None for _, row in items], bool)
        has_text = np.array([record.text is not None for record in records], bool)
        if encoders.image is not None:
            image_vectors = np.zeros((size, self._config.image.dim), np.float32)
            if rows:
                batch = pixels if rows == list(range(len(pixels))) else tf.gather(pixels, np.array(rows, np.int64))
                image_vectors[has_image] = self._encode(encoders.image, batch)
        if encoders.text is not None:
            text_vectors = np.zeros((size, self._config.text.dim), np.float32)
            if has_text.any():
                texts = np.array([record.text for record in records if record.text is not None], dtype=object)
                text_vectors[has_text] = self._encode(encoders.text, texts)
        return to_record_batch(records, self._config, image_vectors, has_image, text_vectors, has_text)


# What fills one of a batch's --batch_size slots: a record takes more than one when its image has more pixels (the
# decoder holds 3 bytes a pixel, several images at once) or its text more characters (an encoder that does not cut
# texts short holds activations per token) than this, so a batch of huge images or long texts holds fewer records.
PIXELS_PER_SLOT = 4_000_000  # a 12-megapixel photo takes 3 slots; 640x480 and 2048x1536 photos take one
TEXT_CHARS_PER_SLOT = 2_000  # about 500 tokens, the most a BERT-sized text encoder reads


def batch_slots(record: Record) -> int:
    """How many of a batch's slots a record takes: 1, or more for a large image or a long text."""
    return max(1, -(-(record.image_pixels or 0) // PIXELS_PER_SLOT),
               -(-len(record.text or "") // TEXT_CHARS_PER_SLOT))


class EmbedRecords(beam.PTransform):
    """prepared records → (pyarrow Tables of `config.schema`, dead_letters), in batches sized by BatchElements and
    weighed by `batch_slots`: at most max_batch_size records, fewer when their images are large or texts long.

    Batches are full by default (min_batch_size = max_batch_size): BatchElements adapts a batch's size to how long
    its consumer takes over it, and EmbedBatch hands a batch to its model thread and returns at once. Left to
    adapt from 8, the batches of a 2,000-record run stayed at 8 or 9 records."""

    def __init__(self, config: EmbedConfig, progress: ProgressLog, min_batch_size: int = 32, max_batch_size: int = 32):
        super().__init__()
        self._config = config
        self._progress = progress
        self._min_batch_size = min(min_batch_size, max_batch_size)
        self._max_batch_size = max_batch_size

    def expand(self, records):
        outputs = (records
                   | "Batch" >> beam.BatchElements(min_batch_size=self._min_batch_size,
                                                   max_batch_size=self._max_batch_size, element_size_fn=batch_slots)
                   | "Embed" >> beam.ParDo(EmbedBatch(self._config, shared.Shared(), self._progress))
                   .with_outputs(DEAD_LETTER_TAG, main="embeddings"))
        return outputs.embeddings, outputs[DEAD_LETTER_TAG]
