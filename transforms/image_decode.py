"""The one image decoder of the project: encoded bytes → [size, size, 3] float32 in [0, 1], upright, in TensorFlow.

The embed step, fine-tune training and the fine-tuned serving model all call it (`decode_and_resize` in graph ops,
`ImageDecoder` eagerly with the check the graph cannot make alone), so serving sees the pixels training saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from encoders.preprocessing import AREA, resize_method
from encoders.runtime import tf
from transforms.dead_letters import telling_message

# Where the decoder looks for a JPEG's Exif orientation, and what libjpeg leaves where a JPEG's data ends early.
EXIF_MAX_SEGMENTS = 16  # APP and comment segments walked for the Exif one (in practice the first, or the second)
EXIF_MAX_ENTRIES = 64  # IFD0 entries read for Orientation (tags are sorted: 0x0112 comes among the first dozen)
EXIF_ORIENTATION_TAG = 0x0112
# libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 of its size from fewer DCT coefficients, at a fraction of the cost of a
# full decode: a 640x480 photo fed to a 224 encoder needs only its 320x240 version, a 2048x1536 one its 512x384.
JPEG_SCALES = (1, 2, 4, 8)
PARALLEL_DECODES = 8  # images of a batch decoded at once: enough to keep a worker's cores busy, few held in memory
JPEG_FILL_GREY = 128  # all-zero coefficients: what libjpeg decodes where a JPEG's data ended early
# Bytes fed to a suspect JPEG before its end marker (see ImageDecoder): the leading 0 makes a dangling 0xFF a stuffed
# byte, and no 0xFF follows, so they hold no marker.
JPEG_FILLER = b"\x00" + bytes((index * 167 + 13) % 255 for index in range(4095))


def _numbers_at(data: tf.Tensor, pos: tf.Tensor, count: int, dtype: tf.DType, big_endian: bool) -> tf.Tensor:
    """`count` integers of `dtype` stored from byte `pos` of `data`, as int64: zeros past the end, never an
    out-of-range error. `data` is one string ([count]) or a vector of them with a `pos` each ([n, count])."""
    width = count * dtype.size
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, tf.cast(tf.strings.length(data), tf.int64))
    raw = tf.strings.substr(data, pos, tf.fill(tf.shape(pos), tf.constant(width, tf.int64)))
    return tf.cast(tf.io.decode_raw(raw, dtype, little_endian=not big_endian, fixed_length=width), tf.int64)


def _starts_with(data: tf.Tensor, prefix: bytes) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, len(prefix)), prefix)


def _jpeg_exif_at(data: tf.Tensor) -> tf.Tensor:
    """[n] encoded images → [n] offsets of the TIFF header inside each JPEG's Exif APP1 segment, or -1: walks the APP
    (and comment) segments after SOI, all the images' walks in one loop; the tables and frame header that follow
    them end a walk."""
    length = tf.cast(tf.strings.length(data), tf.int64)
    start = tf.where(_starts_with(data, b"\xff\xd8"), tf.constant(2, tf.int64), length)  # not a JPEG: no walk

    def walking(pos, found):
        return (found < 0) & (pos + 4 <= length)

    def step(pos, found, steps):
        numbers = _numbers_at(data, pos, 2, tf.uint16, big_endian=True)
        marker, size = numbers[:, 0], numbers[:, 1]
        app = tf.equal(tf.bitwise.bitwise_and(marker, 0xFFF0), 0xFFE0) | tf.equal(marker, 0xFFFE)  # APPn, COM
        tag = tf.strings.substr(data, tf.minimum(pos + 4, length), tf.fill(tf.shape(pos), tf.constant(6, tf.int64)))
        exif = tf.equal(marker, 0xFFE1) & tf.equal(tag, b"Exif\x00\x00")
        active = walking(pos, found)
        return (tf.where(active, tf.where(app, pos + 2 + size, length), pos),
                tf.where(active & exif, pos + 10, found), steps + 1)

    def more(pos, found, steps):
        return (steps < EXIF_MAX_SEGMENTS) & tf.reduce_any(walking(pos, found))

    _, found, _ = tf.while_loop(more, step, (start, tf.fill(tf.shape(start), tf.constant(-1, tf.int64)),
                                             tf.constant(0)))
    return found


def _exif_orientation_at(data: tf.Tensor, tiff: tf.Tensor) -> tf.Tensor:
    """[n] images, [n] offsets → [n] Orientation tags of the Exif IFD0 whose TIFF header is at `tiff`: 1 to 8 (1 when
    absent or invalid, and where `tiff` is -1)."""
    order = tf.strings.substr(data, tf.maximum(tiff, 0), tf.fill(tf.shape(tiff), tf.constant(2, tf.int64)))
    big = tf.equal(order, b"MM")  # "II" is little-endian

    def numbers(pos, count, dtype):  # in the TIFF's byte order: [n, count]
        return tf.where(big[:, None], _numbers_at(data, pos, count, dtype, True),
                        _numbers_at(data, pos, count, dtype, False))

    valid = (tiff >= 0) & (big | tf.equal(order, b"II")) & tf.equal(numbers(tiff + 2, 1, tf.uint16)[:, 0], 42)
    ifd = tiff + numbers(tiff + 4, 1, tf.int32)[:, 0]
    count = numbers(ifd, 1, tf.uint16)[:, 0]
    # Entries of 12 bytes: tag, type, value count, then the value (a SHORT in its first 2 bytes, or a LONG).
    shorts = tf.reshape(numbers(ifd + 2, 6 * EXIF_MAX_ENTRIES, tf.uint16), [-1, EXIF_MAX_ENTRIES, 6])
    longs = tf.reshape(numbers(ifd + 2, 3 * EXIF_MAX_ENTRIES, tf.int32), [-1, EXIF_MAX_ENTRIES, 3])
    tags, types = shorts[:, :, 0], shorts[:, :, 1]
    values = tf.where(tf.equal(types, 4), longs[:, :, 2], shorts[:, :, 4])
    hits = ((tf.range(EXIF_MAX_ENTRIES, dtype=tf.int64)[None, :] < count[:, None])
            & tf.equal(tags, EXIF_ORIENTATION_TAG) & (tf.equal(types, 3) | tf.equal(types, 4)))
    value = tf.reduce_max(tf.where(hits, values, 0), axis=1)
    return tf.where(valid & (value >= 2) & (value <= 8), value, 1)


def exif_orientations(data: tf.Tensor) -> tf.Tensor:
    """[n] encoded images → [n] Exif orientations (1 to 8), in graph ops: read from each JPEG's (or MPO's) Exif APP1
    segment, 1 for other formats and for JPEGs without one. A batch is read as one: its images' segment walks share
    one loop, which costs what one image's walk does (inside a map over the batch, a loop per image cost 15-20 % of
    a 640x480 photo's whole decode)."""
    return _exif_orientation_at(data, _jpeg_exif_at(data))


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The Exif orientation (1 to 8) of one encoded image (a scalar string tensor): exif_orientations of it alone."""
    return exif_orientations(tf.reshape(data, [1]))[0]


def _orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turn a square image upright as PIL.ImageOps.exif_transpose does: 2 mirrored, 3 rotated 180, 4 flipped,
    5 transposed, 6 rotated 90 clockwise, 7 transversed, 8 rotated 90 anticlockwise (the transpose first, then
    the mirrors)."""
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    mirror = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))  # left-right
    flip = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))  # top-bottom
    image = tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)
    return tf.cond(flip, lambda: tf.reverse(image, [0]), lambda: image)


def _palette_bmp(data: tf.Tensor) -> tf.Tensor:
    """An 8-bit BMP's pixels: TF's BMP decoder reads its palette indices as grey levels, so look them up in the
    palette (BGRA entries right after the info header)."""
    indices = tf.cast(tf.io.decode_bmp(data, channels=0)[..., 0], tf.int32)
    palette_at = 14 + _numbers_at(data, 14, 1, tf.int32, big_endian=False)[0]  # 14 + the info header's size
    palette = tf.reshape(_numbers_at(data, palette_at, 1024, tf.uint8, big_endian=False), [256, 4])[:, 2::-1]
    return tf.cast(tf.gather(palette, indices), tf.uint8)  # BGRA entries → RGB


def _decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes → [H, W, 3] uint8 as stored (before any Exif orientation), at full resolution."""
    bmp_8bit = _starts_with(data, b"BM") & tf.equal(_numbers_at(data, 28, 1, tf.uint16, big_endian=False)[0], 8)
    # channels=3: grey and RGBA made RGB; expand_animations=False: a GIF's first frame.
    return tf.cond(bmp_8bit, lambda: _palette_bmp(data),
                   lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


def jpeg_scale(data: tf.Tensor, size: int) -> tf.Tensor:
    """The index into JPEG_SCALES of the largest scale-down whose short side stays ≥ `size` (libjpeg rounds the
    scaled sides up), from the JPEG's frame header."""
    height_width = tf.io.extract_jpeg_shape(data)[:2]
    short = tf.reduce_min(height_width)
    return tf.add_n([tf.cast((short + scale - 1) // scale >= size, tf.int32) for scale in JPEG_SCALES[1:]])


def _decode_rgb_for(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded bytes → [H, W, 3] uint8: a JPEG decoded at the DCT scale whose short side stays ≥ `size` (the
    smallest such), anything else at full resolution."""
    return tf.cond(_starts_with(data, b"\xff\xd8"),
                   lambda: tf.switch_case(jpeg_scale(data, size), [
                       lambda scale=scale: tf.io.decode_jpeg(data, channels=3, ratio=scale)
                       for scale in JPEG_SCALES]),
                   lambda: _decode_rgb(data))


def _resize(stored: tf.Tensor, size: int, resize: str) -> tf.Tensor:
    """[H, W, 3] uint8 → [size, size, 3] float32 on 0-255 by `resize` (encoders.preprocessing.RESIZE_METHODS)."""
    if resize == AREA:
        # A shrink averages each output pixel's area (a plain bilinear shrink samples 4 pixels of it and aliases fine
        # detail; bilinear with antialias filters as well, at twice the cost); an image smaller than `size` on a side
        # is enlarged bilinear, which area resizing would do by repeating pixels.
        shrinking = tf.reduce_all(tf.shape(stored)[:2] >= size)
        return tf.cond(shrinking, lambda: tf.image.resize(stored, [size, size], method="area"),
                       lambda: tf.image.resize(stored, [size, size], method="bilinear", antialias=True))
    resize_method(resize)  # ValueError for a name that is not one
    return tf.image.resize(stored, [size, size], method=resize, antialias=resize != "nearest")


def _decode_unscaled(data: tf.Tensor, size: int, orientation: tf.Tensor,
                     resize: str = AREA) -> tuple[tf.Tensor, tf.Tensor]:
    """(pixels on 0-255, ends_grey): one image decoded, resized and turned upright, not yet scaled to [0, 1]
    (`to_unit`); and whether it is a JPEG whose last pixel is the flat grey libjpeg writes where a JPEG's data ended
    early (see ImageDecoder)."""
    stored = _decode_rgb_for(data, size)
    # Oriented after the resize: on the square image it is cheaper, and resizing commutes with transposes and mirrors.
    pixels = _orient(_resize(stored, size, resize), orientation)
    ends_grey = _starts_with(data, b"\xff\xd8") & tf.reduce_all(tf.equal(stored[-1, -1], JPEG_FILL_GREY))
    return pixels, ends_grey


def to_unit(pixels: tf.Tensor) -> tf.Tensor:
    """Resized pixels on 0-255 → [0, 1] (a bicubic resize may overshoot, hence the clip). A batch path applies it
    once to the whole batch: elementwise ops on one image at a time, among the parallel decodes, each split over
    TensorFlow's intra-op threads, cost a tenth of a 640x480 photo's decode (benchmarks/RESULTS.md)."""
    return tf.clip_by_value(pixels / 255.0, 0.0, 1.0)


def _decode_checked(data: tf.Tensor, size: int, resize: str) -> tuple[tf.Tensor, tf.Tensor]:
    """One encoded image → (decode_and_resize's pixels, ends_grey) for ImageDecoder."""
    pixels, ends_grey = _decode_unscaled(data, size, exif_orientation(data), resize)
    return to_unit(pixels), ends_grey


def _decode_batch_checked(data: tf.Tensor, size: int, resize: str) -> tuple[tf.Tensor, tf.Tensor]:
    """[n] encoded images → ([n, size, size, 3] pixels, [n] ends_grey) as one graph, zeros (and False) for empty
    bytes: map_fn decodes PARALLEL_DECODES images at once on TensorFlow's inter-op threads, then one op scales the
    whole batch. The embed step's batch path (ImageDecoder.decode_batch) and the serving model's."""
    def decode_or_nothing(image: tf.Tensor, orientation: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.cond(tf.strings.length(image) > 0, lambda: _decode_unscaled(image, size, orientation, resize),
                       lambda: (tf.zeros([size, size, 3], tf.float32), tf.constant(False)))

    pixels, ends_grey = tf.map_fn(lambda one: decode_or_nothing(*one), (data, exif_orientations(data)),
                                  parallel_iterations=PARALLEL_DECODES, fn_output_signature=(tf.float32, tf.bool))
    return to_unit(pixels), ends_grey


def decode_batch_or_zeros(data: tf.Tensor, size: int, resize: str = AREA) -> tf.Tensor:
    """[n] encoded images → [n, size, size, 3] float32 in [0, 1]: decode_or_zeros of each, as one graph over the
    batch (one Exif loop for all, parallel decodes, one scaling), in graph ops."""
    return _decode_batch_checked(data, size, resize)[0]


def decode_and_resize(data: tf.Tensor, size: int, resize: str = AREA) -> tf.Tensor:
    """One encoded image (a scalar string tensor) → [size, size, 3] float32 in [0, 1], upright, in graph ops.

    JPEG (and MPO's first picture), PNG, GIF (first frame), BMP (8-bit through its palette), still WebP; grey and
    RGBA made RGB; a large JPEG decoded at the DCT scale that keeps its short side ≥ `size`; resized by `resize`
    (the default shrinks by area averaging and enlarges bilinear); turned upright by the JPEG's Exif orientation, as
    PIL.ImageOps.exif_transpose does. The one decoder of the project: the embed step, fine-tune training and the
    fine-tuned serving model all call it, so serving sees the pixels training saw.
    """
    return _decode_checked(data, size, resize)[0]


def decode_or_zeros(data: tf.Tensor, size: int, resize: str = AREA) -> tf.Tensor:
    """decode_and_resize, or zeros for empty bytes (a record without an image), in graph ops."""
    return tf.cond(tf.strings.length(data) > 0, lambda: decode_and_resize(data, size, resize),
                   lambda: tf.zeros([size, size, 3], tf.float32))


def make_image_decoder(size: int, resize: str = AREA):
    """bytes → [size, size, 3] float32 in [0, 1] (decode_and_resize as one traced function, for eager callers)."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    def decode(data):
        return decode_and_resize(data, size, resize)

    return decode


def _jpeg_scan_end(data: bytes) -> int | None:
    """Offset of the end marker after a JPEG's (first picture's) scans, or None: found past the segments before the
    first scan, whose Exif thumbnail has markers of its own (inside scans, 0xFF is followed by 0 or a marker)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        if data[pos + 1] == 0xDA:
            end = data.find(b"\xff\xd9", pos)
            return end if end >= 0 else None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


ENDS_EARLY = ("the JPEG's data ends before its last rows (truncated, or its header claims more rows than it holds): "
              "the decoder would fill them with grey")


class ImageDecodeError(ValueError):
    """Image bytes the decoder cannot give the image's pixels of: TF's decoders failed, or decoded filler."""


class ImageDecoder:
    """bytes → [size, size, 3] float32 in [0, 1] for the embed step and fine-tune training: decode_and_resize, plus
    the one check the graph cannot make alone.

    A JPEG whose data ends early (truncated then closed with an end marker, or whose frame header claims more rows
    than its data holds) decodes without error: libjpeg only warns, which TF ignores, and fills the missing blocks
    with flat grey. The graph flags a JPEG whose last pixel is that grey (rare in a photo); only those are decoded
    again, with filler bytes before the end marker: a whole JPEG skips them (bytes before a marker) and decodes the
    same, one whose data ended early decodes them into its missing blocks, which change.
    """

    def __init__(self, size: int, resize: str = AREA):
        spec = [tf.TensorSpec([], tf.string)]
        self._size = size
        # autograph=False: the graph's control flow is explicit (tf.cond, tf.while_loop, tf.map_fn), and converting
        # the Python first would double the time of the first call, which every worker pays.
        self._decode = tf.function(lambda data: _decode_checked(data, size, resize), input_signature=spec,
                                   autograph=False)
        self._decode_stored = tf.function(_decode_rgb, input_signature=spec, autograph=False)
        self._decode_many = tf.function(lambda data: _decode_batch_checked(data, size, resize),
                                        input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)

    def decode_batch(self, images: Sequence[bytes]) -> tuple[tf.Tensor, list[ImageDecodeError | None]]:
        """Images decoded side by side on the process's cores: [n, size, size, 3] float32, as a tensor that the
        encoder takes as it is (a NumPy copy out and back in cost as much as a fifth of a 640x480 photo's decode),
        and for each image None or the ImageDecodeError it gives (its pixels are then zeros). One graph call decodes
        the batch; when an image breaks it (rare: prepare refused what the header shows), each is decoded alone, to
        tell which."""
        errors: list[ImageDecodeError | None] = [None] * len(images)
        try:
            pixels, ends_grey = self._decode_many(tf.constant(list(images), tf.string))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            alone = np.zeros((len(images), self._size, self._size, 3), np.float32)
            for index, data in enumerate(images):
                try:
                    alone[index] = self(data)
                except ImageDecodeError as error:
                    errors[index] = error
            return tf.constant(alone), errors
        for index in np.flatnonzero(ends_grey.numpy()):
            if self._ends_early(images[index]):
                errors[index] = ImageDecodeError(ENDS_EARLY)
        if any(errors):
            pixels = tf.where(tf.constant([error is None for error in errors])[:, None, None, None], pixels, 0.0)
        return pixels, errors

    def __call__(self, data: bytes) -> np.ndarray:
        """Raises ImageDecodeError, in the decoder's words, for bytes it cannot give the image's pixels of."""
        try:
            pixels, ends_grey = self._decode(tf.constant(data))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
            raise ImageDecodeError(telling_message(error)) from error
        if ends_grey and self._ends_early(data):
            raise ImageDecodeError(ENDS_EARLY)
        return pixels.numpy()

    def _ends_early(self, data: bytes) -> bool:
        end = _jpeg_scan_end(data)
        if end is None:
            return False
        padded = data[:end] + JPEG_FILLER + data[end:]
        try:
            return not np.array_equal(self._decode_stored(data).numpy(), self._decode_stored(padded).numpy())
        except tf.errors.InvalidArgumentError:  # the filler was read as image data, and broke it
            return True
