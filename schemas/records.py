"""The record every reader emits, and the reasons a record can be dead-lettered."""

from __future__ import annotations

import dataclasses
from typing import Any

MANIFEST_FORMATS = ("jsonl", "csv", "parquet")
INPUT_FORMATS = (*MANIFEST_FORMATS, "image_folder", "webdataset", "tfrecord")  # what ReadCorpus reads
# The limits PrepareRecords holds a record to (the flags' defaults):
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel RGB image decodes to 120 MB of uint8, 480 MB of float32
# A 40-megapixel photo is 10-30 MB as JPEG and rarely over 64 MB as PNG; bytes are capped before pixels can be.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
# A million characters is a book, not a caption: text encoders keep a few hundred tokens of it, and an encoder
# whose work grows faster than the text must not see such a record.
DEFAULT_MAX_TEXT_CHARS = 1_000_000


@dataclasses.dataclass
class Record:
    """One input row, whatever the input format.

    `source` says where the row came from (`file:line`, `shard.tar#key`, `file.tfrecord#n`), so a dead letter
    can be traced back. An image comes as bytes (WebDataset, TFRecord, `image_bytes` columns) or as a URI that
    `PrepareRecords` fetches. `text` is bytes until validated as UTF-8, then str.
    """

    id: str | None
    source: str
    image_bytes: bytes | None = None
    image_uri: str | None = None
    text: str | bytes | None = None
    label: str | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    # SHA-256 (hex) of the image bytes and of the UTF-8 text (transforms.embedding.image_check.fingerprinted): with the
    # encoders' identity, what decides whether an earlier output's vectors can be reused for this record.
    image_sha256: str | None = None
    text_sha256: str | None = None
    # Width x height from the image's header, set when PrepareRecords checks it: what the record weighs in a batch.
    image_pixels: int | None = None


@dataclasses.dataclass
class DeadLetter:
    """A record that could not be embedded, and why."""

    id: str | None
    source: str
    stage: str
    reason: str
    error_class: str
    message: str


class Stage:
    READ = "read"
    PREPARE = "prepare"
    EMBED = "embed"


class Reason:
    """Stable codes for the run report and the dead-letter `reason` column."""

    UNREADABLE_ROW = "unreadable_row"  # a row that does not parse, or the unreadable rest of a broken file (one letter)
    UNSUPPORTED_FILE = "unsupported_file"  # neither image nor text in a folder; a FIFO/device/folder given as a file
    MISSING_ID = "missing_id"
    INVALID_ID = "invalid_id"  # an id that is not text (a list, object, float, bool) or not valid UTF-8
    INVALID_FIELD = "invalid_field"  # a field of the wrong type, or a label / passthrough value that is not UTF-8
    DUPLICATE_ID = "duplicate_id"
    NO_MODALITY = "no_modality"  # nothing the configured encoders can embed
    TEXT_NOT_UTF8 = "text_not_utf8"
    TEXT_TOO_LONG = "text_too_long"  # more characters than --max_text_chars
    IMAGE_MISSING = "image_missing"
    IMAGE_EMPTY = "image_empty"
    IMAGE_NOT_A_FILE = "image_not_a_file"  # the image path is a folder, a FIFO, a device or a socket: never read
    NOT_AN_IMAGE = "not_an_image"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_CORRUPT = "image_corrupt"
    ENCODER_FAILED = "encoder_failed"
