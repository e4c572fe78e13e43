"""EmbedRecords: batches of records → Arrow RecordBatches holding both modalities' vectors and their concatenation.

Shaped like Beam's ModelHandler: `load_encoders` is the load_model half (run once per worker process through
`shared.Shared`, so every DoFn thread of the process uses one copy), `EmbedBatch.process` the run_inference half.
One DoFn holds both encoders and embeds both columns of the same batch, so no shuffle joins the modalities.
Images are decoded and resized in TensorFlow; vectors go from the model's NumPy arrays to Arrow without Python
floats in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from encoders.hub_module import EncoderSpec, LoadedEncoder
from encoders.runtime import configure_devices
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
from transforms.image_decode import ImageDecodeError, ImageDecoder
from transforms.report import ProgressLog
from transforms.rows import record_columns


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Everything a worker needs to embed: the probed encoder specs and the output layout."""

    image: EncoderSpec | None
    text: EncoderSpec | None
    schema: pa.Schema
    passthrough: tuple[str, ...] = ()
    l2_normalize: bool = False
    device: str = "auto"

    @property
    def cache_tag(self) -> str:
        return "|".join(spec.cache_tag if spec else "-" for spec in (self.image, self.text)) + "|" + self.device


class Encoders:
    """The per-process models: built once by `shared.Shared`, shared by every thread (hence weak-referenceable)."""

    def __init__(self, config: EmbedConfig):
        device = configure_devices(config.device)
        self.image = LoadedEncoder(config.image, device) if config.image else None
        self.text = LoadedEncoder(config.text, device) if config.text else None
        self.decode_image = ImageDecoder(config.image.image_size) if config.image else None


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


class EmbedBatch(beam.DoFn):
    """A batch of prepared records → a RecordBatch of the embedded ones, and dead letters for the rest."""

    def __init__(self, config: EmbedConfig, model_cache: shared.Shared, progress: ProgressLog):
        self._config = config
        self._model_cache = model_cache
        self._progress = progress
        self._embedded = Metrics.counter(METRICS_NAMESPACE, RECORDS_EMBEDDED)
        self._encoders: Encoders | None = None
        self._failure_run: FailureRun | None = None

    def setup(self):
        config = self._config
        self._failure_run = FailureRun()
        self._encoders = self._model_cache.acquire(lambda: Encoders(config), tag=config.cache_tag)

    def _decode_images(self, records: Sequence[Record]) -> tuple[list[Record], list[np.ndarray], list[DeadLetter]]:
        kept, pixels, dead = [], [], []
        for record in records:
            if record.image_bytes is None:
                kept.append(record)
                pixels.append(None)
                continue
            try:
                pixels.append(self._encoders.decode_image(record.image_bytes))
                kept.append(record)
            except ImageDecodeError as error:
                dead.append(dead_letter(record, Stage.EMBED, Reason.IMAGE_CORRUPT, error))
        return kept, pixels, dead

    def _encode(self, encoder: LoadedEncoder, inputs: np.ndarray) -> np.ndarray:
        vectors = encoder(inputs)
        return l2_normalize(vectors) if self._config.l2_normalize else vectors

    def _embed(self, items: Sequence[tuple[Record, np.ndarray | None]]) -> pa.RecordBatch:
        """(record, decoded pixels or None) pairs → one RecordBatch; each model runs once on the batch."""
        records = [record for record, _ in items]
        pixels = [pixel for _, pixel in items]
        size = len(records)
        image_vectors = text_vectors = None
        has_image = np.array([p is not None for p in pixels], bool)
        has_text = np.array([record.text is not None for record in records], bool)
        if self._encoders.image is not None:
            image_vectors = np.zeros((size, self._config.image.dim), np.float32)
            if has_image.any():
                batch = np.stack([p for p in pixels if p is not None])
                image_vectors[has_image] = self._encode(self._encoders.image, batch)
        if self._encoders.text is not None:
            text_vectors = np.zeros((size, self._config.text.dim), np.float32)
            if has_text.any():
                texts = np.array([record.text for record in records if record.text is not None], dtype=object)
                text_vectors[has_text] = self._encode(self._encoders.text, texts)
        return to_record_batch(records, self._config, image_vectors, has_image, text_vectors, has_text)

    def process(self, batch: list[Record]) -> Iterator:
        records, pixels, dead = self._decode_images(batch)
        outputs: list[pa.RecordBatch] = []
        if records:
            outputs, failures = batch_or_one_by_one(list(zip(records, pixels, strict=True)), self._embed,
                                                    self._failure_run)
            dead += [dead_letter(record, Stage.EMBED, Reason.ENCODER_FAILED, error) for (record, _), error in failures]
        embedded = sum(output.num_rows for output in outputs)
        self._embedded.inc(embedded)
        self._progress.add(embedded=embedded)
        # Beam's Parquet sink writes pyarrow Tables (ParquetWriter.write_table); wrapping a batch copies nothing.
        yield from (pa.Table.from_batches([output]) for output in outputs)
        for letter in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


class EmbedRecords(beam.PTransform):
    """prepared records → (pyarrow Tables of `config.schema`, dead_letters), in batches sized by BatchElements."""

    def __init__(self, config: EmbedConfig, progress: ProgressLog, min_batch_size: int = 8, max_batch_size: int = 32):
        super().__init__()
        self._config = config
        self._progress = progress
        self._min_batch_size = min(min_batch_size, max_batch_size)
        self._max_batch_size = max_batch_size

    def expand(self, records):
        outputs = (records
                   | "Batch" >> beam.BatchElements(min_batch_size=self._min_batch_size,
                                                   max_batch_size=self._max_batch_size)
                   | "Embed" >> beam.ParDo(EmbedBatch(self._config, shared.Shared(), self._progress))
                   .with_outputs(DEAD_LETTER_TAG, main="embeddings"))
        return outputs.embeddings, outputs[DEAD_LETTER_TAG]
