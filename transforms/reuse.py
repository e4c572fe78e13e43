"""Reuse: a record unchanged since an earlier output takes its vectors from there, never decoded nor embedded.

Unchanged means: the same id, the same image bytes and text (their SHA-256, columns of every output, so reuse needs
no other state), and the same encoders, preprocessing, L2 setting and storage (the `hubembed.reuse_key` of the
files, checked at start). The label and passthrough columns come from today's input: they are not inputs of the
encoders, so a changed label alone does not re-embed.

    prepared records ──► Fingerprint ──► SplitByReuse ◄── ReadStoredRefs(earlier outputs, a killed run's checkpoints)
                                           │ unchanged: (record, where its row is stored)
                                           │      ──► ByStoredRowGroup ──► CopyStoredVectors ──► the sink
                                           ▼ new or changed
                                     EmbedRecords

The join is a CoGroupByKey on the id of the records and of the stored rows' fingerprints and places (file, row
group, row): no vector crosses it. Records gone from the input have no record in their group and are dropped. The
reused records are then grouped by stored row group, and each group's vectors are read from Parquet once and taken
into the output table as Arrow columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import embeddings as cols
from schemas import layout
from schemas.records import DeadLetter, Record
from transforms.dead_letters import METRICS_NAMESPACE, RECORDS_EMBEDDED, route
from transforms.files import matching_paths
from transforms.prepare import fetch_and_check_image
from transforms.rows import record_columns

log = logging.getLogger("hubembed")

REUSED_TAG = "reused"
RECORDS_REUSED = "records_reused"  # rows taken from --reuse outputs
RECORDS_RESUMED = "records_resumed"  # rows taken from this output's checkpoints (a killed run's finished batches)
ORIGIN_REUSE, ORIGIN_CHECKPOINT = "reuse", "checkpoint"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(record: Record) -> Record:
    """The record with the SHA-256 of what the encoders will see: the image bytes and the UTF-8 text."""
    return dataclasses.replace(
        record,
        image_sha256=sha256_hex(record.image_bytes) if record.image_bytes is not None else None,
        text_sha256=sha256_hex(record.text.encode("utf-8")) if record.text is not None else None,
    )


class ReuseConfigError(ValueError):
    """A --reuse output that cannot be reused; the message is one line, fit for the console."""


def reuse_key(metadata: Mapping[str, str]) -> str:
    """The digest that must be equal for an output's vectors to be reused: the encoders' content identity (not
    their paths), the image preprocessing, L2 and layout (`embeddings_identity`), and how the vectors are stored."""
    from transforms.embeddings_input import embeddings_identity  # imports the encoders' TF runtime

    identity = {"identity": embeddings_identity(dict(metadata)), "storage": metadata.get(cols.META_STORAGE)}
    return sha256_hex(json.dumps(identity, sort_keys=True).encode())


def _file_reuse_key(path: str) -> str | None:
    with FileSystems.open(path) as handle:
        return cols.read_metadata(pq.ParquetFile(handle).schema_arrow).get(cols.META_REUSE_KEY)


def find_reusable_files(patterns: Sequence[str], key: str) -> list[tuple[str, str]]:
    """The embeddings files of the published outputs (`_SUCCESS`) that `patterns` (folders or globs of folders)
    name, as (path, ORIGIN_REUSE). Raises ReuseConfigError for an output made with other encoders or settings;
    an output without `_SUCCESS` (a failed or running night) is never read."""
    files: list[tuple[str, str]] = []
    for pattern in patterns:
        folders = [posixpath.dirname(path) for path in matching_paths(FileSystems.join(pattern.rstrip("/"),
                                                                                   layout.SUCCESS_NAME))]
        if not folders:
            log.warning("--reuse %s names no published output (no _SUCCESS): nothing reused from it", pattern)
        for folder in folders:
            paths = matching_paths(FileSystems.join(folder, layout.EMBEDDINGS_PREFIX + "-*" + layout.PARQUET_SUFFIX))
            if not paths:
                continue
            found = _file_reuse_key(paths[0])
            if found != key:
                why = "has no content fingerprints (written before reuse existed)" if found is None else \
                    "was embedded with other encoders, preprocessing, L2 setting or storage"
                raise ReuseConfigError(f"--reuse {folder} {why}: its vectors cannot be reused by this run; "
                                       "drop it from --reuse")
            files += [(path, ORIGIN_REUSE) for path in paths]
    return sorted(set(files))


def usable_checkpoints(paths: Sequence[str], key: str) -> list[tuple[str, str]]:
    """A killed run's checkpoint files that this run can take back: those made with the same reuse key."""
    usable = [path for path in paths if _file_reuse_key(path) == key]
    if len(usable) < len(paths):
        log.info("ignoring %d checkpoint files of a run with other settings", len(paths) - len(usable))
    return [(path, ORIGIN_CHECKPOINT) for path in usable]


class StoredRef(NamedTuple):
    """Where one stored row lives, and the content it was embedded from: all that crosses the join (the vectors
    stay in their file until the rows to copy are known, then move as Arrow columns, never as Python objects)."""

    image_sha256: str | None
    text_sha256: str | None
    rank: int  # the file's index in the preference order: the highest wins (see `preference_order`)
    row_group: int
    row: int  # within the row group

    def matches(self, record: Record) -> bool:
        return (self.image_sha256, self.text_sha256) == (record.image_sha256, record.text_sha256)


def preference_order(files: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(path, origin) files from the least to the most preferred: a checkpoint of this output over --reuse outputs,
    then the path that sorts last (the newest `dt=` partition). Any choice holds the same bits for the same
    content; the order only makes the choice deterministic."""
    return sorted(set(files), key=lambda file: (file[1] == ORIGIN_CHECKPOINT, file[0]))


_REF_COLUMNS = (cols.ID, cols.IMAGE_SHA256, cols.TEXT_SHA256)


def read_stored_refs(rank: int, path: str) -> Iterator[tuple[str, StoredRef]]:
    """(id, StoredRef) for every row of one output file, read a row group at a time, vectors left unread."""
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        for row_group in range(parquet.num_row_groups):
            table = parquet.read_row_group(row_group, columns=[name for name in _REF_COLUMNS if name in names])
            ids = table.column(cols.ID).to_pylist()
            image, text = ([None] * len(ids) if name not in names else table.column(name).to_pylist()
                           for name in (cols.IMAGE_SHA256, cols.TEXT_SHA256))
            for row, row_id in enumerate(ids):
                yield row_id, StoredRef(image[row], text[row], rank, row_group, row)


class ReadStoredRefs(beam.PTransform):
    """Output files in preference order → (id, StoredRef)."""

    def __init__(self, files: Sequence[tuple[str, str]]):
        super().__init__()
        self._paths = [path for path, _ in files]

    def expand(self, pipeline):
        return (pipeline
                | "Files" >> beam.Create(list(enumerate(self._paths)))
                | "Refs" >> beam.FlatMapTuple(read_stored_refs))


def choose_stored(group: tuple[str, dict[str, Iterable]]) -> list:
    """One id's record (if the input still has it) and its stored rows → the record to embed, or the record keyed
    by the stored row group to copy its vectors from (tagged REUSED_TAG)."""
    _, grouped = group
    records = list(grouped["record"])
    if not records:
        return []  # gone from the input: gone from the output
    record = records[0]
    candidates = [ref for ref in grouped["stored"] if ref.matches(record)]
    if not candidates:
        return [record]
    best = max(candidates, key=lambda ref: ref.rank)
    return [beam.pvalue.TaggedOutput(REUSED_TAG, ((best.rank, best.row_group), (record, best.row)))]


def without_refetchable_bytes(record: Record) -> Record:
    """The record as it crosses the join: image bytes read from a file are dropped (else the join would shuffle
    every image of the corpus, most of which it copies vectors for), and read again after it for the fresh few."""
    if record.image_uri is not None and record.image_bytes is not None:
        return dataclasses.replace(record, image_bytes=None)
    return record


def refetch_image(record: Record, max_pixels: int, max_bytes: int) -> Iterator[Record | DeadLetter]:
    """A fresh record whose image bytes the join dropped, with them read and checked again (and fingerprinted
    again: the file may have changed since, and the row must say what was embedded)."""
    if record.image_uri is None or record.image_bytes is not None:
        yield record
        return
    for item in fetch_and_check_image(record, max_pixels, max_bytes):
        yield fingerprint(item) if isinstance(item, Record) else item


class SplitByReuse(beam.PTransform):
    """(fingerprinted records, stored refs) → (records to embed, ((file rank, row group), (record, row)) to copy);
    the records to embed may have lost their image bytes on the way (`without_refetchable_bytes`)."""

    def expand(self, inputs):
        records, stored = inputs
        keyed = records | "KeyById" >> beam.Map(lambda record: (record.id, without_refetchable_bytes(record)))
        outputs = ({"record": keyed, "stored": stored}
                   | "JoinById" >> beam.CoGroupByKey()
                   | "Choose" >> beam.FlatMap(choose_stored).with_outputs(REUSED_TAG, main="fresh"))
        return outputs.fresh, outputs[REUSED_TAG]


class CopyStoredVectors(beam.DoFn):
    """One stored row group and the records that reuse its rows → one pyarrow Table of the output schema: the
    vector columns read from the row group and taken row by row in Arrow, the bits untouched."""

    def __init__(self, files: Sequence[tuple[str, str]], schema: pa.Schema, passthrough: Sequence[str]):
        self._files = list(files)
        self._schema = schema
        self._passthrough = tuple(passthrough)
        self._vector_columns = [field.name for field in schema if pa.types.is_fixed_size_list(field.type)]
        self._reused = Metrics.counter(METRICS_NAMESPACE, RECORDS_REUSED)
        self._resumed = Metrics.counter(METRICS_NAMESPACE, RECORDS_RESUMED)
        self._written = Metrics.counter(METRICS_NAMESPACE, RECORDS_EMBEDDED)  # every output row, fresh or reused

    def process(self, group: tuple[tuple[int, int], Iterable[tuple[Record, int]]]) -> Iterator[pa.Table]:
        (rank, row_group), pairs = group
        pairs = list(pairs)
        records = [record for record, _ in pairs]
        rows = pa.array([row for _, row in pairs], pa.int64())
        path, origin = self._files[rank]
        with FileSystems.open(path) as handle:
            stored = pq.ParquetFile(handle).read_row_group(row_group, columns=list(self._vector_columns))
        vectors = {name: stored.column(name).take(rows).combine_chunks() for name in self._vector_columns}
        # The masks say which modality was embedded: the same as which one has content, since the hashes match.
        table = record_columns(records, self._schema, self._passthrough,
                               np.array([record.image_sha256 is not None for record in records], bool),
                               np.array([record.text_sha256 is not None for record in records], bool), vectors)
        (self._resumed if origin == ORIGIN_CHECKPOINT else self._reused).inc(len(records))
        self._written.inc(len(records))
        yield pa.Table.from_batches([table])


class ReuseStoredVectors(beam.PTransform):
    """prepared records → (records to embed, Tables of the rows whose vectors are copied from `files`, dead letters).

    Every record gets its content fingerprints (columns of the output either way); the join runs only when there
    is something stored to reuse. Images the join dropped are read again, bounded and checked as PrepareRecords
    does, for the records to embed only: reading an image twice costs less than shuffling all of them.
    """

    def __init__(self, files: Sequence[tuple[str, str]], schema: pa.Schema, passthrough: Sequence[str],
                 max_image_pixels: int, max_image_bytes: int):
        super().__init__()
        self._files = preference_order(files)
        self._schema = schema
        self._passthrough = tuple(passthrough)
        self._max_image_pixels = max_image_pixels
        self._max_image_bytes = max_image_bytes

    def expand(self, records):
        fingerprinted = records | "Fingerprint" >> beam.Map(fingerprint)
        if not self._files:
            nothing = records.pipeline | "NothingStored" >> beam.Create([])
            return fingerprinted, nothing, nothing
        stored = records.pipeline | "ReadStoredRefs" >> ReadStoredRefs(self._files)
        fresh, reused = (fingerprinted, stored) | "SplitByReuse" >> SplitByReuse()
        fresh, unreadable = route("RefetchImages", fresh, refetch_image, self._max_image_pixels,
                                  self._max_image_bytes)
        tables = (reused
                  | "ByStoredRowGroup" >> beam.GroupByKey()
                  | "CopyStoredVectors" >> beam.ParDo(CopyStoredVectors(self._files, self._schema,
                                                                        self._passthrough)))
        return fresh, tables, unreadable
