"""ReadCorpus: any supported corpus layout → one `Record` per input row (plus read-stage dead letters).

Every format is read through Beam's `fileio` (MatchAll → ReadMatches), so local paths, `gs://` and any other
Beam filesystem work, files are streamed, and each file is read by one worker while many files spread across
workers. Manifests are reshuffled after reading so that one large manifest still fans out to every worker.

Hostile input: no byte a file holds and no file name stops the read. Every row becomes a `Record` or a dead
letter, and what cannot be read (a truncated Parquet, tar or TFRecord file, a CSV quote left open) is one
`unreadable_row` letter for the unreadable rest of its file. In detail:

- Files: a file matched by several patterns is read once; a FIFO, a device or a folder that a pattern matches is
  never opened (`unsupported_file`; a sidecar `.txt` of that kind makes its sample `unreadable_row`), since a read
  would block or never end. Manifests and shards may be compressed
  (`x.jsonl.gz`, `x.csv.bz2`, `x.tar.xz`: any compression Beam knows, by suffix; TFRecord files `.gz` only;
  Parquet never, it compresses inside); a gzip, bz2 or xz file cut short is dead-lettered from where it stops.
  A UTF-8 byte order mark is skipped (JSONL, CSV from Excel). A `.json` file whose first character is `[` is a
  JSON array of row objects, parsed whole (see `MAX_JSON_ARRAY_BYTES`: a larger one is one dead letter asking
  for JSONL, which streams); any other `.json` is JSONL.
- File and member names: kept as Python reads them (bytes that are not UTF-8 as surrogateescape), so files open;
  shuffles carry them as bytes (Beam's str coder refuses such strings), and a record's `source` is printable.
  An id or label made from such a name reaches PrepareRecords, which dead-letters it (`invalid_id`). Only the
  `--input` path itself must be UTF-8 (Beam ships it to workers as an option): a glob can match any name.
- Field types, the same in JSONL, JSON arrays, CSV (all strings), Parquet, TFRecord features and WebDataset
  `.json` members:
  `id`: a string, or an integer (its decimal digits); null, NaN (pandas' null) or blank is no id (`missing_id`
  in PrepareRecords); a float, bool, list or object is `invalid_id` (1.0 is not "1": guessing would merge ids).
  `text`: a string (or bytes, checked as UTF-8 later); null or NaN is no text; anything else is `invalid_field`.
  `label`: a string or an integer; null, NaN or blank is no label; anything else is `invalid_field`.
  `image`: a path or URI string; null, NaN or blank is no image; anything else is `invalid_field`.
  `image_bytes`: bytes (Parquet, TFRecord) or base64 text (JSONL, CSV; whitespace inside is ignored); null or
  blank is none; text that is not base64 is `unreadable_row`; anything else (a number, a list) is `invalid_field`.
  Passthrough columns: strings as they are, bytes as base64, any other value as JSON text. Values nested too
  deep for Python's JSON parser make their row `unreadable_row`.
- CSV: parsed strictly (a quote left open reaches the end of the file or `CSV_MAX_FIELD_CHARS`, and the lines it
  swallowed are one letter naming them); a row with more fields than the header is `unreadable_row`.
- Image folders: every file under the root, at any depth, is read: the label is the first-level folder (none for
  files at the root), the id the path under the root without its extension (`cat/sub/x`). Files sharing that id
  (`x.jpg` and `x.JPG`) are each a record, and PrepareRecords keeps the first by source (`duplicate_id`). A link
  whose target is missing is a record whose image is missing (`image_missing`); a link to a folder is not
  followed, and is dead-lettered (`unsupported_file`), as is any file that is neither an image nor a `.txt`.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import csv
import glob
import gzip
import io
import itertools
import json
import lzma
import math
import os
import posixpath
import reprlib
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from schemas.records import INPUT_FORMATS, MANIFEST_FORMATS, DeadLetter, Reason, Record, Stage
from transforms.dead_letters import dead_letter, printable, route
from transforms.embedding.files import special_kind

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")
MANIFEST_COLUMNS = ("id", "image", "image_bytes", "text", "label")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
    ".tar": "webdataset", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord", ".tfrec": "tfrecord",
}
# Compressions each format reads: manifests and shards through decompressing streams (`_open_stream`), TFRecord
# through tf.data (GZIP only here), Parquet none (it compresses inside, and pyarrow needs to seek).
_COMPRESSIONS = {"jsonl": "any", "csv": "any", "webdataset": "any", "tfrecord": (CompressionTypes.GZIP,),
                 "parquet": ()}
# A JSON array is parsed whole (Python's json has no streaming parser); beyond this it would cost a worker
# gigabytes of objects, and JSONL, which is read line by line, is the format for large manifests.
MAX_JSON_ARRAY_BYTES = 64 * 1024 * 1024
# csv's field limit (128 KiB by default) is process-wide state with no per-reader setting, so it is raised
# once, never lowered, to this bound: a 48 MB image as base64 fits, and a quote left open swallows at most this
# much into memory before its dead letter.
CSV_MAX_FIELD_CHARS = 64 * 1024 * 1024
_BOM = "\ufeff"
_PEEK_BYTES = 64 * 1024


class CorpusConfigError(ValueError):
    """An input that cannot be read as asked; the message is one line, fit for the console."""


def expand_patterns(path: str) -> list[str]:
    """WebDataset-style brace ranges (`shard-{000000..000099}.tar`) → glob patterns Beam can match."""
    return list(braceexpand.braceexpand(path))


def _without_compression(path: str) -> tuple[str, str]:
    """`x.jsonl.gz` → (`x.jsonl`, gzip): the name with the compression suffix Beam recognises removed."""
    compression = CompressionTypes.detect_compression_type(path)
    if compression == CompressionTypes.UNCOMPRESSED:
        return path, compression
    return path.rsplit(".", 1)[0], compression


def infer_format(path: str) -> str:
    """The input format from the path: the file suffix (after any compression suffix) decides, and a folder with
    files in it is an image folder."""
    stripped = path.rstrip("/")
    name, compression = _without_compression(stripped)
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.lower().endswith(suffix):
            readable = _COMPRESSIONS[fmt]
            if compression != CompressionTypes.UNCOMPRESSED and readable != "any" and compression not in readable:
                raise CorpusConfigError(f"{path!r}: {fmt} files cannot be read {compression}-compressed"
                                        + (" (Parquet compresses inside: write it uncompressed)"
                                           if fmt == "parquet" else " (use .gz)"))
            return fmt
    if not any(ch in stripped for ch in "*?[{") and _has_files(FileSystems.join(stripped, "**")):
        return "image_folder"
    raise CorpusConfigError(f"cannot tell the input format of {path!r} from its name: "
                            f"pass --input_format, one of {', '.join(INPUT_FORMATS)}")


def _has_files(pattern: str) -> bool:
    try:
        return bool(FileSystems.match([pattern], limits=[1])[0].metadata_list)
    except Exception:  # BeamIOError when nothing matches
        return False


def _folder_root(path: str) -> str:
    return path.rstrip("/") or "/"


def match_patterns(path: str, input_format: str) -> list[str]:
    """The glob patterns this input reads; at least one file must match at start, else one clear error."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # Beam passes options to its workers as UTF-8 protos; names below the input may hold any bytes.
        raise CorpusConfigError(f"the input path {printable(path)!r} is not valid UTF-8, which Beam cannot pass to "
                                "its workers: match it with a glob instead (a ? for each odd byte)") from None
    if input_format == "image_folder":
        patterns = [FileSystems.join(_folder_root(path), "**")]
    else:
        patterns = expand_patterns(path)
    try:
        # One file per pattern is enough to know the input is there: the full listing happens in the pipeline.
        found = sum(len(result.metadata_list) for result in FileSystems.match(patterns, limits=[1] * len(patterns)))
    except Exception as error:
        raise CorpusConfigError(f"cannot list input {path!r}: {error}") from error
    if not found:
        layout = " (expected root/<label>/<file>)" if input_format == "image_folder" else ""
        raise CorpusConfigError(f"no input files match {path!r}{layout}")
    return patterns


def path_bytes(path: str) -> bytes:
    """A file name as the bytes it has on disk (Python keeps bytes that are not UTF-8 as surrogateescapes): what a
    shuffle can carry, whatever the name, and what TensorFlow opens."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file listing makes; still a distinct, shuffleable key
        return path.encode("utf-8", "surrogatepass")


def path_from_bytes(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class InvalidField(ValueError):
    """A manifest field whose type or content the reader refuses; `reason` is the dead letter's."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _describe(value: Any) -> str:
    """A value for a dead-letter message, bounded in length and depth (a plain repr recurses without end)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 80
    short.maxlevel = 3
    return f"{type(value).__name__} {short.repr(value)}"


def _is_null(value: Any) -> bool:
    """null, or NaN: how pandas spells a missing value in a float or object column."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _string_field(value: Any, field: str, reason: str) -> str | None:
    """An id or label: a string (bytes decoded, invalid UTF-8 kept for PrepareRecords to name) or an integer's
    digits; null, NaN and blank are None; other types raise InvalidField with `reason`."""
    if _is_null(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    elif isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif not isinstance(value, str):
        raise InvalidField(reason, f"the {field} must be a string or an integer, not {_describe(value)}")
    return value if value.strip() else None


def _text_field(value: Any) -> str | bytes | None:
    if _is_null(value):
        return None
    if not isinstance(value, (str, bytes)):
        raise InvalidField(Reason.INVALID_FIELD, f"the text must be a string, not {_describe(value)}")
    return value


def _image_path_field(value: Any) -> str | None:
    if _is_null(value):
        return None
    if not isinstance(value, str):
        raise InvalidField(Reason.INVALID_FIELD, f"image must be a path or URI string, not {_describe(value)}")
    return value if value.strip() else None


def _image_bytes_field(value: Any) -> bytes | None:
    """Bytes as they are; text as base64 (JSONL and CSV carry bytes so); empty is none."""
    if _is_null(value):
        return None
    if isinstance(value, bytes):
        return value or None
    if not isinstance(value, str):
        raise InvalidField(Reason.INVALID_FIELD, f"image_bytes must be bytes or base64 text, not {_describe(value)}")
    compact = "".join(value.split())  # base64 wrapped over lines (MIME style) is still base64
    if not compact:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except ValueError as error:  # binascii.Error, or text that is not ASCII
        raise InvalidField(Reason.UNREADABLE_ROW, f"image_bytes is not base64: {error}") from error


def _passthrough_value(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (RecursionError, TypeError, ValueError) as error:
        raise InvalidField(Reason.INVALID_FIELD, f"passthrough column {name!r} cannot be written as JSON text: "
                                                 f"{type(error).__name__}: {error}") from error


def _resolve(uri: str, base_dir: str) -> str:
    """A manifest's image path: absolute paths and URIs as they are, relative ones against the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return FileSystems.join(base_dir, uri)


def manifest_row_to_record(row: dict, source: str, base_dir: str, passthrough: Sequence[str]) -> Record | DeadLetter:
    """One manifest row (JSONL object, JSON array item, CSV row or Parquet row) → a Record, or the dead letter of
    its first field of the wrong type (the module docstring lists what each field may hold)."""
    try:
        record_id = _string_field(row.get("id"), "id", Reason.INVALID_ID)
    except InvalidField as problem:
        return dead_letter(None, Stage.READ, problem.reason, problem, source=source)
    try:
        image_bytes = _image_bytes_field(row.get("image_bytes"))
        image = _image_path_field(row.get("image"))
        return Record(
            id=record_id,
            source=source,
            image_bytes=image_bytes,
            image_uri=_resolve(image, base_dir) if image and not image_bytes else None,
            text=_text_field(row.get("text")),
            label=_string_field(row.get("label"), "label", Reason.INVALID_FIELD),
            extras={name: _passthrough_value(name, row.get(name)) for name in passthrough},
        )
    except InvalidField as problem:
        return dead_letter(Record(id=record_id, source=source), Stage.READ, problem.reason, problem)


class _BinaryStream(io.RawIOBase):
    """What Beam opened, as a standard raw stream: its CompressedFile (zstd, deflate) has read() but none of io's
    other methods, which line iteration, io.TextIOWrapper and tarfile need. Closing is left to Beam's `with`."""

    def __init__(self, handle) -> None:
        super().__init__()
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# Python's decompressors raise EOFError on a file cut short, where Beam's CompressedFile ends quietly and the rest
# of the file would be lost without a word; Beam's serves the compressions Python has no module for (zstd, deflate).
_STRICT_DECOMPRESSORS = {
    CompressionTypes.GZIP: lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    CompressionTypes.BZIP2: lambda raw: bz2.BZ2File(raw, "rb"),
    CompressionTypes.LZMA: lambda raw: lzma.LZMAFile(raw, "rb"),
}


@contextlib.contextmanager
def _open_stream(readable: fileio.ReadableFile) -> Iterator[io.BufferedIOBase]:
    """A manifest or shard as a buffered binary stream, decompressed by its suffix."""
    decompress = _STRICT_DECOMPRESSORS.get(CompressionTypes.detect_compression_type(readable.metadata.path))
    compression = CompressionTypes.UNCOMPRESSED if decompress else CompressionTypes.AUTO
    with readable.open(mime_type="application/octet-stream", compression_type=compression) as handle:
        with (decompress(handle) if decompress
              else io.BufferedReader(_BinaryStream(handle), buffer_size=1 << 20)) as stream:
            yield stream


def _unreadable_rest(source: str, where: str, error: Exception) -> DeadLetter:
    """The one dead letter for the rest of a file that stops being readable part way (cut short, corrupt)."""
    return dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                       f"{where} the file cannot be read: {type(error).__name__}: {error}", source=source)


def _is_json_array(path: str, stream: io.BufferedIOBase) -> bool:
    """A `.json` file whose first character (after a byte order mark and blanks) is `[`."""
    if not _without_compression(path)[0].lower().endswith(".json"):
        return False
    try:
        head = stream.peek(_PEEK_BYTES).decode("utf-8", "surrogateescape")
    except Exception:  # a stream broken from the start: the line reader dead-letters it
        return False
    return head.lstrip().removeprefix(_BOM).lstrip().startswith("[")


def read_jsonl(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """JSONL (one object per line), or a `.json` file holding a JSON array of objects."""
    path = readable.metadata.path
    shown = printable(path)
    base_dir = posixpath.dirname(path)
    with _open_stream(readable) as stream:
        if _is_json_array(path, stream):
            yield from _json_array_rows(stream, shown, base_dir, passthrough)
            return
        lines = enumerate(stream, start=1)
        line_number = 0
        while True:
            try:
                line_number, raw = next(lines)
            except StopIteration:
                return
            except MemoryError:
                raise
            except Exception as error:  # a decompressor or the filesystem failing part way
                yield _unreadable_rest(f"{shown}:{line_number + 1}", f"from line {line_number + 1} on", error)
                return
            source = f"{shown}:{line_number}"
            # surrogateescape keeps invalid UTF-8 inside the fields, where PrepareRecords names it.
            line = raw.decode("utf-8", errors="surrogateescape")
            line = (line.removeprefix(_BOM) if line_number == 1 else line).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=source)
                continue
            if not isinstance(row, dict):
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                                  f"a JSONL row must be an object, not {type(row).__name__}", source=source)
                continue
            yield manifest_row_to_record(row, source, base_dir, passthrough)


def _json_array_rows(stream: io.BufferedIOBase, shown: str, base_dir: str,
                     passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    try:
        data = stream.read(MAX_JSON_ARRAY_BYTES + 1)
    except MemoryError:
        raise
    except Exception as error:  # a decompressor or the filesystem failing part way
        yield _unreadable_rest(shown, "the JSON array in", error)
        return
    if len(data) > MAX_JSON_ARRAY_BYTES:
        yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                          f"a JSON array over {MAX_JSON_ARRAY_BYTES:,} bytes is not read (it is parsed whole): "
                          "write the manifest as JSONL, one object per line", source=shown)
        return
    try:
        rows = json.loads(data.decode("utf-8", "surrogateescape").lstrip().removeprefix(_BOM))
    except (ValueError, RecursionError) as error:
        yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, f"not a JSON array of objects: {error}",
                          source=shown)
        return
    for number, row in enumerate(rows, start=1):  # a list: the text starts with `[` and parsed whole
        source = f"{shown}#row{number}"
        if not isinstance(row, dict):
            yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                              f"a JSON array row must be an object, not {type(row).__name__}", source=source)
            continue
        yield manifest_row_to_record(row, source, base_dir, passthrough)


def _allow_large_csv_fields() -> None:
    if csv.field_size_limit() < CSV_MAX_FIELD_CHARS:
        csv.field_size_limit(CSV_MAX_FIELD_CHARS)


def _csv_lines(start: int, end: int) -> str:
    return f"line {start}" if end <= start else f"lines {start}-{end}"


def read_csv(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """CSV with a header row; strict quoting, so a quote left open is a dead letter naming the lines it took."""
    path = readable.metadata.path
    shown = printable(path)
    base_dir = posixpath.dirname(path)
    _allow_large_csv_fields()
    with _open_stream(readable) as stream:
        # utf-8-sig drops the byte order mark Excel writes, which would otherwise become part of the first name.
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, strict=True)
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                end = reader.line_num
                lines = _csv_lines(start, end)
                hint = (f" (a quoted field opened at line {start} runs to line {end}: a quote left open?)"
                        if end > start else "")
                if header is None:
                    yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                                      f"the header ({lines}) cannot be read as CSV: {error}{hint}; without it no "
                                      "row of the file can be read", source=f"{shown}:{start}")
                    return
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                                  f"{lines} cannot be read as CSV: {error}{hint}", source=f"{shown}:{start}")
                continue
            except MemoryError:
                raise
            except Exception as error:  # a decompressor or the filesystem failing part way
                yield _unreadable_rest(f"{shown}:{start}", f"from line {start} on", error)
                return
            if not values:  # a blank line
                continue
            if header is None:
                header = values
                continue
            source = f"{shown}:{reader.line_num}"
            if len(values) > len(header):
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                                  f"{_csv_lines(start, reader.line_num)}: {len(values)} fields but the header has "
                                  f"{len(header)} (a separator inside an unquoted value?)", source=source)
                continue
            # Fewer fields than the header: the missing trailing columns are null, as csv.DictReader has them.
            yield manifest_row_to_record(dict(zip(header, values, strict=False)), source, base_dir, passthrough)


def _parquet_rows(batch: pa.RecordBatch) -> list[dict | Exception]:
    """A batch's rows as dicts; when the batch does not convert (a value Python cannot hold, such as a timestamp
    out of datetime's range), row by row, with the exception in place of each row that does not."""
    try:
        return batch.to_pylist()
    except (pa.ArrowException, ValueError, OverflowError):
        rows: list[dict | Exception] = []
        for index in range(batch.num_rows):
            try:
                rows.append(batch.slice(index, 1).to_pylist()[0])
            except (pa.ArrowException, ValueError, OverflowError) as error:
                rows.append(error)
        return rows


def read_parquet(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """The manifest columns (and passthrough ones) of a Parquet file, row group by row group, in batches. A file
    that is not Parquet (or is cut short: its footer is at the end) is one dead letter; a row group that breaks
    part way is one dead letter for its unread rows, and the other row groups are read."""
    path = readable.metadata.path
    shown = printable(path)
    base_dir = posixpath.dirname(path)
    try:
        with readable.open(mime_type="application/octet-stream",
                           compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            present = set(parquet.schema_arrow.names)
            # Only the columns the job uses are read: less I/O, and no failure from a column it never looks at.
            columns = [name for name in dict.fromkeys((*MANIFEST_COLUMNS, *passthrough)) if name in present]
            yield from _parquet_row_groups(parquet, columns, shown, base_dir, passthrough)
    except (pa.ArrowException, OSError) as error:  # no footer, a broken schema: nothing of the file is readable
        yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                          f"not a readable Parquet file: {type(error).__name__}: {error}", source=shown)


def _parquet_row_groups(parquet: pq.ParquetFile, columns: list[str], shown: str, base_dir: str,
                        passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    row_number = 0
    for group in range(parquet.num_row_groups):
        last = row_number + parquet.metadata.row_group(group).num_rows
        try:
            for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
                for row in _parquet_rows(batch):
                    row_number += 1
                    source = f"{shown}#row{row_number}"
                    if isinstance(row, Exception):
                        yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, row, source=source)
                    else:
                        yield manifest_row_to_record(row, source, base_dir, passthrough)
        except (pa.ArrowException, OSError) as error:  # a corrupt page: the rest of its row group is unreadable
            yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                              f"rows {row_number + 1}-{last} (row group {group}) cannot be read: "
                              f"{type(error).__name__}: {error}", source=f"{shown}#row{row_number + 1}")
        row_number = last


def _example_value(example, key: str) -> bytes | int | float | None:
    if not key or key not in example.features.feature:
        return None
    feature = example.features.feature[key]
    for kind in ("bytes_list", "int64_list", "float_list"):
        values = getattr(feature, kind).value
        if values:
            return values[0]
    return None


def _feature_passthrough(name: str, value: bytes | int | float | None) -> str | None:
    """A tf.train.Example feature as text: bytes are text there (invalid UTF-8 kept for PrepareRecords)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return _passthrough_value(name, value)


def _example_record(example, keys: dict[str, str], source: str,
                    passthrough: Sequence[str]) -> Record | DeadLetter:
    try:
        record_id = _string_field(_example_value(example, keys["id"]), "id", Reason.INVALID_ID)
    except InvalidField as problem:
        return dead_letter(None, Stage.READ, problem.reason, problem, source=source)
    try:
        image = _example_value(example, keys["image"])
        if image is not None and not isinstance(image, bytes):
            raise InvalidField(Reason.INVALID_FIELD, f"the image feature must be bytes, not {_describe(image)}")
        return Record(
            id=record_id,
            source=source,
            image_bytes=image or None,
            text=_text_field(_example_value(example, keys["text"])),
            label=_string_field(_example_value(example, keys["label"]), "label", Reason.INVALID_FIELD),
            extras={name: _feature_passthrough(name, _example_value(example, name)) for name in passthrough},
        )
    except InvalidField as problem:
        return dead_letter(Record(id=record_id, source=source), Stage.READ, problem.reason, problem)


def read_tfrecord(readable: fileio.ReadableFile, keys: dict[str, str],
                  passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """tf.train.Example records; feature keys from the options (id, image, text, label)."""
    from encoders.runtime import tf  # the reader is the only TF user before the embed step

    path = readable.metadata.path
    shown = printable(path)
    compressed = CompressionTypes.detect_compression_type(path) == CompressionTypes.GZIP
    # TensorFlow takes a str file name as UTF-8 and refuses one that is not; the name's bytes always open.
    dataset = tf.data.TFRecordDataset(path_bytes(path), compression_type="GZIP" if compressed else "")
    index = -1
    try:
        for index, raw in enumerate(dataset.as_numpy_iterator()):
            source = f"{shown}#{index}"
            try:
                example = tf.train.Example.FromString(raw)
            except Exception as error:  # protobuf DecodeError
                yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=source)
                continue
            yield _example_record(example, keys, source, passthrough)
    except tf.errors.DataLossError as error:  # a truncated or corrupt file: what follows is unreadable
        yield dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, error, source=f"{shown}#{index + 1}")


def _webdataset_key(member_name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, name = posixpath.split(member_name)
    stem, _, extension = name.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def _webdataset_record(shard: str, ordinal: int, key: str, members: dict[str, bytes],
                       passthrough: Sequence[str]) -> Record | DeadLetter:
    source = f"{shard}#{ordinal}:{printable(key)}"
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8", "surrogateescape").lstrip().removeprefix(_BOM))
        except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
            return dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW, f"the .json member: {error}", source=source)
        if not isinstance(meta, dict):
            return dead_letter(None, Stage.READ, Reason.UNREADABLE_ROW,
                               f"the .json member must be an object, not {type(meta).__name__}", source=source)
    try:
        record_id = _string_field(meta.get("id"), "id", Reason.INVALID_ID) or key
    except InvalidField as problem:
        return dead_letter(None, Stage.READ, problem.reason, problem, source=source)
    try:
        label = members.get("cls")
        return Record(
            id=record_id,
            source=source,
            image_bytes=next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None),
            image_uri=None,
            text=members.get("txt"),
            label=(_string_field(label.strip(), "label", Reason.INVALID_FIELD) if label is not None
                   else _string_field(meta.get("label"), "label", Reason.INVALID_FIELD)),
            extras={name: _passthrough_value(name, meta.get(name)) for name in passthrough},
        )
    except InvalidField as problem:
        return dead_letter(Record(id=record_id, source=source), Stage.READ, problem.reason, problem)


def _trailing_data(tar: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows where tarfile stopped. In stream mode tarfile ends quietly at a
    corrupt header part way through (and at the end of the first of two concatenated archives)."""
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            return True
    return False


def _tar_samples(stream: io.BufferedIOBase) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of consecutive members with the same key, streamed; raises where
    the rest of the shard cannot be read."""
    key, members = None, {}
    # Member names are bytes; the same decoding on every worker, invalid UTF-8 kept as surrogateescapes.
    with tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _webdataset_key(member.name)
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[extension] = tar.extractfile(member).read()
        if key is not None:
            yield key, members
        if _trailing_data(tar):
            raise tarfile.ReadError(f"tarfile stops at byte {tar.offset:,} but data follows (a corrupt member "
                                    "header, or tar files concatenated)")


def read_webdataset(readable: fileio.ReadableFile, passthrough: Sequence[str]) -> Iterator[Record | DeadLetter]:
    """One shard, streamed: consecutive members with the same key are one sample (`0001.jpg`, `0001.txt`, ...)."""
    shard = printable(readable.metadata.path)
    with _open_stream(readable) as stream:
        samples = _tar_samples(stream)
        for ordinal in itertools.count():
            try:
                key, members = next(samples)
            except StopIteration:
                return
            except MemoryError:
                raise
            except Exception as error:  # truncated or corrupt shard (tarfile, decompressor): the rest is unreadable
                yield _unreadable_rest(f"{shard}#{ordinal}", f"from sample {ordinal} on", error)
                return
            yield _webdataset_record(shard, ordinal, key, members, passthrough)


def unlisted_local_entries(root: str) -> Iterator[bytes]:
    """The entries under a local `root` that Beam's listing skips without a word: links whose target is missing
    (it drops what it cannot stat) and links to folders (it does not follow them). They go through the same
    grouping as every other file, to become a record or a dead letter. Other filesystems have no such entries."""
    if not isinstance(FileSystems.get_filesystem(root), LocalFileSystem):
        return
    for top in glob.glob(root):  # the root may be a glob (`--input_format image_folder`)
        for folder, folders, files in os.walk(top):
            for name in folders:
                if os.path.islink(os.path.join(folder, name)):
                    yield path_bytes(os.path.join(folder, name))
            for name in files:
                if not os.path.exists(os.path.join(folder, name)):  # exists() follows the link
                    yield path_bytes(os.path.join(folder, name))


def _split_extension(path: str) -> tuple[str, str]:
    """`root/cat/x.JPG` → (`root/cat/x`, `jpg`); a name without a dot has no extension."""
    folder, name = posixpath.split(path)
    if "." not in name:
        return path, ""
    stem, extension = name.rsplit(".", 1)
    return posixpath.join(folder, stem), extension.lower()


def _folder_sample_key(raw_path: bytes) -> tuple[bytes, bytes]:
    """A file of an image folder keyed by its path without extension, so `x.png` meets its `x.txt` sidecar."""
    return path_bytes(_split_extension(path_from_bytes(raw_path))[0]), raw_path


def _is_local_folder(path: str) -> bool:
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem) and os.path.isdir(path)


def image_folder_records(group: tuple[bytes, Sequence[bytes]], root: str) -> Iterator[Record | DeadLetter]:
    """The files of one sample `root/<label>/.../<stem>.*`: each image is a record, `<stem>.txt` their text, and
    a `.txt` without an image a text-only record."""
    _, raw_paths = group
    paths = sorted({path_from_bytes(raw) for raw in raw_paths})  # distinct, in one order on every run
    images, texts = [], []
    for path in paths:
        if path.endswith("/"):  # an object store's folder marker: a name, not a file
            continue
        extension = _split_extension(path)[1]
        if extension in IMAGE_EXTENSIONS:
            images.append(path)
        elif extension == "txt":
            texts.append(path)
        elif _is_local_folder(path):
            yield dead_letter(None, Stage.READ, Reason.UNSUPPORTED_FILE,
                              "a link to a folder, which is not followed: copy the folder in, or link its files",
                              source=printable(path))
        else:
            yield dead_letter(None, Stage.READ, Reason.UNSUPPORTED_FILE,
                              f"not an image ({', '.join(IMAGE_EXTENSIONS)}) nor a .txt sidecar",
                              source=printable(path))
    if not images and not texts:
        return
    # The path below the root, by component count, so that a root given as a glob (`corpus-*`) works too.
    stem = _split_extension((images or texts)[0])[0]
    record_id = "/".join(stem.split("/")[len(root.rstrip("/").split("/")):])
    label = record_id.split("/", 1)[0] if "/" in record_id else None  # files at the root have no label
    for extra in texts[1:]:  # `x.txt` and `x.TXT`: one sidecar is used, the other said so
        yield dead_letter(Record(id=record_id, source=printable(extra)), Stage.READ, Reason.DUPLICATE_ID,
                          f"another text sidecar of {record_id!r}: {printable(texts[0])} is used")
    text = None
    if texts:
        try:
            kind = special_file_kind(texts[0])
            if kind:
                raise OSError(f"it is {kind}, not a regular file")
            with FileSystems.open(texts[0], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                text = handle.read()
        except Exception as error:  # a link to nothing, a permission, a vanished file: by filesystem
            for path in images or texts[:1]:
                yield dead_letter(Record(id=record_id, source=printable(path)), Stage.READ, Reason.UNREADABLE_ROW,
                                  f"its text {printable(texts[0])} cannot be read: {type(error).__name__}: {error}")
            return
    for path in images:
        yield Record(id=record_id, source=printable(path), image_uri=path, text=text, label=label)
    if not images:
        yield Record(id=record_id, source=printable(texts[0]), text=text, label=label)


def _first_of_group(group: tuple[bytes, Sequence[Any]]) -> Any:
    return next(iter(group[1]))


def special_file_kind(path: str) -> str | None:
    """What a local path is when it is not a regular file, or None. Such a file is never opened: a FIFO blocks a
    read for ever, a device such as /dev/zero never ends, a folder is no file. Object stores hold none of them."""
    if FileSystems.get_scheme(path) is not None:
        return None
    try:
        return special_kind(os.stat(path).st_mode)
    except OSError:  # gone, or a link to nothing: the open that follows says so
        return None


def read_file(readable: fileio.ReadableFile, reader, *args: Any) -> Iterator[Record | DeadLetter]:
    """`reader(readable, *args)`, unless the file is a FIFO, a device or a folder (a pattern can name any of
    them): then one `unsupported_file` letter, and the file is never opened."""
    kind = special_file_kind(readable.metadata.path)
    if kind:
        yield dead_letter(None, Stage.READ, Reason.UNSUPPORTED_FILE, f"{kind}, not a regular file: never read",
                          source=printable(readable.metadata.path))
        return
    yield from reader(readable, *args)


class ReadCorpus(beam.PTransform):
    """path + format → (records, dead_letters). `records_read` counts both, unless `count_read` is off (a second
    read of the same corpus: see `again`). `fan_out` spreads a manifest's rows over the workers (a manifest file
    is read by one); on a single worker it would only hold them all in memory."""

    def __init__(self, path: str, input_format: str, passthrough: Sequence[str] = (),
                 tfrecord_keys: dict[str, str] | None = None, fan_out: bool = True, count_read: bool = True):
        super().__init__()
        self._fan_out = fan_out
        self._count_read = count_read
        self._path = path
        self._format = input_format
        self._passthrough = tuple(passthrough)
        self._tfrecord_keys = dict(tfrecord_keys or {})

    def again(self) -> ReadCorpus:
        """The same read, not counted: PrepareRecords reads the corpus a second time for its ids alone."""
        return ReadCorpus(self._path, self._format, self._passthrough, self._tfrecord_keys, fan_out=False,
                          count_read=False)

    def expand(self, pipeline):
        patterns = match_patterns(self._path, self._format)
        matched = (pipeline
                   | "Patterns" >> beam.Create(patterns)
                   | "Match" >> fileio.MatchAll())
        # Names travel as bytes through shuffles: Beam's str coder refuses names that are not UTF-8.
        if self._format == "image_folder":
            root = _folder_root(self._path)
            unlisted = (pipeline
                        | "Root" >> beam.Create([root])
                        | "UnlistedEntries" >> beam.FlatMap(unlisted_local_entries))
            grouped = ((matched | "Paths" >> beam.Map(lambda metadata: path_bytes(metadata.path)), unlisted)
                       | "AllPaths" >> beam.Flatten()
                       | "KeyBySample" >> beam.Map(_folder_sample_key)
                       | "GroupSidecars" >> beam.GroupByKey())
            return route("ToRecords", grouped, image_folder_records, root, count_read=self._count_read)
        # A file that overlapping patterns (`m/{a,*}.jsonl`) match twice is read once; the shuffle also spreads
        # the files over the workers.
        files = (matched
                 | "KeyByPath" >> beam.Map(lambda metadata: (path_bytes(metadata.path), metadata))
                 | "GroupByPath" >> beam.GroupByKey()
                 | "DistinctFiles" >> beam.Map(_first_of_group))
        readers = {"jsonl": (read_jsonl,), "csv": (read_csv,), "parquet": (read_parquet,),
                   "webdataset": (read_webdataset,), "tfrecord": (read_tfrecord, self._tfrecord_keys)}
        readables = files | "Open" >> fileio.ReadMatches()
        records, dead = route("ToRecords", readables, read_file, *readers[self._format], self._passthrough,
                              count_read=self._count_read)
        if self._fan_out and self._format in MANIFEST_FORMATS:
            records = records | "FanOut" >> beam.Reshuffle()
        return records, dead
