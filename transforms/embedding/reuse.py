"""Reuse: a record unchanged since an earlier output takes its vectors from there, never decoded nor embedded.

Unchanged means: the same id, the same image bytes and text (their SHA-256, columns of every output, so reuse needs
no other state), and the same encoders, preprocessing, L2 setting and storage (the `hubembed.reuse_key` of the
files, checked at start). The label and passthrough columns come from today's input: they are not inputs of the
encoders, so a changed label alone does not re-embed.

Here: which stored files may be reused (`find_reusable_files`, `usable_checkpoints`, in `preference_order`), where
each stored row lives (`ReadStoredRefs`: id, fingerprints, file, row group, row; no vector), and, once
transforms.embedding.match_ids has matched records to stored rows by id, `CopyStoredVectors`: the matches grouped by
stored row group, each group's vectors read from Parquet once and taken into the output table as Arrow columns.
"""

from __future__ import annotations

import collections
import json
import logging
import pickle
import posixpath
import zlib
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
from schemas.records import Record
from transforms.dead_letters import METRICS_NAMESPACE, RECORDS_EMBEDDED
from transforms.embedding.files import matching_files, matching_paths
from transforms.embedding.image_check import sha256_hex
from transforms.embedding.rows import choose_arrow_memory_pool, record_columns

log = logging.getLogger("hubembed")

REUSED_TAG = "reused"
RECORDS_REUSED = "records_reused"  # rows taken from --reuse outputs
RECORDS_RESUMED = "records_resumed"  # rows taken from this output's checkpoints (a killed run's finished batches)
ORIGIN_REUSE, ORIGIN_CHECKPOINT = "reuse", "checkpoint"


class ReuseConfigError(ValueError):
    """A --reuse output that cannot be reused; the message is one line, fit for the console."""


def reuse_key(metadata: Mapping[str, str]) -> str:
    """The digest that must be equal for an output's vectors to be reused: the encoders' content identity (not
    their paths), the image preprocessing, L2 and layout (`embeddings_identity`), how the vectors are stored, and
    the precision they were computed in."""
    from transforms.downstream.embeddings_input import embeddings_identity  # imports the encoders' TF runtime

    return _reuse_key(embeddings_identity(dict(metadata)), metadata)


def accepted_reuse_keys(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The reuse keys of outputs this run's vectors may be taken from: its own, and the key an older hubembed wrote
    for the same encoders, before it fingerprinted the modules' functions (`embeddings_input.same_identity`). An
    output written since has its functions' fingerprints in its key, so only the first can match it."""
    from transforms.downstream.embeddings_input import embeddings_identity, without_functions_fingerprints

    identity = embeddings_identity(dict(metadata))
    keys = (_reuse_key(identity, metadata), _reuse_key(without_functions_fingerprints(identity), metadata))
    return tuple(dict.fromkeys(keys))


def _reuse_key(identity: dict, metadata: Mapping[str, str]) -> str:
    keyed = {"identity": identity, "storage": metadata.get(cols.META_STORAGE)}
    precision = metadata.get(cols.META_COMPUTE_PRECISION, cols.PRECISION_FLOAT32)
    # Only when mixed: float32 outputs written before the key existed keep their reuse key.
    if precision != cols.PRECISION_FLOAT32:
        keyed["precision"] = precision
    return sha256_hex(json.dumps(keyed, sort_keys=True).encode())


class StoredFile(NamedTuple):
    """An output file whose vectors may be copied, where it comes from, and the pixel limit its images met."""

    path: str
    origin: str  # ORIGIN_REUSE or ORIGIN_CHECKPOINT
    max_image_pixels: int | None  # None for files written before the limit was recorded
    size_bytes: int  # what sizes the match's shuffle (transforms.embedding.match_ids.match_buckets)


def _stored_file(path: str, size_bytes: int, origin: str, metadata: Mapping[str, str]) -> StoredFile:
    limit = metadata.get(cols.META_MAX_IMAGE_PIXELS)
    return StoredFile(path, origin, int(limit) if limit else None, size_bytes)


def _file_metadata(path: str) -> dict[str, str]:
    with FileSystems.open(path) as handle:
        return cols.read_metadata(pq.ParquetFile(handle).schema_arrow)


def find_reusable_files(patterns: Sequence[str], keys: Sequence[str]) -> list[StoredFile]:
    """The embeddings files of the published outputs (`_SUCCESS`) that `patterns` (folders or globs of folders)
    name. Raises ReuseConfigError for an output made with other encoders or settings; an output without
    `_SUCCESS` (a failed or running night) is never read."""
    files: list[StoredFile] = []
    for pattern in patterns:
        folders = [posixpath.dirname(path) for path in matching_paths(FileSystems.join(pattern.rstrip("/"),
                                                                                   layout.SUCCESS_NAME))]
        if not folders:
            log.warning("--reuse %s names no published output (no _SUCCESS): nothing reused from it", pattern)
        for folder in folders:
            found_files = matching_files(FileSystems.join(folder, layout.EMBEDDINGS_PREFIX + "-*" +
                                                          layout.PARQUET_SUFFIX))
            if not found_files:
                continue
            metadata = _file_metadata(found_files[0][0])  # a run's files share their metadata
            found = metadata.get(cols.META_REUSE_KEY)
            if found not in keys:
                why = "has no content fingerprints (written before reuse existed)" if found is None else \
                    "was embedded with other encoders, preprocessing, L2 setting or storage"
                raise ReuseConfigError(f"--reuse {folder} {why}: its vectors cannot be reused by this run; "
                                       "drop it from --reuse")
            files += [_stored_file(path, size, ORIGIN_REUSE, metadata) for path, size in found_files]
    return sorted(set(files))


def usable_checkpoints(files: Sequence[tuple[str, int]], keys: Sequence[str]) -> list[StoredFile]:
    """A killed run's checkpoint files (path, size in bytes) that this run can take back: those made with one of
    `keys` (accepted_reuse_keys)."""
    metadata = {path: _file_metadata(path) for path, _ in files}
    usable = [_stored_file(path, size, ORIGIN_CHECKPOINT, metadata[path]) for path, size in files
              if metadata[path].get(cols.META_REUSE_KEY) in keys]
    if len(usable) < len(files):
        log.info("ignoring %d checkpoint files of a run with other settings", len(files) - len(usable))
    return usable


class StoredRef(NamedTuple):
    """Where one stored row lives, and the content it was embedded from: all that crosses the join, as a tuple in a
    pickled chunk (read_stored_refs). The vectors stay in their file until the rows to copy are known, then move as
    Arrow columns, never as Python objects."""

    image_sha256: str | None
    text_sha256: str | None
    rank: int  # the file's index in the preference order: the highest wins (see `preference_order`)
    row_group: int
    row: int  # within the row group

    def matches(self, record: Record) -> bool:
        return (self.image_sha256, self.text_sha256) == (record.image_sha256, record.text_sha256)


def preference_order(files: Sequence[StoredFile]) -> list[StoredFile]:
    """Stored files from the least to the most preferred: a checkpoint of this output over --reuse outputs, then
    the path that sorts last (the newest `dt=` partition). Any choice holds the same bits for the same content;
    the order only makes the choice deterministic. A file's index in this order is its rank in StoredRef."""
    return sorted(set(files), key=lambda file: (file.origin == ORIGIN_CHECKPOINT, file.path))


_REF_COLUMNS = (cols.ID, cols.IMAGE_SHA256, cols.TEXT_SHA256)


def pack_chunk(items: list) -> bytes:
    """A chunk of the match's records, stored rows or reused pairs as it crosses a shuffle: one pickled list, one
    shuffle element (pickle, not Beam's coders, keeps the surrogate-escaped bytes of odd file names)."""
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_chunk(chunk: bytes) -> list:
    return pickle.loads(chunk)


def id_bucket(record_id: str, buckets: int) -> int:
    """The bucket of an id in transforms.embedding.match_ids' shuffle, the same in every process (Python's own str
    hash is salted per process): records and stored rows of one id meet in one bucket."""
    return zlib.crc32(record_id.encode("utf-8")) % buckets


def read_stored_refs(rank: int, path: str, buckets: int) -> Iterator[tuple[int, bytes]]:
    """The rows of one output file, read a row group at a time with their vectors left unread → for each bucket of
    each row group, (bucket, the pickled list of its rows' (id, *StoredRef))."""
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        for row_group in range(parquet.num_row_groups):
            table = parquet.read_row_group(row_group, columns=[name for name in _REF_COLUMNS if name in names])
            ids = table.column(cols.ID).to_pylist()
            image, text = ([None] * len(ids) if name not in names else table.column(name).to_pylist()
                           for name in (cols.IMAGE_SHA256, cols.TEXT_SHA256))
            by_bucket: dict[int, list[tuple]] = collections.defaultdict(list)
            for row, row_id in enumerate(ids):
                by_bucket[id_bucket(row_id, buckets)].append((row_id, image[row], text[row], rank, row_group, row))
            for bucket, refs in by_bucket.items():
                yield bucket, pack_chunk(refs)


class ReadStoredRefs(beam.PTransform):
    """Output files in preference order → (bucket, a pickled chunk of (id, *StoredRef)) (see read_stored_refs)."""

    def __init__(self, files: Sequence[StoredFile], buckets: int):
        super().__init__()
        self._paths = [file.path for file in files]
        self._buckets = buckets

    def expand(self, pipeline):
        return (pipeline
                | "Files" >> beam.Create(list(enumerate(self._paths)))
                | "Refs" >> beam.FlatMap(lambda ranked, buckets: read_stored_refs(*ranked, buckets), self._buckets))


class CopyRowGroupVectors(beam.DoFn):
    """One stored row group and the records that reuse its rows → one pyarrow Table of the output schema: the
    vector columns read from the row group and taken row by row in Arrow, the bits untouched."""

    def __init__(self, files: Sequence[StoredFile], schema: pa.Schema, passthrough: Sequence[str]):
        self._files = list(files)
        self._schema = schema
        self._passthrough = tuple(passthrough)
        self._vector_columns = [field.name for field in schema if pa.types.is_fixed_size_list(field.type)]
        self._reused = Metrics.counter(METRICS_NAMESPACE, RECORDS_REUSED)
        self._resumed = Metrics.counter(METRICS_NAMESPACE, RECORDS_RESUMED)
        self._written = Metrics.counter(METRICS_NAMESPACE, RECORDS_EMBEDDED)  # every output row, fresh or reused

    def setup(self):
        choose_arrow_memory_pool()  # on a remote worker, whose process the job did not start (as EmbedBatch.setup)

    def process(self, group: tuple[tuple[int, int], Iterable[bytes]]) -> Iterator[pa.Table]:
        (rank, row_group), chunks = group
        pairs: list[tuple[Record, int]] = [pair for chunk in chunks for pair in unpack_chunk(chunk)]
        records = [record for record, _ in pairs]
        rows = pa.array([row for _, row in pairs], pa.int64())
        stored_file = self._files[rank]
        with FileSystems.open(stored_file.path) as handle:
            stored = pq.ParquetFile(handle).read_row_group(row_group, columns=list(self._vector_columns))
        vectors = {name: stored.column(name).take(rows).combine_chunks() for name in self._vector_columns}
        # The masks say which modality was embedded: the same as which one has content, since the hashes match.
        table = record_columns(records, self._schema, self._passthrough,
                               np.array([record.image_sha256 is not None for record in records], bool),
                               np.array([record.text_sha256 is not None for record in records], bool), vectors)
        (self._resumed if stored_file.origin == ORIGIN_CHECKPOINT else self._reused).inc(len(records))
        self._written.inc(len(records))
        yield pa.Table.from_batches([table])


class CopyStoredVectors(beam.PTransform):
    """Reused matches ((file rank, row group), a pickled chunk of (record, row) pairs) → Tables of the output
    schema, one per stored row group, the vectors copied from `files` (in preference order, as the matches'
    ranks)."""

    def __init__(self, files: Sequence[StoredFile], schema: pa.Schema, passthrough: Sequence[str]):
        super().__init__()
        self._files = list(files)
        self._schema = schema
        self._passthrough = tuple(passthrough)

    def expand(self, matches):
        return (matches
                | "ByStoredRowGroup" >> beam.GroupByKey()
                | "Copy" >> beam.ParDo(CopyRowGroupVectors(self._files, self._schema, self._passthrough)))
