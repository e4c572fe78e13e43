"""PrepareRecords: validate ids and text, drop duplicate ids and match stored rows (transforms.embedding.match_ids),
fetch image bytes and check their headers (transforms.embedding.image_check).

Everything that can be judged without a model is judged here, so the embed step only sees records it can embed
(except images whose bytes are corrupt past the header, which only a decoder finds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import apache_beam as beam

from schemas.records import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_TEXT_CHARS,
    DeadLetter,
    Reason,
    Record,
    Stage,
)
from transforms.dead_letters import dead_letter, printable, route
from transforms.embedding.image_check import fetch_and_check_image
from transforms.embedding.match_ids import DropDuplicateIds, MatchIds
from transforms.embedding.reuse import StoredFile


def _not_utf8(value: str | None) -> str | None:
    """Why `value` cannot be written as a Parquet string (bytes that are not UTF-8 kept by surrogateescape, lone
    surrogates from a JSON `\\ud800`), or None when it can."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"{printable(value)!r} is not valid UTF-8 ({error.reason} at character {error.start})"
    return None


def validate_record(record: Record, use_image: bool, use_text: bool,
                    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> Iterator[Record | DeadLetter]:
    """Ids present and valid UTF-8, labels and passthrough values too, text valid UTF-8 and within
    `max_text_chars` (blank text counts as none), and something the encoders can embed."""
    if record.id is None or not str(record.id).strip():
        yield dead_letter(record, Stage.PREPARE, Reason.MISSING_ID, "the record has no id")
        return
    problem = _not_utf8(record.id)
    if problem:
        yield dead_letter(record, Stage.PREPARE, Reason.INVALID_ID, f"the id {problem}")
        return
    for field, value in (("label", record.label), *record.extras.items()):
        problem = _not_utf8(value) if isinstance(value, str) else None
        if problem:
            yield dead_letter(record, Stage.PREPARE, Reason.INVALID_FIELD, f"{field}: {problem}")
            return
    text = record.text
    if text is not None and use_text:
        try:
            text = text.decode("utf-8") if isinstance(text, bytes) else text
            text.encode("utf-8")  # a str read with surrogateescape still holds the invalid bytes
        except UnicodeError as error:
            yield dead_letter(record, Stage.PREPARE, Reason.TEXT_NOT_UTF8, error)
            return
        if len(text) > max_text_chars:
            yield dead_letter(record, Stage.PREPARE, Reason.TEXT_TOO_LONG,
                              f"{len(text):,} characters is over --max_text_chars={max_text_chars:,}")
            return
        text = text if text.strip() else None
    has_image = use_image and (record.image_bytes is not None or record.image_uri is not None)
    has_text = use_text and text is not None
    if not (has_image or has_text):
        missing = [name for name, used in (("image", use_image), ("text", use_text)) if used]
        yield dead_letter(record, Stage.PREPARE, Reason.NO_MODALITY,
                          f"nothing to embed: the record has no {' and no '.join(missing)}")
        return
    # Beam may share an input element between consumers: emit a new record rather than change this one.
    yield dataclasses.replace(record, text=text if has_text else None,
                              image_bytes=record.image_bytes if has_image else None,
                              image_uri=record.image_uri if has_image else None)


class PrepareRecords(beam.PTransform):
    """records → (records ready to embed, records whose vectors are copied from `stored_files`, dead_letters).

        validate ──► duplicate ids dropped (and, with stored files, stored rows matched) ──► FetchImages
                                └──► reused: ((stored file rank, row group), (record, row)), for CopyStoredVectors

    Without stored files the reused output is empty, and `again` (the corpus read again, ReadCorpus.again) gives
    the duplicate check its ids (transforms.embedding.match_ids). Records come out of FetchImages with their image bytes
    checked by header and their content fingerprints.
    """

    def __init__(self, again: beam.PTransform, use_image: bool, use_text: bool,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, stored_files: Sequence[StoredFile] = ()):
        super().__init__()
        self._again = again
        self._use_image = use_image
        self._use_text = use_text
        self._max_image_pixels = max_image_pixels
        self._max_text_chars = max_text_chars
        self._max_image_bytes = max_image_bytes
        self._stored_files = list(stored_files)

    def expand(self, records):
        validate = (validate_record, self._use_image, self._use_text, self._max_text_chars)
        valid, invalid = route("Validate", records, *validate)
        if self._stored_files:
            unique, reused, duplicated = valid | "MatchIds" >> MatchIds(self._stored_files, self._max_image_pixels,
                                                                        self._max_image_bytes)
        else:
            again, _ = records.pipeline | "ReadIds" >> self._again  # its dead letters are the first read's
            valid_again, _ = route("ValidateIds", again, *validate)
            unique, duplicated = valid | "DropDuplicateIds" >> DropDuplicateIds(valid_again)
            reused = records.pipeline | "NothingReused" >> beam.Create([])
        ready, unreadable = route("FetchImages", unique, fetch_and_check_image, self._max_image_pixels,
                                  self._max_image_bytes)
        dead = (invalid, duplicated, unreadable) | "MergeDeadLetters" >> beam.Flatten()
        return ready, reused, dead
