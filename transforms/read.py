"""ReadCorpus: any supported corpus layout → one `Record` per input row (plus read-stage dead letters).

Every format is read through Beam's `fileio` (MatchAll → ReadMatches), so local paths, `gs://` and any other
Beam filesystem work, files are streamed, and each file is read by one worker while many files spread across
workers. Manifests are reshuffled after reading so that one large manifest still fans out to every worker.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import braceexpand
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from schemas.records import DeadLetter, Reason, Record, Stage
from transforms.dead_letters import dead_letter, route

MANIFEST_FORMATS = ("jsonl", "csv", "parquet")
INPUT_FORMATS = (*MANIFEST_FORMATS, "image_folder", "webdataset", "tfrecord")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
    ".tar": "webdataset", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord", ".tfrec": "tfrecord",
}


class CorpusConfigError(ValueError):
    """An input that cannot be read as asked; the message is one line, fit for the console."""


def expand_patterns(path: str) -> list[str]:
    """WebDataset-style brace ranges (`shard-{000000..000099}.tar`) → glob patterns Beam can match."""
    return list(braceexpand.braceexpand(path))


def infer_format(path: str) -> str:
    """The input format from the path: the file suffix decides, and a folder with files in it is an image folder."""
    stripped = path.rstrip("/")
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if stripped.lower().endswith(suffix):
            return fmt
    if not any(ch in stripped for ch in "*?[{") and _has_files(FileSystems.join(stripped, "*", "*")):
        return "image_folder"
    raise CorpusConfigError(f"cannot tell the input format of {path!r} from its name: "
                            f"pass --input_format, one of {', '.join(INPUT_FORMATS)}")


def _has_files(pattern: str) -> bool:
    try:
        return bool(FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # BeamIOError when nothing matches
        return False


def match_patterns(path: str, input_format: str) -> list[str]:
    """The glob patterns this input reads; at least one file must match at start, else one clear error."""
    if input_format == "image_folder":
        patterns = [FileSystems.join(path.rstrip("/"), "*", "*")]
    else:
        patterns = expand_patterns(path)
    try:
        found = sum(len(result.metadata_list) for result in FileSystems.match(patterns))
    except Exception as error:
        raise CorpusConfigError(f"cannot list input {path!r}: {error}") from error
    if not found:
        layout = " (expected root/<label>/<file>)" if input_format == "image_folder" else ""
        raise CorpusConfigError(f"no input files match {path!r}{layout}")
    return patterns


def _clean(value: Any) -> str | None:
    """A manifest cell as an optional string: None, NaN and blank become None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _passthrough_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return json.dumps(value, sort_keys=True, default=str)


def _resolve(uri: str, base_dir: str) -> str:
    """A manifest's image path: absolute paths and URIs as they are, relative ones against the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return FileSystems.join(base_dir, uri)


def manifest_row_to_record(row: dict, source: str, base_dir: str, passthrough: Sequence[str]) -> Record | DeadLetter:
    """One manifest row (JSONL object, CSV row or Parquet row) → a Record."""
    image_bytes = row.get("image_bytes")
    if isinstance(image_bytes, str):  # JSONL and CSV carry bytes as base64 text
        try:
            image_bytes = base64.b64decode(image_bytes, validate=True) if image_bytes.strip() else None
        except ValueError as error:
            return dead_letter(Record(id=_clean(row.get("id")), source=source), Stage.READ, Reason.UNREADABLE_ROW,
                               ValueError(f"image_bytes is not base64: {error}"))
    image = _clean(row.get("image"))
    text = row.get("text")
    return Record(
        id=_clean(row.get("id")),
        source=source,
        image_bytes=image_bytes or None,
        image_uri=_resolve(image, base_dir) if image and not image_bytes else None,
        text=text if isinstance(text, (str, bytes)) or text is None else str(text),
        label=_clean(row.get("label")),
        extras={name: _passthrough_value(row.get(name)) for name in passthrough},
    )


def read_jsonl(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    path = readable.metadata.path
    base_dir = posixpath.dirname(path)
    with readable.open() as handle:
        for line_number, raw in enumerate(handle, start=1):
            source = f"{path}:{line_number}"
            # surrogateescape keeps invalid UTF-8 inside the text field, where PrepareRecords names it.
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=source)
                continue
            if not isinstance(row, dict):
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                                  f"a JSONL row must be an object, not {type(row).__name__}", source=source)
                continue
            yield manifest_row_to_record(row, source, base_dir, passthrough)


def read_csv(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    path = readable.metadata.path
    base_dir = posixpath.dirname(path)
    with readable.open() as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=f"{path}:{reader.line_num}")
                continue
            yield manifest_row_to_record(row, f"{path}:{reader.line_num}", base_dir, passthrough)


def read_parquet(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    path = readable.metadata.path
    base_dir = posixpath.dirname(path)
    with readable.open() as handle:
        row_number = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                yield manifest_row_to_record(row, f"{path}#row{row_number}", base_dir, passthrough)


def _example_value(example, key: str) -> bytes | int | float | None:
    if not key or key not in example.features.feature:
        return None
    feature = example.features.feature[key]
    for kind in ("bytes_list", "int64_list", "float_list"):
        values = getattr(feature, kind).value
        if values:
            return values[0]
    return None


def _as_text(value: bytes | int | float | None) -> str | None:
    if value is None:
        return None
    return _clean(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value)


def read_tfrecord(readable: fileio.ReadableFile, keys: dict[str, str],
                  passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """tf.train.Example records; feature keys from the options (id, image, text, label)."""
    from encoders.runtime import tf  # the reader is the only TF user before the embed step

    path = readable.metadata.path
    dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
    index = -1
    try:
        for index, raw in enumerate(dataset.as_numpy_iterator()):
            source = f"{path}#{index}"
            try:
                example = tf.train.Example.FromString(raw)
            except Exception as error:  # protobuf DecodeError
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=source)
                continue
            image = _example_value(example, keys["image"])
            text = _example_value(example, keys["text"])
            yield Record(
                id=_as_text(_example_value(example, keys["id"])),
                source=source,
                image_bytes=image if isinstance(image, bytes) and image else None,
                text=text if isinstance(text, bytes) else _as_text(text),
                label=_as_text(_example_value(example, keys["label"])),
                extras={name: _as_text(_example_value(example, name)) for name in passthrough},
            )
    except tf.errors.DataLossError as error:  # a truncated or corrupt file: what follows is unreadable
        yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=f"{path}#{index + 1}")


def _webdataset_key(member_name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, name = posixpath.split(member_name)
    stem, _, extension = name.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def _webdataset_record(shard: str, ordinal: int, key: str, members: dict[str, bytes],
                       passthrough: Sequence[str]) -> Record | DeadLetter:
    source = f"{shard}#{ordinal}:{key}"
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as error:
            return dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=source)
        if not isinstance(meta, dict):
            meta = {}
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    label = members.get("cls")
    return Record(
        id=_clean(meta.get("id")) or key,
        source=source,
        image_bytes=image,
        image_uri=None,
        text=members.get("txt"),
        label=_as_text(label.strip()) if label is not None else _clean(meta.get("label")),
        extras={name: _passthrough_value(meta.get(name)) for name in passthrough},
    )


def read_webdataset(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """One shard, streamed: consecutive members with the same key are one sample (`0001.jpg`, `0001.txt`, ...)."""
    shard = readable.metadata.path
    key, members, ordinal = None, {}, 0
    with readable.open() as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = _webdataset_key(member.name)
                    if member_key != key and key is not None:
                        yield _webdataset_record(shard, ordinal, key, members, passthrough)
                        ordinal, members = ordinal + 1, {}
                    key = member_key
                    members[extension] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:  # truncated shard: the rest of it is unreadable
            yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=f"{shard}#{ordinal}:{key}")
            return
    if key is not None:
        yield _webdataset_record(shard, ordinal, key, members, passthrough)


def _folder_key(path: str) -> tuple[str, str]:
    folder, name = posixpath.split(path)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return folder, stem


def image_folder_records(group: tuple[tuple[str, str], list[str]]) -> Iterator[Record | DeadLetter]:
    """All files of one `root/<label>/<stem>.*`: each image is a record, `<stem>.txt` its text."""
    (folder, stem), paths = group
    label = posixpath.basename(folder)
    by_extension = {path.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else "": path
                    for path in sorted(paths)}
    text = None
    if "txt" in by_extension:
        with FileSystems.open(by_extension["txt"]) as handle:
            text = handle.read()
    images = [path for ext, path in by_extension.items() if ext in IMAGE_EXTENSIONS]
    for ext, path in by_extension.items():
        if ext != "txt" and ext not in IMAGE_EXTENSIONS:
            yield dead_letter(None, Stage.READ, Reason.UNSUPPORTED_FILE,
                              f"not an image ({', '.join(IMAGE_EXTENSIONS)}) nor a .txt sidecar", source=path)
    for path in images:
        yield Record(id=f"{label}/{stem}", source=path, image_uri=path, text=text, label=label)
    if not images and text is not None:
        yield Record(id=f"{label}/{stem}", source=by_extension["txt"], text=text, label=label)


class ReadCorpus(beam.PTransform):
    """path + format → (records, dead_letters). `records_read` counts both."""

    def __init__(self, path: str, input_format: str, passthrough: Sequence[str] = (),
                 tfrecord_keys: dict[str, str] | None = None):
        super().__init__()
        self._path = path
        self._format = input_format
        self._passthrough = tuple(passthrough)
        self._tfrecord_keys = dict(tfrecord_keys or {})

    def expand(self, pipeline):
        patterns = match_patterns(self._path, self._format)
        files = (pipeline
                 | "Patterns" >> beam.Create(patterns)
                 | "Match" >> fileio.MatchAll())
        if self._format == "image_folder":
            grouped = (files
                       | "Paths" >> beam.Map(lambda metadata: metadata.path)
                       | "KeyByStem" >> beam.Map(lambda path: (_folder_key(path), path))
                       | "GroupSidecars" >> beam.GroupByKey())
            return route("ToRecords", grouped, image_folder_records, count_read=True)
        readers = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet, "webdataset": read_webdataset}
        readables = files | "Open" >> fileio.ReadMatches()
        if self._format == "tfrecord":
            keys = self._tfrecord_keys
            records, dead = route("ToRecords", readables,
                                  lambda readable, passthrough: read_tfrecord(readable, keys, passthrough),
                                  self._passthrough, count_read=True)
        else:
            records, dead = route("ToRecords", readables, readers[self._format], self._passthrough,
                                  count_read=True)
        if self._format in MANIFEST_FORMATS:
            # One manifest file is read by one worker; spread its rows before the expensive steps.
            records = records | "FanOut" >> beam.Reshuffle()
        return records, dead
