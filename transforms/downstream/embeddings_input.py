"""The embedding job's Parquet as input to the downstream jobs: checked at start, then read.

`inspect_embeddings` lists the files of a glob (any Beam filesystem: local, gs://) and reads only their footers,
so a mismatch fails before any work: every file must have been written with the same encoders as the first one
(`embeddings_identity`: the encoders' content fingerprints and how they were called, not their paths), and must
hold the columns the job needs.
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
from schemas.layout import EMBEDDINGS_PREFIX, PARQUET_SUFFIX

# The input columns each feature choice reads: the vectors, and the masks that say which modalities are present.
FEATURE_COLUMNS = {
    "image": (cols.IMAGE_EMBEDDING, cols.HAS_IMAGE),
    "text": (cols.TEXT_EMBEDDING, cols.HAS_TEXT),
    "both": (cols.IMAGE_EMBEDDING, cols.HAS_IMAGE, cols.TEXT_EMBEDDING, cols.HAS_TEXT),
}
VECTOR_COLUMNS = (cols.IMAGE_EMBEDDING, cols.TEXT_EMBEDDING)
MASK_OF = {cols.IMAGE_EMBEDDING: cols.HAS_IMAGE, cols.TEXT_EMBEDDING: cols.HAS_TEXT}
ENCODER_KEYS = (cols.META_IMAGE_ENCODER, cols.META_TEXT_ENCODER)


class EmbeddingsInputError(ValueError):
    """Embeddings Parquet that cannot be used as asked; the message is one line, fit for the console."""


@dataclasses.dataclass(frozen=True)
class EmbeddingsInput:
    """The matched files, the first file's hubembed metadata, and the width of each vector column."""

    pattern: str
    paths: tuple[str, ...]
    metadata: dict[str, str]
    identity: dict  # embeddings_identity(metadata)
    dims: dict[str, int]
    columns: tuple[str, ...]


def content_identity(identity: dict) -> dict:
    """An encoder identity (`schemas.embeddings.encoder_identity`, or one a model recorded) with each encoder spec
    reduced to what decides its vectors (`schemas.embeddings.spec_identity`): the same model at another path has
    the same identity. Idempotent, so a model's recorded identity can be passed through it again."""
    return {key: cols.spec_identity(value) if key in ENCODER_KEYS and isinstance(value, dict) else value
            for key, value in identity.items()}


def without_functions_fingerprints(identity: dict) -> dict:
    """A content identity as hubembed recorded it before it fingerprinted the modules' functions
    (`encoders.function_library.functions_fingerprint`)."""
    return {key: {field: value for field, value in spec.items() if field != cols.FUNCTIONS_FINGERPRINT}
            if key in ENCODER_KEYS and isinstance(spec, dict) else spec for key, spec in identity.items()}


def same_identity(first: dict, second: dict) -> bool:
    """Whether two content identities name the same encoders, called the same way. One recorded before function
    fingerprints existed has none: it is then compared without them, as it was when it was written (what it was
    accepted on then, it is accepted on now; two identities that both have them are compared on them)."""
    if first == second:
        return True
    older = without_functions_fingerprints(first)
    return older == without_functions_fingerprints(second) and (older == first or older == second)


def embeddings_identity(metadata: dict[str, str]) -> dict:
    """What must match between two embedding files (or a file and a model) for their vectors to be comparable:
    the encoders' content identity, the image preprocessing, the L2 normalisation and the layout."""
    return content_identity(cols.encoder_identity(metadata))


def dataset_pattern(path: str) -> str:
    """A job's output folder → the glob of its dataset files; a glob or a file stays as it is."""
    if any(ch in path for ch in "*?[{") or path.endswith(PARQUET_SUFFIX):
        return path
    return FileSystems.join(path.rstrip("/"), f"{EMBEDDINGS_PREFIX}-*{PARQUET_SUFFIX}")


def match_files(pattern: str) -> list[str]:
    """The Parquet files of `pattern`: an output folder (its `embeddings-*.parquet`), a glob, or a file."""
    pattern = dataset_pattern(pattern)
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


def derivable_columns(schema: pa.Schema) -> dict[str, tuple[int, int]]:
    """The per-modality vector columns a file does not store but holds inside `embedding` (`--vectors concat`):
    column → (offset, width), from `hubembed.embedding_layout`."""
    if cols.EMBEDDING not in schema.names:
        return {}
    layout = json.loads(cols.read_metadata(schema).get(cols.META_EMBEDDING_LAYOUT, "[]"))
    return {name: (offset, dim) for name, offset, dim in layout if name not in schema.names}


def available_columns(schema: pa.Schema) -> list[str]:
    """What `iter_tables` can give from a file: its columns and the per-modality vectors inside `embedding`."""
    return [*schema.names, *derivable_columns(schema)]


def _vector_dims(schema: pa.Schema) -> dict[str, int]:
    dims = {name: dim for name, (_, dim) in derivable_columns(schema).items()}
    for name in VECTOR_COLUMNS:
        if name in schema.names and pa.types.is_fixed_size_list(schema.field(name).type):
            dims[name] = schema.field(name).type.list_size
    return dims


def inspect_embeddings(pattern: str, required_columns: Sequence[str]) -> EmbeddingsInput:
    """Match `pattern` and check every file's footer. Raises EmbeddingsInputError (one line)."""
    paths = match_files(pattern)
    first_schema = read_schema(paths[0])
    metadata = cols.read_metadata(first_schema)
    identity = embeddings_identity(metadata)
    dims = _vector_dims(first_schema)
    for path in paths:
        schema = first_schema if path == paths[0] else read_schema(path)
        missing = [name for name in required_columns if name not in available_columns(schema)]
        if missing:
            raise EmbeddingsInputError(f"{path} has no {', '.join(missing)} column"
                                       f"{'s' if len(missing) > 1 else ''} (it has {', '.join(schema.names)})")
        if path == paths[0]:
            continue
        other = embeddings_identity(cols.read_metadata(schema))
        if not same_identity(identity, other):
            raise EmbeddingsInputError(
                f"{path} was embedded with other encoders than {paths[0]} "
                f"({identity_difference(identity, other, ('first', 'this'))}): "
                "embeddings of different encoders cannot be mixed")
        if _vector_dims(schema) != dims:
            raise EmbeddingsInputError(f"{path} has vector widths {_vector_dims(schema)}, {paths[0]} has {dims}")
    return EmbeddingsInput(pattern, tuple(paths), metadata, identity, dims, tuple(first_schema.names))


def identity_difference(expected: dict, found: dict, names: tuple[str, str] = ("model", "input")) -> str:
    """What differs between two encoder identities, for a one-line error: each differing key (and, inside an
    encoder spec, each differing field: `hubembed.text_encoder.fingerprint`) with both values shortened."""
    def short(value) -> str:
        return json.dumps(value, sort_keys=True)[:80]

    parts = []
    for key in sorted(set(expected) | set(found)):
        left, right = expected.get(key), found.get(key)
        if left == right:
            continue
        if isinstance(left, dict) and isinstance(right, dict):
            parts += [f"{key}.{field}: {names[0]} {short(left.get(field))} vs {names[1]} {short(right.get(field))}"
                      for field in sorted(set(left) | set(right)) if left.get(field) != right.get(field)]
        else:
            parts.append(f"{key}: {names[0]} {short(left)} vs {names[1]} {short(right)}")
    return "; ".join(parts)


def iter_tables(path: str, columns: Sequence[str], batch_size: int = 4096) -> Iterator[pa.Table]:
    """One Parquet file (any Beam filesystem) → Tables of `columns`, streamed a row group batch at a time.

    Whatever `--vectors` and `--float16` the embedding job wrote, the vectors come as float32 and the per-modality
    columns are there: sliced out of `embedding` when only the concatenation was stored.
    """
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        slices = {name: at for name, at in derivable_columns(parquet.schema_arrow).items() if name in columns}
        stored = [name for name in columns if name not in slices]
        read = stored + ([cols.EMBEDDING] if slices and cols.EMBEDDING not in stored else [])
        for batch in parquet.iter_batches(batch_size=batch_size, columns=read):
            table = pa.Table.from_batches([batch])
            arrays = {name: _float32_vectors(table.column(name)) for name in stored}
            if slices:
                matrix = vectors(table.column(cols.EMBEDDING), table.schema.field(cols.EMBEDDING).type.list_size)
            for name, (offset, dim) in slices.items():
                arrays[name] = pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(matrix[:, offset:offset + dim]).reshape(-1)), dim)
            yield pa.table({name: arrays[name] for name in columns})


def _float32_vectors(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A float16 vector column (`--float16`) as float32; any other column as it is."""
    if pa.types.is_fixed_size_list(column.type) and pa.types.is_float16(column.type.value_type):
        return column.cast(pa.list_(pa.float32(), column.type.list_size))
    return column


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
    return np.asarray(flat, np.float32).reshape(-1, dim)  # float16 (`--float16`) widened here too
