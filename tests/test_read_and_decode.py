"""Image decoding in TensorFlow, and the readers' handling of broken containers and stray files."""

from __future__ import annotations

import io
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from beam_jobs.embed_corpus import run
from encoders.runtime import tf
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from transforms.embedding.read import expand_patterns, infer_format
from transforms.image_decode import decode_batch_or_zeros, make_image_decoder


def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


RED = (255, 0, 0)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("BMP", "RGB"),
                                      ("WEBP", "RGB"), ("GIF", "P"), ("JPEG", "RGB")])
def test_decoder_gives_rgb_in_unit_range_at_the_module_size(fmt, mode):
    colour = Image.new("RGB", (20, 10), RED)
    image = colour.convert(mode) if mode != "P" else colour.quantize(colors=2)
    save_args = {"lossless": True} if fmt == "WEBP" else {}
    pixels = make_image_decoder(16)(encoded(image, fmt, **save_args)).numpy()
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    if mode == "L":  # grey: the three channels are equal
        np.testing.assert_allclose(pixels[..., 0], pixels[..., 2])
    else:
        np.testing.assert_allclose(pixels.mean(axis=(0, 1)), [1.0, 0.0, 0.0], atol=0.02)


def test_a_batch_decodes_to_each_image_decoded_alone_and_empty_bytes_to_zeros():
    """The serving model's batch path: the pixels fine-tune training gets image by image (to float32 rounding: the
    batch is scaled by one vectorised division), turned upright alike; "" is no image."""
    gradient = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    images = [encoded(gradient, "JPEG", exif=_exif_orientation(6)), b"",
              encoded(gradient.rotate(90, expand=True), "PNG")]
    batch = decode_batch_or_zeros(tf.constant(images), 16).numpy()
    alone = make_image_decoder(16)
    np.testing.assert_allclose(batch[0], alone(images[0]).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(batch[1], np.zeros((16, 16, 3), np.float32))
    np.testing.assert_allclose(batch[2], alone(images[2]).numpy(), rtol=1e-6, atol=1e-7)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour).quantize(colors=2) for colour in (RED, (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    pixels = make_image_decoder(8)(buffer.getvalue()).numpy()
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), [1.0, 0.0, 0.0], atol=0.02)


def test_format_inference_and_brace_expansion(tmp_path):
    assert infer_format("gs://bucket/m.jsonl") == "jsonl"
    assert infer_format("corpus/part-*.tfrecord") == "tfrecord"
    assert infer_format("shards/shard-{000000..000003}.tar") == "webdataset"
    corpora.write_image_folder(str(tmp_path / "folder"), corpora.good_rows(2))
    assert infer_format(str(tmp_path / "folder")) == "image_folder"
    assert expand_patterns("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]


def test_truncated_webdataset_shard_is_dead_lettered_and_the_rest_embedded(fixture_encoders, tmp_path):
    rows = corpora.good_rows(8)
    pattern = corpora.write_webdataset(str(tmp_path / "shards"), rows, per_shard=4)
    second = tmp_path / "shards" / "shard-000001.tar"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    output = str(tmp_path / "out")
    report = run(["--input", pattern, "--output", output, "--image_encoder", fixture_encoders["image"],
                  "--text_encoder", fixture_encoders["text"], "--max_error_rate", "1"])
    assert report.read == report.embedded + report.dead_lettered
    assert report.embedded >= 4 and report.dead_lettered_by_reason.get("unreadable_row") == 1
    dead = read_parquet_dir(output, "dead_letters").to_pylist()
    assert "shard-000001.tar" in dead[0]["source"]


def test_image_folder_stray_files_and_text_only_samples(fixture_encoders, tmp_path):
    root = tmp_path / "folder"
    corpora.write_image_folder(str(root), corpora.good_rows(3))
    corpora.write_file(str(root / "cat" / "notes.pdf"), b"%PDF-1.4")
    corpora.write_file(str(root / "dog" / "lonely.txt"), b"a caption without its picture")
    output = str(tmp_path / "out")
    report = run(["--input", str(root), "--output", output, "--image_encoder", fixture_encoders["image"],
                  "--text_encoder", fixture_encoders["text"], "--max_error_rate", "1"])
    assert (report.read, report.embedded, report.dead_lettered_by_reason) == (5, 4, {"unsupported_file": 1})
    embedded = {row["id"]: row for row in read_parquet_dir(output, "embeddings").to_pylist()}
    assert embedded["dog/lonely"]["has_text"] and not embedded["dog/lonely"]["has_image"]
    assert embedded["dog/lonely"]["label"] == "dog"


def test_tfrecord_with_custom_keys_and_a_corrupt_file(fixture_encoders, tmp_path):
    rows = corpora.good_rows(4)
    pattern = corpora.write_tfrecords(str(tmp_path / "tfr"), rows, per_file=2)
    broken = tmp_path / "tfr" / "part-00001.tfrecord"
    broken.write_bytes(broken.read_bytes()[:-10])
    output = str(tmp_path / "out")
    report = run(["--input", pattern, "--output", output, "--image_encoder", fixture_encoders["image"],
                  "--text_encoder", fixture_encoders["text"], "--tfrecord_label_key", "shop", "--max_error_rate", "1"])
    assert report.read == report.embedded + report.dead_lettered
    assert report.dead_lettered_by_reason.get("unreadable_row") == 1
    labels = {row["id"]: row["label"] for row in read_parquet_dir(output, "embeddings").to_pylist()}
    assert labels["item-0"] == "s0" and labels["item-1"] == "s1"


def test_progress_lines_while_running(fixture_encoders, tmp_path, caplog):
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(6))
    with caplog.at_level(logging.INFO, logger="hubembed"):
        run(["--input", manifest, "--output", str(tmp_path / "out"), "--image_encoder", fixture_encoders["image"],
             "--text_encoder", fixture_encoders["text"], "--progress_interval", "0", "--batch_size", "2",
             "--min_batch_size", "2"])
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert progress and "rows/s" in progress[-1] and "dead-lettered" in progress[-1]


def test_webdataset_member_names_with_folders(fixture_encoders, tmp_path):
    shard = tmp_path / "nested-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a/b/x1.png", corpora.image_bytes(1)), ("a/b/x1.txt", b"hello"),
                           ("a/b/x2.txt", b"second"), ("a/b/x2.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    output = str(tmp_path / "out")
    run(["--input", str(shard), "--output", output, "--image_encoder", fixture_encoders["image"],
         "--text_encoder", fixture_encoders["text"]])
    rows = {row["id"]: row for row in read_parquet_dir(output, "embeddings").to_pylist()}
    assert set(rows) == {"a/b/x1", "a/b/x2"}
    assert rows["a/b/x2"]["label"] == "7" and not rows["a/b/x2"]["has_image"]
    assert os.path.exists(os.path.join(output, "_run_report.json"))
