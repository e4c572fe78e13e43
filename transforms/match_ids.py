"""The records of one id: the first by source is kept and the others are dead-lettered (`duplicate_id`); with
stored outputs to reuse, the kept record is also matched to the stored rows of its id, and one whose content is
unchanged takes a stored row's vectors instead of being prepared and embedded.

Without stored outputs, DropDuplicateIds groups ids alone: a second read of the corpus gives (id, source) pairs,
the few losers reach the records as a side input, and the records stream on (on the in-process runner, a shuffle
holds its whole input in memory). With stored outputs, MatchIds shuffles the records themselves by id, beside the
stored rows:

    validated records ──► FingerprintContent ──► group by id ◄── ReadStoredRefs (earlier outputs, checkpoints)
                                                   │ duplicates ──► dead letters
                                                   │ unchanged  ──► ((file rank, row group), (record, row))
                                                   ▼ new or changed
                                              FetchImages (transforms.image_check)

Image bytes that can be read again (from a file, not a shard) never cross that shuffle: the records to prepare
read them again after it. To compare content before the shuffle, FingerprintContent reads each image and hashes it,
without decoding it nor, usually, parsing its header: the stored rows' images passed the same header checks
when they were embedded. Only when a stored output was judged by a looser --max_image_pixels than tonight's are
the headers checked before the match, so that a reused record is one tonight's checks would embed too.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam

from schemas.records import DeadLetter, Reason, Record, Stage
from transforms.dead_letters import DEAD_LETTER_TAG, RouteOutputs, dead_letter, printable
from transforms.image_check import ImageRefused, check_image, decoder_bytes, fingerprinted, read_image
from transforms.reuse import REUSED_TAG, ReadStoredRefs, StoredFile, StoredRef

# The image fingerprint of a record whose image could not be read or was refused before the match: no stored row
# has it, so the record goes on to FetchImages, which judges it again and dead-letters it with the reason.
UNMATCHABLE = ""


# Record's fields in order: a record crosses the shuffle as the pickled tuple of their values (see `to_wire`).
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(Record))


def to_wire(record: Record) -> bytes:
    """A record as it crosses MatchIds' shuffle. The in-process runner holds a shuffle's values as the Python objects
    they decode to: as these bytes a record weighed 1.6 KB there instead of 2.0 (measured when the duplicate check
    shuffled records too, benchmarks/RESULTS.md). Pickle, not Beam's coders: it keeps the surrogate-escaped bytes
    of odd file names."""
    return pickle.dumps(tuple(getattr(record, name) for name in RECORD_FIELDS), protocol=pickle.HIGHEST_PROTOCOL)


def from_wire(data: bytes) -> Record:
    return Record(*pickle.loads(data))


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


def match_id(records: Iterable[Record], stored: Iterable[StoredRef]) -> Iterator:
    """One id's records and stored rows → dead letters for all records but the first by source, and the first
    itself: as a reused match ((rank, row group), (record, row)) to the most preferred stored row of the same
    content, or as a record to prepare."""
    ordered = sorted(records, key=lambda record: natural_key(printable(record.source)))
    if not ordered:
        return  # gone from the input: gone from the output
    kept, *others = ordered
    for other in others:
        yield duplicate_letter(other, printable(kept.source))
    matching = [ref for ref in stored if ref.matches(kept)]
    if matching:
        best = max(matching, key=lambda ref: ref.rank)
        yield beam.pvalue.TaggedOutput(REUSED_TAG, ((best.rank, best.row_group), (kept, best.row)))
    else:
        yield kept


def _match_joined(group: tuple[str, dict[str, Iterable]]) -> Iterator:
    return match_id(map(from_wire, group[1]["record"]), group[1]["stored"])


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
    """validated records → (records to prepare, reused matches, duplicate-id dead letters): one shuffle of the
    records by id, with the stored rows of `stored_files` (in preference order, transforms.reuse.preference_order:
    their ranks are their indexes)."""

    def __init__(self, stored_files: Sequence[StoredFile], max_image_pixels: int, max_image_bytes: int):
        super().__init__()
        self._stored_files = list(stored_files)
        self._max_image_bytes = max_image_bytes
        looser = [file for file in self._stored_files
                  if file.max_image_pixels is None or file.max_image_pixels > max_image_pixels]
        self._header_pixels = max_image_pixels if looser else None

    def expand(self, records):
        keyed = records | "FingerprintContent" >> beam.Map(
            lambda record, size, pixels: (record.id, to_wire(fingerprint_content(record, size, pixels))),
            self._max_image_bytes, self._header_pixels)
        stored = records.pipeline | "ReadStoredRefs" >> ReadStoredRefs(self._stored_files)
        outputs = ({"record": keyed, "stored": stored}
                   | "GroupById" >> beam.CoGroupByKey()
                   | "Match" >> beam.ParDo(RouteOutputs(_match_joined)).with_outputs(
                       REUSED_TAG, DEAD_LETTER_TAG, main="records"))
        return outputs.records, outputs[REUSED_TAG], outputs[DEAD_LETTER_TAG]
