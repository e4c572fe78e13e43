"""PrepareRecords: validate ids and text, drop duplicate ids, fetch image bytes and check their headers.

Everything that can be judged without a model is judged here, so the embed step only sees records it can embed
(except images whose bytes are corrupt past the header, which only a decoder finds).
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from PIL import Image, UnidentifiedImageError

from schemas.records import DeadLetter, Reason, Record, Stage
from transforms.dead_letters import dead_letter, printable, route

# What TensorFlow's decode_image reads (PIL names); others are dead-lettered before they reach the decoder.
TF_DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP"})
# Leading bytes of the formats above: a file that starts like an image but will not open is corrupt, not a non-image.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel RGB image decodes to 120 MB of uint8, 480 MB of float32
# A million characters is a book, not a caption: text encoders keep a few hundred tokens of it, and an encoder
# whose work grows faster than the text must not see such a record.
DEFAULT_MAX_TEXT_CHARS = 1_000_000


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


def natural_key(source: str) -> list:
    """Sort `file:10` after `file:9`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", source)]


def duplicate_sources(group: tuple[str, Iterable[str]]) -> Iterator[tuple[str, str]]:
    """For an id seen more than once: every source but the first (natural order) → the kept source."""
    _, sources = group
    ordered = sorted(sources, key=natural_key)
    for source in ordered[1:]:
        yield source, ordered[0]


def drop_duplicate(record: Record, duplicates: dict[str, str]) -> Iterator[Record | DeadLetter]:
    kept = duplicates.get(printable(record.source))
    if kept is None:
        yield record
    else:
        yield dead_letter(record, Stage.PREPARE, Reason.DUPLICATE_ID,
                          f"id {record.id!r} is also at {kept}, which is kept (the first by source)")


def fetch_and_check_image(record: Record, max_pixels: int) -> Iterator[Record | DeadLetter]:
    """Read the image's bytes if it came as a URI, then check its header: format and pixel count, not decoding."""
    if record.image_uri is not None and record.image_bytes is None:
        try:
            with FileSystems.open(record.image_uri) as handle:
                record = dataclasses.replace(record, image_bytes=handle.read())
        except Exception as error:  # BeamIOError / FileNotFoundError / permission errors, by filesystem
            yield dead_letter(record, Stage.PREPARE, Reason.IMAGE_MISSING, error)
            return
    if record.image_bytes is None:
        yield record
        return
    if not record.image_bytes:
        yield dead_letter(record, Stage.PREPARE, Reason.IMAGE_EMPTY, "the image file has zero bytes")
        return
    try:
        with Image.open(io.BytesIO(record.image_bytes)) as header:  # reads the header only
            image_format, (width, height) = header.format, header.size
    except Image.DecompressionBombError as error:
        yield dead_letter(record, Stage.PREPARE, Reason.IMAGE_TOO_LARGE, error)
        return
    except (UnidentifiedImageError, OSError, ValueError) as error:
        corrupt = record.image_bytes.startswith(IMAGE_SIGNATURES)
        yield dead_letter(record, Stage.PREPARE, Reason.IMAGE_CORRUPT if corrupt else Reason.NOT_AN_IMAGE, error)
        return
    if image_format not in TF_DECODABLE_FORMATS:
        yield dead_letter(record, Stage.PREPARE, Reason.NOT_AN_IMAGE,
                          f"{image_format} images are not decoded; use one of "
                          f"{', '.join(sorted(TF_DECODABLE_FORMATS))}")
        return
    if width * height > max_pixels:
        yield dead_letter(record, Stage.PREPARE, Reason.IMAGE_TOO_LARGE,
                          f"{width}x{height} = {width * height} pixels is over --max_image_pixels={max_pixels}")
        return
    yield record


class PrepareRecords(beam.PTransform):
    """records → (records ready to embed, dead_letters)."""

    def __init__(self, use_image: bool, use_text: bool, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS):
        super().__init__()
        self._use_image = use_image
        self._use_text = use_text
        self._max_image_pixels = max_image_pixels
        self._max_text_chars = max_text_chars

    def expand(self, records):
        valid, invalid = route("Validate", records, validate_record, self._use_image, self._use_text,
                                self._max_text_chars)
        # Duplicate ids: shuffle only (id, source) pairs, never the records, and hand the few losers to a
        # side input; the records themselves stay where they are.
        duplicates = (valid
                      | "IdSource" >> beam.Map(lambda record: (record.id, printable(record.source)))
                      | "GroupById" >> beam.GroupByKey()
                      | "Losers" >> beam.FlatMap(duplicate_sources))
        unique, duplicated = route("DropDuplicateIds", valid, drop_duplicate, beam.pvalue.AsDict(duplicates))
        ready, unreadable = route("FetchImages", unique, fetch_and_check_image, self._max_image_pixels)
        dead = (invalid, duplicated, unreadable) | "MergeDeadLetters" >> beam.Flatten()
        return ready, dead
