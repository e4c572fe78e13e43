"""The embedding job's Parquet as input to the downstream jobs: checked at start, then read.

`inspect_embeddings` lists the files of a glob (any Beam filesystem: local, gs://) and reads only their footers,
so a mismatch fails before any work: every file must have been written with the same encoders as the first one
(`schemas.embeddings.encoder_identity`), and must hold the columns the job needs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import embeddings as cols

# The input columns each feature choice reads: the vectors, and the masks that say which modalities are present.
FEATURE_COLUMNS = {
    "image": (cols.IMAGE_EMBEDDING, cols.HAS_IMAGE),
    "text": (cols.TEXT_EMBEDDING, cols.HAS_TEXT),
    "both": (cols.IMAGE_EMBEDDING, cols.HAS_IMAGE, cols.TEXT_EMBEDDING, cols.HAS_TEXT),
}
VECTOR_COLUMNS = (cols.IMAGE_EMBEDDING, cols.TEXT_EMBEDDING)
MASK_OF = {cols.IMAGE_EMBEDDING: cols.HAS_IMAGE, cols.TEXT_EMBEDDING: cols.HAS_TEXT}


class EmbeddingsInputError(ValueError):
    """Embeddings Parquet that cannot be used as asked; the message is one line, fit for the console."""


@dataclasses.dataclass(frozen=True)
class EmbeddingsInput:
    """The matched files, the first file's hubembed metadata, and the width of each vector column."""

    pattern: str
    paths: tuple[str, ...]
    metadata: dict[str, str]
    identity: dict
    dims: dict[str, int]
    columns: tuple[str, ...]


def match_files(pattern: str) -> list[str]:
    try:
        paths = sorted(m.path for result in FileSystems.match([pattern]) for m in result.metadata_list)
    except Exception as error:  # BeamIOError: a bad bucket, a pattern the filesystem cannot list
        raise EmbeddingsInputError(f"cannot list {pattern!r}: {str(error).splitlines()[0]}") from error
    if not paths:
        raise EmbeddingsInputError(f"no embeddings Parquet files match {pattern!r}")
    return paths


def read_schema(path: str) -> pa.Schema:
    try:
        with FileSystems.open(path) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except Exception as error:  # ArrowInvalid for a file that is not Parquet, IO errors
        raise EmbeddingsInputError(f"{path} is not a readable Parquet file: {str(error).splitlines()[0]}") from error


def _vector_dims(schema: pa.Schema) -> dict[str, int]:
    dims = {}
    for name in VECTOR_COLUMNS:
        if name in schema.names and pa.types.is_fixed_size_list(schema.field(name).type):
            dims[name] = schema.field(name).type.list_size
    return dims


def inspect_embeddings(pattern: str, required_columns: Sequence[str]) -> EmbeddingsInput:
    """Match `pattern` and check every file's footer. Raises EmbeddingsInputError (one line)."""
    paths = match_files(pattern)
    first_schema = read_schema(paths[0])
    metadata = cols.read_metadata(first_schema)
    identity = cols.encoder_identity(metadata)
    dims = _vector_dims(first_schema)
    for path in paths:
        schema = first_schema if path == paths[0] else read_schema(path)
        missing = [name for name in required_columns if name not in schema.names]
        if missing:
            raise EmbeddingsInputError(f"{path} has no {', '.join(missing)} column"
                                       f"{'s' if len(missing) > 1 else ''} (it has {', '.join(schema.names)})")
        if path == paths[0]:
            continue
        other = cols.encoder_identity(cols.read_metadata(schema))
        if other != identity:
            differing = sorted(key for key in identity if identity[key] != other[key])
            raise EmbeddingsInputError(
                f"{path} was embedded with other encoders than {paths[0]} ({', '.join(differing)} differ): "
                "embeddings of different encoders cannot be mixed")
        if _vector_dims(schema) != dims:
            raise EmbeddingsInputError(f"{path} has vector widths {_vector_dims(schema)}, {paths[0]} has {dims}")
    return EmbeddingsInput(pattern, tuple(paths), metadata, identity, dims, tuple(first_schema.names))


def identity_difference(expected: dict, found: dict) -> str:
    """The keys of two encoder identities that differ, with both values shortened, for a one-line error."""
    parts = []
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            short = {name: json.dumps(value, sort_keys=True)[:80] for name, value in
                     (("model", expected.get(key)), ("input", found.get(key)))}
            parts.append(f"{key}: model {short['model']} vs input {short['input']}")
    return "; ".join(parts)


def iter_tables(path: str, columns: Sequence[str], batch_size: int = 4096) -> Iterator[pa.Table]:
    """One Parquet file (any Beam filesystem) → Tables of `columns`, streamed a row group batch at a time."""
    with FileSystems.open(path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=list(columns)):
            yield pa.Table.from_batches([batch])


def read_table(paths: Sequence[str], columns: Sequence[str]) -> pa.Table:
    """All rows of `paths`, `columns` only, in one Table (the classifier stage trains in memory)."""
    tables = [table for path in paths for table in iter_tables(path, columns)]
    return pa.concat_tables(tables) if tables else pa.table({name: [] for name in columns})


def vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed_size_list<float32>[dim] column → [rows, dim] float32, without Python floats in between."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError("null vectors")
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, np.float32).reshape(-1, dim)
