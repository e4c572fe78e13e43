"""Image files read and judged without decoding: bounded reads, header checks, and the content fingerprints.

Everything here works on bytes and headers (PIL reads the header only): the embed step's decoder
(transforms.image_decode) is the only place pixels are decoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterator
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, UnidentifiedImageError

from schemas.records import DEFAULT_MAX_IMAGE_BYTES, DeadLetter, Reason, Record, Stage
from transforms.dead_letters import dead_letter
from transforms.embedding.files import special_kind

# What TensorFlow's decode_image reads (PIL names); others are dead-lettered before they reach the decoder. MPO, the
# multi-picture file of many cameras, is a JPEG with more pictures after it: TensorFlow decodes the first.
TF_DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
# Leading bytes of the formats above: a file that starts like an image but will not open is corrupt, not a non-image.
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", *GIF_SIGNATURES, b"BM", b"RIFF")
# A file up to this size is read at once; a larger one is judged by this head before the rest is read (PNG, GIF,
# BMP and WebP headers are in their first bytes, a JPEG's frame header after APP segments of at most 64 KiB each).
IMAGE_HEAD_BYTES = 1024 * 1024

class ImageRefused(Exception):
    """An image the job will not decode, and the dead-letter reason why; `error` is the underlying exception or a
    message."""

    def __init__(self, reason: str, error: Exception | str):
        super().__init__(str(error))
        self.reason = reason
        self.error = error


def _judge_file(info: os.stat_result, path: str, max_bytes: int) -> None:
    """Refuse a local path that is not a regular file (a FIFO blocks a read for ever, a device such as /dev/zero
    never ends, a folder is no image) or whose size is over the cap."""
    kind = special_kind(info.st_mode)
    if kind:
        raise ImageRefused(Reason.IMAGE_NOT_A_FILE, f"{path} is {kind}, not an image file")
    if info.st_size > max_bytes:
        raise ImageRefused(Reason.IMAGE_TOO_LARGE,
                           f"the image file has {info.st_size} bytes, over --max_image_bytes={max_bytes}")


def _open_image(uri: str, max_bytes: int) -> tuple[BinaryIO, int | None]:
    """The image at `uri` opened for reading, its bytes as they are (never decompressed by extension), and its size
    when the file system tells it without a request of its own (local files)."""
    if FileSystems.get_scheme(uri) is not None:
        # Object stores hold neither FIFOs nor devices, and the read stops one byte over the cap: no size request.
        return FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED), None
    _judge_file(os.stat(uri), uri, max_bytes)  # before opening: opening a device can act by itself
    # Non-blocking, so that a FIFO put in the file's place since the stat cannot block the open; fstat tells.
    handle = open(os.open(uri, os.O_RDONLY | os.O_NONBLOCK), "rb")  # noqa: SIM115 (closed by the caller)
    try:
        info = os.fstat(handle.fileno())
        _judge_file(info, uri, max_bytes)
    except ImageRefused:
        handle.close()
        raise
    return handle, info.st_size


def read_image(uri: str, max_bytes: int, max_pixels: int) -> bytes:
    """The bytes of the image at `uri`, never more than `max_bytes` + 1 of them read; a file with more is refused
    (ImageRefused), and so is a large file whose head already shows it is no image TensorFlow decodes."""
    limit = max_bytes + 1  # one byte over the cap tells "too large" without reading the rest
    try:
        handle, size = _open_image(uri, max_bytes)
        # A known size sizes the reads (a read of `limit` bytes would allocate that much first).
        end = limit if size is None else min(limit, size + 1)
        with handle:
            data = handle.read(min(IMAGE_HEAD_BYTES, end))
            if IMAGE_HEAD_BYTES == len(data) < end:  # more may follow: judge the head before reading it
                _judge_head(data, max_pixels)
                data += handle.read(end - len(data))
    except ImageRefused:
        raise
    except Exception as error:  # BeamIOError / FileNotFoundError / permission errors, by filesystem
        raise ImageRefused(Reason.IMAGE_MISSING, error) from error
    if len(data) > max_bytes:
        raise ImageRefused(Reason.IMAGE_TOO_LARGE, f"the image has more than --max_image_bytes={max_bytes} bytes")
    return data


def _header(data: bytes) -> tuple[str, int, int]:
    """(PIL format, width, height) from the header alone; ImageRefused when PIL cannot read one."""
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            return header.format, *header.size
    except Image.DecompressionBombError as error:
        raise ImageRefused(Reason.IMAGE_TOO_LARGE, error) from error
    except MemoryError:
        raise
    except Exception as error:  # UnidentifiedImageError, OSError, ValueError, EOFError...: whatever a bad header raises
        corrupt = data.startswith(IMAGE_SIGNATURES)
        reason = Reason.IMAGE_CORRUPT if corrupt else Reason.NOT_AN_IMAGE
        if isinstance(error, UnidentifiedImageError):  # whose message names nothing but a BytesIO object
            raise ImageRefused(reason, f"its header does not parse, though it starts like an image ({data[:8]!r})"
                               if corrupt else f"no image format starts with {data[:16]!r}") from error
        raise ImageRefused(reason, error) from error


def _unsupported_variant(image_format: str, data: bytes) -> str | None:
    """Why TensorFlow would refuse or garble this image although its format is one it reads, from header bytes."""
    if image_format == "WEBP" and data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02:
        # TF's WebP decoder refuses an animation as RGB, and as RGBA says the channels do not match.
        return "an animated WebP: TensorFlow decodes still WebP images only (save its first frame as a still image)"
    if image_format == "BMP" and len(data) >= 34:
        info_size = int.from_bytes(data[14:18], "little")
        bits = int.from_bytes(data[28:30], "little")
        compression = int.from_bytes(data[30:34], "little")
        if info_size < 40:
            return "an OS/2 BMP: TensorFlow decodes Windows BMPs only"
        if bits not in (8, 24, 32):
            return f"a {bits}-bit BMP: TensorFlow decodes 24- and 32-bit BMPs (and 8-bit ones, through their palette)"
        if compression not in (0, 3):  # 1, 2: run-length encoded; 4, 5: a JPEG or PNG inside
            return f"a compressed BMP (compression {compression}): TensorFlow decodes uncompressed BMPs only"
        masks = [int.from_bytes(data[at:at + 4], "little") for at in (54, 58, 62)]
        if compression == 3 and (bits != 32 or masks != [0xFF0000, 0xFF00, 0xFF]):
            return "a BMP with colour bit masks TensorFlow does not read (it reads 32-bit BGRA)"
    return None


def _judge(image_format: str, width: int, height: int, data: bytes, max_pixels: int) -> None:
    """Refuse by the header: a format or variant TensorFlow does not decode, or too many pixels."""
    if image_format not in TF_DECODABLE_FORMATS:
        raise ImageRefused(Reason.NOT_AN_IMAGE, f"{image_format} images are not decoded; use one of "
                                                f"{', '.join(sorted(TF_DECODABLE_FORMATS))}")
    if width * height > max_pixels:
        raise ImageRefused(Reason.IMAGE_TOO_LARGE,
                           f"{width}x{height} = {width * height} pixels is over --max_image_pixels={max_pixels}")
    problem = _unsupported_variant(image_format, data)
    if problem:
        raise ImageRefused(Reason.NOT_AN_IMAGE, problem)


def _judge_head(head: bytes, max_pixels: int) -> None:
    """Refuse from the head of a large file what no later byte can save; a header that runs past the head (a JPEG
    with big APP segments) is left for the whole file."""
    try:
        image_format, width, height = _header(head)
    except ImageRefused as refused:
        if refused.reason != Reason.IMAGE_CORRUPT:
            raise
        return
    _judge(image_format, width, height, head, max_pixels)


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """The offset after the GIF data sub-blocks starting at `pos` (each a size byte and that many bytes, until a 0)."""
    while pos < len(data):
        size = data[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def gif_first_frame(data: bytes) -> bytes:
    """An animated GIF cut after its first image and closed with a trailer; any other GIF as it is.

    TensorFlow decodes every frame of a GIF to return the first, and 500 frames of 2000x2000 pixels fit in 2 MB:
    cut, the decoder sees one frame, whose pixels are the same bytes as before (so the serving model, given the
    whole file, decodes the same first frame)."""
    flags = data[10] if len(data) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen descriptor, global colour table
    while pos < len(data):
        if data[pos] == 0x21:  # an extension: introducer, label, sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif data[pos] == 0x2C and pos + 10 <= len(data):  # the first image: descriptor, colour table, code size
            flags = data[pos + 9]
            pos = _skip_sub_blocks(data, pos + 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0))
            return data[:pos] + b";" if pos < len(data) and data[pos] != 0x3B else data
        else:  # the trailer, or bytes that are no block: the decoder judges the file as it is
            break
    return data


def decoder_bytes(data: bytes) -> bytes:
    """The bytes the decoder is given, and fingerprinted: an animated GIF cut after its first frame, any other image
    as it is (PIL takes a file for a GIF by the same signature)."""
    return gif_first_frame(data) if data.startswith(GIF_SIGNATURES) else data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprinted(record: Record, image: bytes | None, **changes) -> Record:
    """The record with `changes` and the SHA-256 of what the encoders will see, `image` (the bytes the decoder gets)
    and the UTF-8 text: with the encoders' identity, what decides whether an earlier output's vectors are reused."""
    text = changes.get("text", record.text)
    return dataclasses.replace(record, **changes,
                               image_sha256=sha256_hex(image) if image is not None else None,
                               text_sha256=sha256_hex(text.encode("utf-8")) if text is not None else None)


def check_image(data: bytes, max_pixels: int, max_bytes: int) -> bytes:
    """Judge image bytes by their header, never decoding them: the bytes the decoder gets (an animated GIF cut after
    its first frame), or ImageRefused."""
    return _checked_image(data, max_pixels, max_bytes)[0]


def _checked_image(data: bytes, max_pixels: int, max_bytes: int) -> tuple[bytes, int]:
    """check_image, and the image's pixel count from its header."""
    if not data:
        raise ImageRefused(Reason.IMAGE_EMPTY, "the image has zero bytes")
    if len(data) > max_bytes:
        raise ImageRefused(Reason.IMAGE_TOO_LARGE, f"the image has {len(data)} bytes, over --max_image_bytes="
                                                   f"{max_bytes}")
    image_format, width, height = _header(data)
    _judge(image_format, width, height, data, max_pixels)
    return decoder_bytes(data), width * height


def fetch_and_check_image(record: Record, max_pixels: int,
                          max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Iterator[Record | DeadLetter]:
    """Read the image's bytes if it came as a URI (bounded: see read_image), then check its header: format,
    variant and pixel count, not decoding. Inline bytes (image_bytes columns, shard members) meet the same cap.
    The record that passes has its content fingerprints (`fingerprinted`)."""
    data, pixels = record.image_bytes, None
    try:
        if record.image_uri is not None and data is None:
            data = read_image(record.image_uri, max_bytes, max_pixels)
        if data is not None:
            data, pixels = _checked_image(data, max_pixels, max_bytes)
    except ImageRefused as refused:
        yield dead_letter(record, Stage.PREPARE, refused.reason, refused.error)
        return
    yield fingerprinted(record, data, image_bytes=data, image_pixels=pixels)
