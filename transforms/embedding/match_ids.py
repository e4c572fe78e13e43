"""The records of one id: the first by source is kept and the others are dead-lettered (`duplicate_id`); with
stored outputs to reuse, the kept record is also matched to the stored rows of its id, and one whose content is
unchanged takes a stored row's vectors instead of being prepared and embedded.

Without stored outputs, DropDuplicateIds groups ids alone: a second read of the corpus gives (id, source) pairs,
the few losers reach the records as a side input, and the records stream on (on the in-process runner, a shuffle
holds its whole input in memory). With stored outputs, MatchIds shuffles the records themselves, beside the stored
rows, in chunks keyed by a bucket of their ids (`id_bucket`), and matches a bucket at a time:

    validated records ──► chunks ──► FingerprintChunks ──► group by bucket ◄── ReadStoredRefs (earlier outputs,
                                                              │                                 checkpoints)
                                                              │ duplicates ──► dead letters
                                                              │ unchanged  ──► ((file rank, row group),
                                                              │                 a chunk of (record, row))
                                                              ▼ new or changed
                                                         FetchImages (transforms.embedding.image_check)

A shuffle element costs the in-process runner its own Python objects and steps whatever it holds: in chunks, a night
of 20,000 records all reused took 5.5–6.8 s of pipeline instead of 8.8 (benchmarks/RESULTS.md). Records cross the
shuffle as pickled tuples.

Image bytes that can be read again (from a file, not a shard) never cross that shuffle: the records to prepare
read them again after it. To compare content before the shuffle, FingerprintContent reads each image and hashes it,
without decoding it nor, usually, parsing its header: the stored rows' images passed the same header checks
when they were embedded. Only when a stored output was judged by a looser --max_image_pixels than tonight's are
the headers checked before the match, so that a reused record is one tonight's checks would embed too.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam

from schemas.records import DeadLetter, Reason, Record, Stage
from transforms.dead_letters import DEAD_LETTER_TAG, RouteOutputs, dead_letter, printable
from transforms.embedding.image_check import ImageRefused, check_image, decoder_bytes, fingerprinted, read_image
from transforms.embedding.in_flight import InFlight, at_end_of_window
from transforms.embedding.reuse import (
    REUSED_TAG,
    ReadStoredRefs,
    StoredFile,
    StoredRef,
    id_bucket,
    pack_chunk,
    unpack_chunk,
)

# The image fingerprint of a record whose image could not be read or was refused before the match: no stored row
# has it, so the record goes on to FetchImages, which judges it again and dead-letters it with the reason.
UNMATCHABLE = ""
# Records cross the match's shuffle in chunks, not one by one: on the in-process runner each element of a shuffle
# costs its own Python objects and steps, and a chunk's images are fingerprinted side by side (FingerprintChunks).
CHUNK_RECORDS = 512
STORED_BYTES_PER_BUCKET = 256 * 1024 * 1024  # about 50,000 rows of the default encoders' vectors (match_buckets)
MIN_BUCKETS = 16


# Record's fields in order: a record crosses the shuffle as the tuple of their values (see `to_wire`).
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(Record))


def to_wire(record: Record) -> tuple:
    """A record as it crosses MatchIds' shuffle, in a chunk (transforms.embedding.reuse.pack_chunk). The in-process
    runner holds a shuffle's values as the Python objects they decode to: as pickled bytes a record weighed 1.6 KB there
    instead of 2.0 (measured when the duplicate check shuffled records too, benchmarks/RESULTS.md)."""
    return tuple(getattr(record, name) for name in RECORD_FIELDS)


def from_wire(values: tuple) -> Record:
    return Record(*values)


def natural_key(source: str) -> list:
    """Sort `file:10` after `file:9`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", source)]


def duplicate_letter(record: Record, kept_source: str) -> DeadLetter:
    return dead_letter(record, Stage.PREPARE, Reason.DUPLICATE_ID,
                       f"id {record.id!r} is also at {kept_source}, which is kept (the first by source)")


def duplicate_sources(group: tuple[str, Iterable[str]]) -> Iterator[tuple[str, str]]:
    """One id's printable sources → (source, the kept source) for each source but the kept one."""
    kept, *others = sorted(group[1], key=natural_key)
    for other in others:
        yield other, kept


def drop_duplicate(record: Record, losers: dict[str, str]) -> Iterator[Record | DeadLetter]:
    kept = losers.get(printable(record.source))
    yield record if kept is None else duplicate_letter(record, kept)


def fingerprint_content(record: Record, max_image_bytes: int, max_image_pixels: int | None) -> Record:
    """The record with its content fingerprints: its image read (bounded by `max_image_bytes`) and hashed as the
    decoder would get it, its header judged only with `max_image_pixels`; image bytes read from a file are not
    kept (the records to prepare read them again after the shuffle). An image that cannot be read, or that
    tonight's limits refuse, gets the UNMATCHABLE fingerprint."""
    data = record.image_bytes  # readers give an image as bytes or as a URI, never both
    refused = False
    try:
        if data is None and record.image_uri is not None:
            data = read_image(record.image_uri, max_image_bytes, max_image_pixels or sys.maxsize)
        if data is not None and len(data) > max_image_bytes:  # inline bytes over tonight's cap
            refused = True
        elif data is not None:
            data = (check_image(data, max_image_pixels, max_image_bytes) if max_image_pixels is not None
                    else decoder_bytes(data))
    except ImageRefused:
        refused = True
    if refused:
        return dataclasses.replace(record, image_sha256=UNMATCHABLE)
    return fingerprinted(record, data, image_bytes=None if record.image_uri is not None else data)


def match_buckets(stored_bytes: int) -> int:
    """How many buckets the match shuffles into: a bucket's records and stored rows are held together while it is
    matched, so one bucket per STORED_BYTES_PER_BUCKET of stored files, and at least MIN_BUCKETS for the workers to
    share. A chunk of records is cut into a piece per bucket: CHUNK_RECORDS is many times MIN_BUCKETS."""
    return max(MIN_BUCKETS, -(-stored_bytes // STORED_BYTES_PER_BUCKET))


def match_id(records: Sequence[Record], stored: Iterable[StoredRef]) -> tuple[Record, list[DeadLetter],
                                                                                  StoredRef | None]:
    """One id's records (at least one) and stored rows → (the first record by source, which is kept; dead letters
    for the others; the most preferred stored row of the kept record's content, or None when it must be embedded)."""
    kept, *others = sorted(records, key=lambda record: natural_key(printable(record.source)))
    duplicates = [duplicate_letter(other, printable(kept.source)) for other in others]
    matching = [ref for ref in stored if ref.matches(kept)]
    return kept, duplicates, max(matching, key=lambda ref: ref.rank) if matching else None


def match_bucket(group: tuple[int, dict[str, Iterable[bytes]]]) -> Iterator:
    """One bucket's chunks of records and of stored rows → its duplicate-id dead letters, its records to prepare,
    and its reused matches as ((rank, row group), a chunk of (record, row) pairs): one chunk per stored row group,
    whose vectors CopyStoredVectors then reads once. Ids gone from the input are gone from the output."""
    stored: dict[str, list[StoredRef]] = collections.defaultdict(list)
    for chunk in group[1]["stored"]:
        for row_id, *ref in unpack_chunk(chunk):
            stored[row_id].append(StoredRef(*ref))
    by_id: dict[str, list[Record]] = collections.defaultdict(list)
    for chunk in group[1]["record"]:
        for record in map(from_wire, unpack_chunk(chunk)):
            by_id[record.id].append(record)
    reused: dict[tuple[int, int], list[tuple[Record, int]]] = collections.defaultdict(list)
    for row_id, records in by_id.items():
        kept, duplicates, best = match_id(records, stored.get(row_id, ()))
        yield from duplicates
        if best is None:
            yield kept
        else:
            reused[best.rank, best.row_group].append((kept, best.row))
    for location, pairs in reused.items():
        yield beam.pvalue.TaggedOutput(REUSED_TAG, (location, pack_chunk(pairs)))


class FingerprintChunks(beam.DoFn):
    """Chunks of validated records → (bucket, the chunk's records of that bucket, fingerprinted, as a pickled list
    of wire tuples). Each chunk's images are read and hashed on a thread of its own, IN_FLIGHT_CHUNKS chunks at a
    time, while the bundle's thread reads and validates the next records: file reads and SHA-256 release the GIL.
    Measured on 52,500 photos (benchmarks/RESULTS.md): two chunks at a time read files not in the page cache 1.35 ×
    as fast as one; more threads, or a pool per chunk, were slower with the files cached, every thread waiting for
    the GIL between its short reads."""

    IN_FLIGHT_CHUNKS = 2

    def __init__(self, buckets: int, max_image_bytes: int, header_pixels: int | None):
        self._buckets = buckets
        self._max_image_bytes = max_image_bytes
        self._header_pixels = header_pixels
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: InFlight[list[tuple[int, bytes]]] = InFlight(self.IN_FLIGHT_CHUNKS)

    def setup(self):
        self._pool = ThreadPoolExecutor(self.IN_FLIGHT_CHUNKS, thread_name_prefix="hubembed-fingerprint")

    def start_bundle(self):
        self._in_flight.clear()

    def process(self, chunk: list[Record]) -> Iterator[tuple[int, bytes]]:
        for done in self._in_flight.add(self._pool.submit(self._fingerprint, chunk)):
            yield from done

    def finish_bundle(self) -> Iterator:
        for done in self._in_flight.drain():
            yield from map(at_end_of_window, done)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _fingerprint(self, chunk: list[Record]) -> list[tuple[int, bytes]]:
        by_bucket: dict[int, list[tuple]] = collections.defaultdict(list)
        for record in chunk:
            with_fingerprints = fingerprint_content(record, self._max_image_bytes, self._header_pixels)
            by_bucket[id_bucket(record.id, self._buckets)].append(to_wire(with_fingerprints))
        return [(bucket, pack_chunk(records)) for bucket, records in by_bucket.items()]


class DropDuplicateIds(beam.PTransform):
    """validated records → (records, duplicate-id dead letters); `again` holds the same validated records, from a
    second read of the corpus.

    Only (id, source) pairs are grouped, from the second read; the few losers reach the records as a side input,
    and the records stream past it, never held: on the in-process runner a shuffle holds its whole input in memory,
    and this one holds ids. The corpus must not change between the two reads, as during any run.
    """

    def __init__(self, again: beam.PCollection):
        super().__init__()
        self._again = again

    def expand(self, records):
        losers = (self._again
                  | "IdSource" >> beam.Map(lambda record: (record.id, printable(record.source)))
                  | "GroupById" >> beam.GroupByKey()
                  | "Losers" >> beam.FlatMap(duplicate_sources))
        outputs = records | "Drop" >> beam.ParDo(RouteOutputs(drop_duplicate), beam.pvalue.AsDict(losers)).with_outputs(
            DEAD_LETTER_TAG, main="records")
        return outputs.records, outputs[DEAD_LETTER_TAG]


class MatchIds(beam.PTransform):
    """validated records → (records to prepare, reused matches, duplicate-id dead letters): the records, in chunks,
    shuffled by a bucket of their id beside the stored rows of `stored_files` (in preference order,
    transforms.embedding.reuse.preference_order: their ranks are their indexes), and matched a bucket at a time."""

    def __init__(self, stored_files: Sequence[StoredFile], max_image_pixels: int, max_image_bytes: int):
        super().__init__()
        self._stored_files = list(stored_files)
        self._max_image_bytes = max_image_bytes
        looser = [file for file in self._stored_files
                  if file.max_image_pixels is None or file.max_image_pixels > max_image_pixels]
        self._header_pixels = max_image_pixels if looser else None
        self._buckets = match_buckets(sum(file.size_bytes for file in self._stored_files))

    def expand(self, records):
        keyed = (records
                 | "Chunks" >> beam.BatchElements(min_batch_size=CHUNK_RECORDS, max_batch_size=CHUNK_RECORDS)
                 | "FingerprintContent" >> beam.ParDo(FingerprintChunks(self._buckets, self._max_image_bytes,
                                                                        self._header_pixels)))
        stored = records.pipeline | "ReadStoredRefs" >> ReadStoredRefs(self._stored_files, self._buckets)
        outputs = ({"record": keyed, "stored": stored}
                   | "GroupByBucket" >> beam.CoGroupByKey()
                   | "Match" >> beam.ParDo(RouteOutputs(match_bucket)).with_outputs(
                       REUSED_TAG, DEAD_LETTER_TAG, main="records"))
        return outputs.records, outputs[REUSED_TAG], outputs[DEAD_LETTER_TAG]
