"""Images that must neither stop, exhaust nor silently corrupt the job: paths that are no files, files too big to read,
animations, Exif orientations, palettes, JPEGs whose data ends early, and the formats' odd corners. Real files
(PIL writes them; photos from scikit-image), the real decoder, real pipelines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import zlib

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image, ImageOps

from beam_jobs.embed_corpus import run
from encoders.runtime import tf
from schemas import embeddings as cols
from schemas import layout
from schemas.records import DeadLetter, Reason, Record
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from tests.test_embed_config import fails_in_one_line
from transforms.downstream import fine_tune
from transforms.embedding.image_check import IMAGE_HEAD_BYTES, check_image, fetch_and_check_image
from transforms.image_decode import (
    ImageDecodeError,
    ImageDecoder,
    decode_and_resize,
    exif_orientation,
    exif_orientations,
    make_image_decoder,
)

SIZE = 64  # decoder output size for the pixel comparisons
# How each Exif orientation's file stores an upright picture: PIL.ImageOps.exif_transpose undoes it.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skimage.data, name)())
    return image.resize(size) if size else image


def jpeg_with_orientation(upright: Image.Image, orientation: int, exif: bytes | None = None) -> bytes:
    """A JPEG storing `upright` turned so that its Exif orientation turns it back (4:4:4, quality 100: close pixels)."""
    tags = Image.Exif()
    tags[0x010F], tags[0x0110], tags[0x0112] = "Camera maker", "Camera model", orientation  # Orientation not first
    return encode(upright.transpose(STORED_AS[orientation]), "JPEG", quality=100, subsampling=0,
                  exif=exif if exif is not None else tags)


def little_endian_exif(orientation: int) -> bytes:
    """Exif with an Intel ("II") TIFF header, which PIL does not write (it writes "MM")."""
    entry = (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    entry += orientation.to_bytes(2, "little") + b"\0\0"
    return b"Exif\0\0II*\0" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little") + entry + bytes(4)


def segment_after_soi(data: bytes, marker: int, payload: bytes) -> bytes:
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def without_jfif(data: bytes) -> bytes:
    assert data[2:4] == b"\xff\xe0"
    return data[:2] + data[4 + int.from_bytes(data[4:6], "big"):]


def decode(data: bytes, size: int = SIZE) -> np.ndarray:
    return make_image_decoder(size)(data).numpy()


def upright_reference(upright: Image.Image) -> np.ndarray:
    return decode(encode(upright, "JPEG", quality=100, subsampling=0))


def assert_same_picture(pixels: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to JPEG's loss (a turned picture compresses a little differently); a wrong turn is far off."""
    difference = np.abs(pixels - reference)
    assert difference.max() < 0.1 and difference.mean() < 0.01, (difference.max(), difference.mean())


# --- Exif orientation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(2, 9))
def test_each_exif_orientation_gives_the_upright_pixels(orientation):
    upright = photo("chelsea")  # 451x300: a turn that went wrong changes the pixels a lot
    data = jpeg_with_orientation(upright, orientation)
    with Image.open(io.BytesIO(data)) as stored:  # the file is what PIL's exif_transpose turns upright
        assert ImageOps.exif_transpose(stored).size == upright.size
    assert int(exif_orientation(tf.constant(data))) == orientation
    pixels, reference = decode(data), upright_reference(upright)
    assert_same_picture(pixels, reference)
    unturned = decode(encode(upright.transpose(STORED_AS[orientation]).resize(upright.size), "PNG"))
    assert np.abs(unturned - reference).mean() > 0.05  # what the file would give without its orientation


@pytest.mark.parametrize("segments", ["little_endian", "exif_first", "after_an_icc_segment", "after_a_comment"])
def test_exif_is_found_in_every_segment_layout(segments):
    upright = photo("coffee", (90, 60))
    data = jpeg_with_orientation(upright, 6, exif=little_endian_exif(6) if segments == "little_endian" else None)
    if segments == "exif_first":
        data = without_jfif(data)
    elif segments == "after_an_icc_segment":
        data = segment_after_soi(data, 0xE2, b"ICC_PROFILE\0" + bytes(300))
    elif segments == "after_a_comment":
        data = data[:2] + b"\xff\xfe\x00\x08Exif\0\0" + data[2:]  # a comment that says "Exif" is no Exif
    assert int(exif_orientation(tf.constant(data))) == 6
    assert_same_picture(decode(data), upright_reference(upright))


def test_images_without_orientation_are_left_as_they_are():
    image = photo("astronaut", (80, 60))
    plain = encode(image, "JPEG", quality=100, subsampling=0)
    for data in (plain, encode(image, "PNG"), segment_after_soi(plain, 0xE1, b"http://ns.adobe.com/xap/1.0/\0")):
        assert int(exif_orientation(tf.constant(data))) == 1  # no Exif; an XMP APP1 is not one
    bad_value = Image.Exif()
    bad_value[0x0112] = 9  # not an orientation: ignored, as exif_transpose ignores it
    assert int(exif_orientation(tf.constant(encode(image, "JPEG", exif=bad_value)))) == 1


def test_a_batch_reads_each_images_orientation_as_it_reads_it_alone():
    """The batch decoder walks all its images' segments in one loop: walks that end at different steps (Exif first,
    after JFIF, after an ICC segment, no Exif, no JPEG) each give that image's orientation and upright pixels."""
    upright = photo("coffee", (90, 60))
    images = [jpeg_with_orientation(upright, 6), without_jfif(jpeg_with_orientation(upright, 3)),
              segment_after_soi(jpeg_with_orientation(upright, 8), 0xE2, b"ICC_PROFILE\0" + bytes(300)),
              encode(upright, "JPEG", quality=100, subsampling=0), encode(upright, "PNG"),
              jpeg_with_orientation(upright, 5, exif=little_endian_exif(5))]
    assert [int(value) for value in exif_orientations(tf.constant(images))] == [6, 3, 8, 1, 1, 5]
    decoder = ImageDecoder(SIZE)
    pixels, errors = decoder.decode_batch(images)
    assert errors == [None] * len(images)
    reference = upright_reference(upright)
    for index, data in enumerate(images):
        np.testing.assert_allclose(pixels[index], decoder(data), atol=1e-6)
        assert_same_picture(pixels[index], reference)


def test_the_serving_graph_turns_images_upright_too():
    """The fine-tuned serving model maps decode_and_resize over a batch of bytes: the same function, in a graph."""
    upright = photo("chelsea", (120, 80))
    batch = tf.constant([encode(upright, "JPEG", quality=100, subsampling=0), jpeg_with_orientation(upright, 8)])
    serve = tf.function(lambda data: tf.map_fn(lambda one: decode_and_resize(one, SIZE), data,
                                               fn_output_signature=tf.TensorSpec([SIZE, SIZE, 3], tf.float32)))
    pixels = serve(batch).numpy()
    assert_same_picture(pixels[1], pixels[0])


# --- JPEGs whose data ends early ----------------------------------------------------------------------------------


def _with_frame_size(data: bytes, height: int | None = None, width: int | None = None) -> bytes:
    """The JPEG with its (baseline) frame header claiming another size: a lying header."""
    at = data.index(b"\xff\xc0")
    old_height, old_width = int.from_bytes(data[at + 5:at + 7], "big"), int.from_bytes(data[at + 7:at + 9], "big")
    size = (height or old_height).to_bytes(2, "big") + (width or old_width).to_bytes(2, "big")
    return data[:at + 5] + size + data[at + 9:]


def _truncated_then_closed(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)] + b"\xff\xd9"


PHOTO_JPEG = encode(photo("astronaut", (640, 480)), "JPEG", quality=90)
ENDS_EARLY = {
    "half_then_end_marker": _truncated_then_closed(PHOTO_JPEG, 0.5),
    "most_then_end_marker": _truncated_then_closed(PHOTO_JPEG, 0.95),
    "header_claims_twice_the_rows": _with_frame_size(PHOTO_JPEG, height=960),
    "header_claims_twice_the_columns": _with_frame_size(PHOTO_JPEG, width=1280),
    "progressive_first_scan_cut": _truncated_then_closed(
        encode(photo("astronaut", (640, 480)), "JPEG", quality=90, progressive=True), 0.05),
    "grey_half": _truncated_then_closed(encode(photo("astronaut", (640, 480)).convert("L"), "JPEG"), 0.5),
    "with_exif_half": _truncated_then_closed(jpeg_with_orientation(photo("astronaut", (320, 240)), 6), 0.5),
}


@pytest.mark.parametrize("case", sorted(ENDS_EARLY))
def test_a_jpeg_whose_data_ends_early_is_refused_not_filled_with_grey(case):
    data = ENDS_EARLY[case]
    decode(data)  # what TF alone does: no error, the missing rows grey
    with pytest.raises(ImageDecodeError, match="ends before its last rows"):
        ImageDecoder(SIZE)(data)


def test_whole_jpegs_whose_last_pixel_is_that_grey_are_kept():
    letterboxed = np.asarray(photo("astronaut", (640, 480))).copy()
    letterboxed[400:] = 128  # a mid-grey band at the bottom, as some pipelines pad
    letterboxed_jpeg = encode(Image.fromarray(letterboxed), "JPEG", quality=90)
    with_trailer = letterboxed_jpeg + b"a phone's appended data, after the end marker" * 20
    decoder = ImageDecoder(SIZE)
    for data in (letterboxed_jpeg, with_trailer):
        np.testing.assert_array_equal(decoder(data), decode(data))


# --- Formats and their odd corners ----------------------------------------------------------------------------------


def interlaced_png(image: Image.Image) -> bytes:
    """An Adam7-interlaced RGB PNG (PIL does not write them)."""
    pixels = np.asarray(image.convert("RGB"))
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in pixels[y0::dy, x0::dx]
                   if pixels[y0::dy, x0::dx].size)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = image.width.to_bytes(4, "big") + image.height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 1])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def sixteen_bit_png() -> tuple[bytes, Image.Image]:
    grey16 = (np.asarray(photo("camera", (96, 64))).astype(np.uint16) * 257 + 77).astype(np.uint16)
    return encode(Image.fromarray(grey16), "PNG"), Image.fromarray((grey16 >> 8).astype(np.uint8)).convert("RGB")


def palette_image() -> Image.Image:
    return photo("coffee", (90, 60)).quantize(64)


def decodable_cases() -> dict[str, tuple[bytes, Image.Image]]:
    """name → (file bytes, the RGB picture they hold, decoded by PIL or known)."""
    base = photo("chelsea", (90, 60))
    png16, png16_picture = sixteen_bit_png()
    cases = {
        "jpeg": encode(base, "JPEG", quality=95),
        "jpeg_progressive": encode(base, "JPEG", quality=95, progressive=True),
        "jpeg_grey": encode(base.convert("L"), "JPEG", quality=95),
        "jpeg_cmyk": encode(base.convert("CMYK"), "JPEG", quality=95),
        "mpo": encode(base, "MPO", save_all=True, append_images=[base.rotate(90)], quality=95),
        "png_interlaced": interlaced_png(base),
        "png_palette": encode(palette_image(), "PNG"),
        "png_grey_alpha": encode(base.convert("LA"), "PNG"),
        "png_1bit": encode(base.convert("1"), "PNG"),
        "gif": encode(palette_image(), "GIF"),
        "bmp_24bit": encode(base, "BMP"),
        "bmp_8bit_palette": encode(palette_image(), "BMP"),
        "bmp_8bit_grey": encode(base.convert("L"), "BMP"),
        "webp_lossy": encode(base, "WEBP", quality=95),
        "webp_lossless_rgba": encode(base.convert("RGBA"), "WEBP", lossless=True),
    }
    pictures = {}
    for name, data in cases.items():
        with Image.open(io.BytesIO(data)) as image:
            pictures[name] = (data, image.convert("RGB"))
    pictures["png_16bit"] = (png16, png16_picture)  # PIL's own I;16 → RGB clips; TF keeps the high byte
    return pictures


@pytest.mark.parametrize("name", sorted(decodable_cases()))
def test_valid_images_decode_to_their_pictures(name):
    data, picture = decodable_cases()[name]
    check_image(data, max_pixels=10**8, max_bytes=10**8)  # prepare lets them through
    pixels, reference = ImageDecoder(SIZE)(data), decode(encode(picture, "PNG"))
    # Lossless formats exactly; JPEG within what two libjpeg builds (TF's, PIL's) differ by.
    assert np.abs(pixels - reference).max() < (0.06 if name.startswith(("jpeg", "mpo", "webp_lossy")) else 1e-6)


REFUSED_BY_HEADER = {
    "webp_animated": (lambda: encode(photo("chelsea", (60, 40)), "WEBP", save_all=True, duration=100,
                                     append_images=[photo("coffee", (60, 40))]), "animated WebP"),
    "bmp_1bit": (lambda: encode(photo("chelsea", (60, 40)).convert("1"), "BMP"), "1-bit BMP"),
    "tiff": (lambda: encode(photo("chelsea", (60, 40)), "TIFF"), "TIFF images are not decoded"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BY_HEADER))
def test_variants_tensorflow_cannot_decode_are_refused_by_their_header(name):
    make, message = REFUSED_BY_HEADER[name]
    data = make()
    [letter] = fetch_and_check_image(Record(id=name, source=name, image_bytes=data), 10**8)
    assert isinstance(letter, DeadLetter)
    assert (letter.reason, message in letter.message) == (Reason.NOT_AN_IMAGE, True), letter.message
    with pytest.raises(ImageDecodeError) as refused:  # were one to reach the decoder, it would not pass silently
        ImageDecoder(SIZE)(data)
    assert "Graph execution" not in str(refused.value) and "{{" not in str(refused.value)


# --- Animations ---------------------------------------------------------------------------------------------------


def _flat_gif(side: int, index: int) -> tuple[bytes, bytes]:
    """A side x side GIF of palette entry `index` (black, white): (its head up to the image, the image's blocks)."""
    frame = Image.new("P", (side, side), index)
    frame.putpalette([0, 0, 0, 255, 255, 255])
    data = encode(frame, "GIF", optimize=False)
    at = data.index(b"\x2c\x00\x00\x00\x00")  # the image descriptor at (0, 0); the palette holds no 0x2C
    return data[:at], data[at:-1]


def huge_animation(frames: int = 500, side: int = 2000) -> bytes:
    """`frames` frames of side x side pixels, white then black by turns: 2 MB on disk, 2 G pixels to decode whole."""
    head, white = _flat_gif(side, 1)
    _, black = _flat_gif(side, 0)
    return head + b"".join(black if index % 2 else white for index in range(frames)) + b";"


def test_an_animated_gif_is_cut_to_its_first_frame_with_the_same_pixels():
    frames = [palette_image(), photo("chelsea", (90, 60)).quantize(32), photo("astronaut", (90, 60)).quantize(16)]
    whole = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0,
                   transparency=3, disposal=2)
    cut = check_image(whole, max_pixels=10**8, max_bytes=10**8)
    with Image.open(io.BytesIO(cut)) as first:
        assert first.n_frames == 1 and len(cut) < len(whole)
    # TF decodes a GIF's first frame from the whole file (the serving model does): the cut decodes the same.
    np.testing.assert_array_equal(decode(cut), decode(whole))
    single = encode(palette_image(), "GIF")
    assert check_image(single, max_pixels=10**8, max_bytes=10**8) is single


def test_a_huge_animation_costs_one_frame():
    whole = huge_animation()
    with Image.open(io.BytesIO(whole)) as animation:
        assert animation.n_frames == 500 and animation.size == (2000, 2000)
    cut = check_image(whole, max_pixels=40_000_000, max_bytes=64 << 20)  # TF decoding 500 frames: 12 s and 1.9 GB
    pixels = ImageDecoder(SIZE)(cut)
    assert len(cut) < 20_000 and np.allclose(pixels, 1.0, atol=1e-5)  # the first frame alone: white


# --- Bounded reads ------------------------------------------------------------------------------------------------


def fetch(path: str, max_bytes: int = 64 << 20, max_pixels: int = 40_000_000) -> Record | DeadLetter:
    """fetch_and_check_image on an image path, in a thread: a read that blocks fails the test instead of hanging it."""
    outcome = []
    worker = threading.Thread(target=lambda: outcome.extend(
        fetch_and_check_image(Record(id="x", source=path, image_uri=path), max_pixels, max_bytes)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), f"reading {path} blocked"
    [result] = outcome
    return result


def test_paths_that_are_no_regular_files_are_refused_without_reading(tmp_path):
    fifo = str(tmp_path / "pipe.jpg")
    os.mkfifo(fifo)  # nobody writes: a read would block for ever
    folder = tmp_path / "folder.png"
    folder.mkdir()
    link = tmp_path / "zeros.jpg"
    link.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (str(link), "a character device"),
                       (str(folder), "a folder")):
        letter = fetch(path)
        assert (letter.reason, kind in letter.message) == (Reason.IMAGE_NOT_A_FILE, True), letter.message


def test_files_over_the_byte_cap_are_refused_without_reading_them(tmp_path):
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as handle:
        handle.write(PHOTO_JPEG)
        handle.truncate(1 << 30)  # 1 GB, sparse: nothing but the JPEG's bytes on disk
    started = time.perf_counter()
    letter = fetch(str(sparse))
    assert time.perf_counter() - started < 2
    assert (letter.reason, "1073741824 bytes" in letter.message) == (Reason.IMAGE_TOO_LARGE, True), letter.message
    small_cap = fetch(corpora.write_file(str(tmp_path / "photo.jpg"), PHOTO_JPEG), max_bytes=len(PHOTO_JPEG) - 1)
    assert small_cap.reason == Reason.IMAGE_TOO_LARGE
    assert isinstance(fetch(str(tmp_path / "photo.jpg"), max_bytes=len(PHOTO_JPEG)), Record)
    [inline] = fetch_and_check_image(Record(id="x", source="s", image_bytes=PHOTO_JPEG), 40_000_000, 1000)
    assert inline.reason == Reason.IMAGE_TOO_LARGE  # image_bytes columns and shard members meet the same cap


class EndlessFileSystem(LocalFileSystem):
    """An object store serving endless objects (`endless://<kind>`): a head, then zeros for ever. Counts reads."""

    bytes_read = {}  # one count per object, read back by the test
    wide = (20_000).to_bytes(4, "big") + (3000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 60 megapixels
    heads = {"jpeg": PHOTO_JPEG[:2000], "text": b"not an image at all\n" * 10,
             "wide_png": b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + wide
                         + zlib.crc32(b"IHDR" + wide).to_bytes(4, "big") + (1 << 30).to_bytes(4, "big") + b"IDAT"}

    @classmethod
    def scheme(cls):
        return "endless"

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        kind = path.split("://", 1)[1]
        head, counts = self.heads[kind], self.bytes_read
        counts[kind] = 0

        class Endless(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, buffer):
                at = counts[kind]
                chunk = (head[at:at + len(buffer)] if at < len(head) else b"").ljust(len(buffer), b"\0")
                buffer[:] = chunk
                counts[kind] += len(buffer)
                return len(buffer)

        return io.BufferedReader(Endless())


def test_an_endless_object_is_read_only_to_the_cap_or_to_its_head():
    cap = 3 << 20
    letter = fetch("endless://jpeg", max_bytes=cap)
    assert letter.reason == Reason.IMAGE_TOO_LARGE
    assert EndlessFileSystem.bytes_read["jpeg"] <= cap + 1 + io.DEFAULT_BUFFER_SIZE
    for kind, reason, message in (("text", Reason.NOT_AN_IMAGE, "no image format starts with"),
                                  ("wide_png", Reason.IMAGE_TOO_LARGE, "60000000 pixels")):
        letter = fetch(f"endless://{kind}", max_bytes=cap)
        assert (letter.reason, message in letter.message) == (reason, True), letter.message
        assert EndlessFileSystem.bytes_read[kind] <= IMAGE_HEAD_BYTES + io.DEFAULT_BUFFER_SIZE  # judged by its head


def test_max_image_bytes_must_be_positive(fixture_encoders, tmp_path, capsys):
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(1))
    argv = ["--input", manifest, "--output", str(tmp_path / "out"), "--image_encoder", fixture_encoders["image"],
            "--text_encoder", fixture_encoders["text"], "--max_image_bytes", "0"]
    fails_in_one_line(capsys, argv, "--max_image_bytes must be at least 1, not 0")


# --- The job, end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(fixture_encoders, tmp_path_factory) -> tuple[dict[str, dict], dict[str, dict], dict[str, bytes]]:
    """One embedding run over every case above: (embedded rows by id, dead letters by id, the files by id)."""
    root = tmp_path_factory.mktemp("zoo")
    upright = photo("chelsea", (120, 80))
    files = {name: data for name, (data, _) in decodable_cases().items()}
    files.update({name: make() for name, (make, _) in REFUSED_BY_HEADER.items()})
    files.update({f"ends_early_{name}": data for name, data in ENDS_EARLY.items()})
    files.update({
        "upright": encode(upright, "JPEG", quality=100, subsampling=0),
        "turned_6": jpeg_with_orientation(upright, 6),
        "turned_6_without_exif": encode(upright.transpose(STORED_AS[6]), "JPEG", quality=100, subsampling=0),
        "animated_gif": huge_animation(frames=40, side=500),
        "png_cut_short": encode(upright, "PNG")[:-600],
        "png_bad_crc": (lambda png: png[:-20] + bytes([png[-20] ^ 0xFF]) + png[-19:])(encode(upright, "PNG")),
    })
    rows = []
    for name, data in files.items():
        corpora.write_file(str(root / "images" / name), data)
        rows.append({"id": name, "image": f"images/{name}"})
    manifest = corpora.write_file(str(root / "manifest.jsonl"), "\n".join(map(json.dumps, rows)).encode() + b"\n")
    output = str(root / "out")
    report = run(["--input", manifest, "--output", output, "--image_encoder", fixture_encoders["image"],
                  "--text_encoder", "none", "--max_error_rate", "1"])
    embedded = {row["id"]: row for row in read_parquet_dir(output, "embeddings").to_pylist()}
    dead = {row["id"]: row for row in read_parquet_dir(output, "dead_letters").to_pylist()}
    assert report.read == len(files) == len(embedded) + len(dead) and report.reconciled
    return embedded, dead, files


def test_every_valid_image_is_embedded(zoo):
    embedded, dead, _ = zoo
    valid = set(decodable_cases()) | {"upright", "turned_6", "turned_6_without_exif", "animated_gif"}
    assert valid <= set(embedded), {name: dead[name]["message"] for name in valid if name in dead}


def test_a_turned_photo_embeds_as_its_upright_self(zoo):
    embedded, _, _ = zoo
    # The run embeds images only: the multimodal `embedding` is the image vector.
    vector = {name: np.array(embedded[name]["embedding"]) for name in ("upright", "turned_6", "turned_6_without_exif")}
    turned = np.linalg.norm(vector["turned_6"] - vector["upright"])
    unturned = np.linalg.norm(vector["turned_6_without_exif"] - vector["upright"])  # what the job did before
    assert turned < 0.05 * unturned, (turned, unturned)


def test_broken_and_unsupported_images_are_dead_lettered_with_a_telling_reason(zoo):
    _, dead, _ = zoo
    expected = {f"ends_early_{name}": (Reason.IMAGE_CORRUPT, "ends before its last rows") for name in ENDS_EARLY}
    expected.update({name: (Reason.NOT_AN_IMAGE, message) for name, (_, message) in REFUSED_BY_HEADER.items()})
    expected.update({"png_cut_short": (Reason.IMAGE_CORRUPT, "PNG"), "png_bad_crc": (Reason.IMAGE_CORRUPT, "PNG")})
    got = {name: (dead[name]["reason"], message in dead[name]["message"]) for name, (_, message) in expected.items()
           if name in dead}
    assert got == {name: (reason, True) for name, (reason, _) in expected.items()}, {
        name: dead[name]["message"] for name in dead}
    for letter in dead.values():
        assert "Graph execution" not in letter["message"] and "{{" not in letter["message"]


def test_fine_tune_records_leave_out_images_the_decoder_refuses(tmp_path):
    """Fine-tune training decodes its images after the pipeline, where one bad image would stop it."""
    rows = [{"id": "good", "image_bytes": PHOTO_JPEG, "text": "a photo", "label": "a"},
            {"id": "ends_early", "image_bytes": ENDS_EARLY["half_then_end_marker"], "text": "broken", "label": "a"}]
    manifest = corpora.write_parquet_manifest(str(tmp_path / "corpus"), rows)
    dead_letters = os.path.join(str(tmp_path / "dead"), layout.DEAD_LETTERS_DIR, layout.DEAD_LETTERS_PREFIX)
    with beam.Pipeline() as pipeline:
        fine_tune.build_records_pipeline(pipeline, manifest, "parquet", True, True, 40_000_000,
                                         str(tmp_path / "records"), dead_letters)
    paths = fine_tune.records_files(str(tmp_path / "records"))
    assert [row["id"] for path in paths for row in pq.read_table(path).to_pylist()] == ["good"]
    dead = read_parquet_dir(str(tmp_path / "dead"), "dead_letters").to_pylist()
    assert [(row["id"], row["reason"]) for row in dead] == [("ends_early", Reason.IMAGE_CORRUPT)]
    # What training then reads: every split's rows in the train split (no validation or test ratio), decoded.
    source = fine_tune.RecordsSource(tuple(paths), 0.0, 0.0, use_image=True, use_text=True, image_size=SIZE)
    [(inputs, label_ids)] = list(source.dataset("train", ["a"], batch_size=4))
    assert inputs[cols.HAS_IMAGE].numpy().tolist() == [[1.0]] and inputs["image"].shape == (1, SIZE, SIZE, 3)
    assert label_ids.numpy().tolist() == [0] and inputs["image"].numpy().std() > 0.01  # a photo, not zeros


# --- Memory: the whole job, in a process of its own ----------------------------------------------------------------

MEASURE = """
import json, resource, sys
from beam_jobs.embed_corpus import run
report = run(sys.argv[1:])
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "read": report.read, "embedded": report.embedded, "by_reason": report.dead_lettered_by_reason}))
"""


def run_measured(manifest: str, output: str, encoders: dict) -> dict:
    argv = ["--input", manifest, "--output", output, "--image_encoder", encoders["image"], "--text_encoder",
            encoders["text"], "--max_error_rate", "1"]
    done = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hostile_files_leave_the_jobs_memory_bounded(fixture_encoders, tmp_path):
    rows = corpora.good_rows(12)
    plain = corpora.write_jsonl_manifest(str(tmp_path / "plain"), rows)
    hostile_root = tmp_path / "hostile"
    hostile = corpora.write_jsonl_manifest(str(hostile_root), rows)
    with open(hostile_root / "images" / "huge.jpg", "wb") as handle:
        handle.write(PHOTO_JPEG)
        handle.truncate(1 << 30)  # 1 GB, sparse
    os.mkfifo(hostile_root / "images" / "pipe.jpg")
    corpora.write_file(str(hostile_root / "images" / "animation.gif"), huge_animation())
    extra = [{"id": "huge", "image": "images/huge.jpg"}, {"id": "zeros", "image": "/dev/zero"},
             {"id": "pipe", "image": "images/pipe.jpg"}, {"id": "animation", "image": "images/animation.gif"}]
    with open(hostile, "a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in extra))
    before = run_measured(plain, str(tmp_path / "out_plain"), fixture_encoders)
    after = run_measured(hostile, str(tmp_path / "out_hostile"), fixture_encoders)
    assert (after["read"], after["embedded"]) == (16, 13)  # the animation is embedded: its first frame
    assert after["by_reason"] == {Reason.IMAGE_TOO_LARGE: 1, Reason.IMAGE_NOT_A_FILE: 2}
    assert after["peak_kb"] - before["peak_kb"] < 300 * 1024, (before, after)
