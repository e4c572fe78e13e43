"""Small real corpora in every input format, and the bad inputs a nightly job meets, for the tests."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from encoders.runtime import tf


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A deterministic noise image encoded as `fmt`."""
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_file(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def good_rows(count: int = 6) -> list[dict]:
    """Rows of id, image bytes, text, label, and an extra column."""
    return [{"id": f"item-{i}", "image_bytes": image_bytes(i, fmt="JPEG" if i % 2 else "PNG"),
             "text": f"a sample text number {i} about leaves", "label": ["cat", "dog"][i % 2], "shop": f"s{i % 3}"}
            for i in range(count)]


def write_jsonl_manifest(root: str, rows: list[dict], name: str = "manifest.jsonl") -> str:
    """JSONL with images as files referenced by relative paths."""
    lines = []
    for row in rows:
        out = {k: v for k, v in row.items() if k != "image_bytes"}
        if row.get("image_bytes") is not None:
            out["image"] = f"images/{row['id']}.img"
            write_file(os.path.join(root, out["image"]), row["image_bytes"])
        lines.append(json.dumps(out))
    return write_file(os.path.join(root, name), ("\n".join(lines) + "\n").encode())


def write_csv_manifest(root: str, rows: list[dict]) -> str:
    """CSV with images inline as base64 `image_bytes`."""
    path = os.path.join(root, "manifest.csv")
    os.makedirs(root, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image_bytes", "text", "label", "shop"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image_bytes": base64.b64encode(row["image_bytes"]).decode()})
    return path


def write_parquet_manifest(root: str, rows: list[dict]) -> str:
    path = os.path.join(root, "manifest.parquet")
    os.makedirs(root, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_image_folder(root: str, rows: list[dict]) -> str:
    """root/<label>/<id>.png with a sidecar <id>.txt."""
    for row in rows:
        folder = os.path.join(root, row["label"])
        write_file(os.path.join(folder, f"{row['id']}.png"), row["image_bytes"])
        write_file(os.path.join(folder, f"{row['id']}.txt"), row["text"].encode())
    return root


def write_webdataset(root: str, rows: list[dict], per_shard: int = 4) -> str:
    """shard-000000.tar ... with <key>.jpg|png, <key>.txt, <key>.cls, <key>.json per sample."""
    os.makedirs(root, exist_ok=True)
    shards = [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]
    for number, shard in enumerate(shards):
        with tarfile.open(os.path.join(root, f"shard-{number:06d}.tar"), "w") as tar:
            for row in shard:
                members = {"png": row["image_bytes"], "txt": row["text"].encode(), "cls": row["label"].encode(),
                           "json": json.dumps({"shop": row["shop"]}).encode()}
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{row['id']}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(root, f"shard-{{000000..{len(shards) - 1:06d}}}.tar")


def write_tfrecords(root: str, rows: list[dict], per_file: int = 4) -> str:
    os.makedirs(root, exist_ok=True)
    for number in range(0, len(rows), per_file):
        with tf.io.TFRecordWriter(os.path.join(root, f"part-{number // per_file:05d}.tfrecord")) as writer:
            for row in rows[number:number + per_file]:
                feature = {
                    "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["id"].encode()])),
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["image_bytes"]])),
                    "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["text"].encode()])),
                    "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["label"].encode()])),
                    "shop": tf.train.Feature(bytes_list=tf.train.BytesList(value=[row["shop"].encode()])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return os.path.join(root, "part-*.tfrecord")


def write_bad_manifest(root: str) -> tuple[str, dict[str, str | None]]:
    """A JSONL manifest with every bad case; returns it and, per id, the dead-letter reason (None: embedded)."""
    images = os.path.join(root, "images")
    good_png = image_bytes(1)
    jpeg = image_bytes(2, size=(64, 64), fmt="JPEG")
    png = image_bytes(3, size=(64, 64))
    write_file(os.path.join(images, "good.png"), good_png)
    write_file(os.path.join(images, "empty.jpg"), b"")
    write_file(os.path.join(images, "truncated.jpg"), jpeg[: len(jpeg) // 3])
    write_file(os.path.join(images, "truncated.png"), png[: len(png) // 2])
    write_file(os.path.join(images, "text.jpg"), b"this is not an image at all, just text under a .jpg name\n" * 5)
    write_file(os.path.join(images, "huge.png"), image_bytes(4, size=(1200, 1000)))
    write_file(os.path.join(images, "garbage_after_header.png"), png[:40] + b"\x00" * 200)
    cases: list[tuple[dict, str | None]] = [
        ({"id": "good", "image": "images/good.png", "text": "fine"}, None),
        ({"id": "text-only", "text": "only words here"}, None),
        ({"id": "image-only", "image": "images/good.png"}, None),
        ({"id": "image-empty-text", "image": "images/good.png", "text": "   "}, None),
        ({"id": "missing-file", "image": "images/nope.jpg", "text": "t"}, "image_missing"),
        ({"id": "zero-byte", "image": "images/empty.jpg", "text": "t"}, "image_empty"),
        ({"id": "truncated-jpeg", "image": "images/truncated.jpg", "text": "t"}, "image_corrupt"),
        ({"id": "truncated-png", "image": "images/truncated.png", "text": "t"}, "image_corrupt"),
        ({"id": "garbage-png", "image": "images/garbage_after_header.png", "text": "t"}, "image_corrupt"),
        ({"id": "not-an-image", "image": "images/text.jpg", "text": "t"}, "not_an_image"),
        ({"id": "huge", "image": "images/huge.png", "text": "t"}, "image_too_large"),
        ({"id": "empty-text-no-image", "text": ""}, "no_modality"),
        ({"id": "missing-text-no-image"}, "no_modality"),
        ({"id": "bad-base64", "image_bytes": "%%% not base64 %%%"}, "unreadable_row"),
        ({"text": "no id at all"}, "missing_id"),
        ({"id": "", "text": "blank id"}, "missing_id"),
        ({"id": "dup", "text": "first"}, None),
        ({"id": "dup", "text": "second"}, "duplicate_id"),
    ]
    lines = [json.dumps(row).encode() for row, _ in cases]
    # Non-UTF-8 bytes inside the text field, and a line that is not JSON at all.
    lines.append(b'{"id": "latin1-text", "text": "caf\xe9 cr\xe8me"}')
    lines.append(b"{this is not json")
    manifest = write_file(os.path.join(root, "bad.jsonl"), b"\n".join(lines) + b"\n")
    expected = {row.get("id") or f"<line {n}>": reason for n, (row, reason) in enumerate(cases, 1)}
    expected["latin1-text"] = "text_not_utf8"
    return manifest, expected


def os_name(raw: bytes) -> str:
    """A file name holding any bytes (not UTF-8 too), as Python's os functions take and give it."""
    return os.fsdecode(raw)


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    """A tar file of (member name, data); names may hold bytes that are not UTF-8 (see `os_name`)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return write_file(path, buffer.getvalue())


def example_bytes(features: dict[str, bytes | int | float]) -> bytes:
    """A serialised tf.train.Example with one value per feature, of the feature's Python type."""
    kinds = {bytes: ("bytes_list", tf.train.BytesList), int: ("int64_list", tf.train.Int64List),
             float: ("float_list", tf.train.FloatList)}
    feature = {}
    for key, value in features.items():
        kind, values = kinds[type(value)]
        feature[key] = tf.train.Feature(**{kind: values(value=[value])})
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord_examples(path: str, examples: list[dict[str, bytes | int | float]],
                            compressed: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # TensorFlow takes the name's bytes, which hold whatever the name holds.
    with tf.io.TFRecordWriter(os.fsencode(path), options="GZIP" if compressed else None) as writer:
        for features in examples:
            writer.write(example_bytes(features))
    return path


def write_parquet_with_a_corrupt_row_group(path: str, rows: list[dict], row_group_size: int, broken: int) -> str:
    """A Parquet file whose row group `broken` has its first page header overwritten: the footer, and so every
    other row group, still reads."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    column = pq.ParquetFile(path).metadata.row_group(broken).column(0)
    offset = column.dictionary_page_offset or column.data_page_offset
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 40)
    return path
