"""The embeddings Parquet: columns, Arrow schema and key-value metadata keys.

One row per embedded record:
  id: string (not null)            label: string (nullable)        <passthrough columns>: string (nullable)
  image_embedding: fixed_size_list<float32>[d_image]   has_image: bool     (when an image encoder is configured)
  text_embedding:  fixed_size_list<float32>[d_text]    has_text:  bool     (when a text encoder is configured)
  embedding: fixed_size_list<float32>[d_image + d_text]  the multimodal vector, image first; a missing modality is
             zeros there, never a shorter vector.
Passthrough values are written as strings (JSON text for non-string values), so the schema is fixed at start
whatever the manifest's types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pyarrow as pa

ID = "id"
LABEL = "label"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
EMBEDDING = "embedding"
HAS_IMAGE = "has_image"
HAS_TEXT = "has_text"
IMAGE_SHA256 = "image_sha256"  # hex SHA-256 of the image bytes embedded (null: no image)
TEXT_SHA256 = "text_sha256"  # hex SHA-256 of the UTF-8 text embedded (null: no text)

# Which vector columns a run writes (--vectors): the multimodal `embedding`, the per-modality ones, or both.
VECTORS_CONCAT = "concat"
VECTORS_MODALITIES = "modalities"
VECTORS_BOTH = "both"
VECTOR_CHOICES = (VECTORS_CONCAT, VECTORS_MODALITIES, VECTORS_BOTH)

# Parquet key-value metadata (bytes keys, JSON or plain-text values), on every file of a run.
META_PREFIX = "hubembed."
META_VERSION = META_PREFIX + "version"  # package version that wrote the file
META_CREATED_AT = META_PREFIX + "created_at"  # ISO-8601 UTC time of the run's launch
META_IMAGE_ENCODER = META_PREFIX + "image_encoder"  # JSON: EncoderSpec of the image encoder, or absent
META_TEXT_ENCODER = META_PREFIX + "text_encoder"  # JSON: EncoderSpec of the text encoder, or absent
META_IMAGE_PREPROCESSING = META_PREFIX + "image_preprocessing"  # JSON: size, resize method, value range
META_L2_NORMALIZE = META_PREFIX + "l2_normalize"  # "true" / "false"
META_EMBEDDING_LAYOUT = META_PREFIX + "embedding_layout"  # JSON: [[column, offset, dim], ...] of `embedding`
META_STORAGE = META_PREFIX + "storage"  # JSON: {"vectors": concat|modalities|both, "dtype": float32|float16}
META_COMPUTE_PRECISION = META_PREFIX + "compute_precision"  # PRECISION_FLOAT32, or PRECISION_MIXED (--mixed_precision)
PRECISION_FLOAT32, PRECISION_MIXED = "float32", "mixed"
# hex SHA-256 of the encoders' content identity, preprocessing, L2 and storage: equal digests, reusable vectors
META_REUSE_KEY = META_PREFIX + "reuse_key"
# The --max_image_pixels the run's images were judged by: a run reusing the rows with a lower limit checks the
# reused images' headers again (transforms.embedding.match_ids)
META_MAX_IMAGE_PIXELS = META_PREFIX + "max_image_pixels"


VECTOR_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def vector_type(dim: int, dtype: str = "float32") -> pa.DataType:
    return pa.list_(VECTOR_DTYPES[dtype], dim)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns of `schema` to write with Parquet's dictionary encoding (pyarrow's `use_dictionary`): all but
    the lists of floats (vectors, probabilities), whose values hardly ever repeat. pyarrow's default tries them too,
    hashing every value until the dictionary outgrows its page: 4,000 rows of 384-d vectors took twice as long to
    write (41 against 19 ms), and the file came out 10 % larger."""
    return [field.name for field in schema
            if not ((pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type))
                    and pa.types.is_floating(field.type.value_type))]


def vector_columns(image_dim: int | None, text_dim: int | None, vectors: str) -> list[tuple[str, int]]:
    """The vector columns a run writes, with their widths, in schema order: the per-modality ones, then `embedding`."""
    columns = []
    if vectors in (VECTORS_MODALITIES, VECTORS_BOTH):
        columns += [(name, dim) for name, dim in ((IMAGE_EMBEDDING, image_dim), (TEXT_EMBEDDING, text_dim))
                    if dim is not None]
    if vectors in (VECTORS_CONCAT, VECTORS_BOTH):
        columns.append((EMBEDDING, (image_dim or 0) + (text_dim or 0)))
    return columns


def embeddings_schema(
    image_dim: int | None,
    text_dim: int | None,
    passthrough: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    vectors: str = VECTORS_BOTH,
    dtype: str = "float32",
) -> pa.Schema:
    """The output schema for a run with these encoder dims (None: modality not configured).

    id, label, passthrough columns, the masks and content fingerprints of the configured modalities, then the
    vector columns `vectors` chooses, of `dtype`.
    """
    if image_dim is None and text_dim is None:
        raise ValueError("at least one of the image and text encoders must be configured")
    fields = [pa.field(ID, pa.string(), nullable=False), pa.field(LABEL, pa.string())]
    fields += [pa.field(name, pa.string()) for name in passthrough]
    if image_dim is not None:
        fields += [pa.field(HAS_IMAGE, pa.bool_(), nullable=False), pa.field(IMAGE_SHA256, pa.string())]
    if text_dim is not None:
        fields += [pa.field(HAS_TEXT, pa.bool_(), nullable=False), pa.field(TEXT_SHA256, pa.string())]
    fields += [pa.field(name, vector_type(dim, dtype), nullable=False)
               for name, dim in vector_columns(image_dim, text_dim, vectors)]
    return pa.schema(fields, metadata=dict(metadata or {}))


def embedding_layout(image_dim: int | None, text_dim: int | None) -> list[list]:
    """Where each modality sits inside `embedding`: [[column, offset, dim], ...], image first."""
    layout, offset = [], 0
    for column, dim in ((IMAGE_EMBEDDING, image_dim), (TEXT_EMBEDDING, text_dim)):
        if dim is not None:
            layout.append([column, offset, dim])
            offset += dim
    return layout


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    """The hubembed.* key-value metadata of a Parquet file's Arrow schema, decoded to str."""
    raw = schema.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)}


def encoder_identity(metadata: Mapping[str, str]) -> dict:
    """What must match between two files for their embeddings to be comparable: the encoders and the layout."""
    keys = (META_IMAGE_ENCODER, META_TEXT_ENCODER, META_IMAGE_PREPROCESSING, META_L2_NORMALIZE, META_EMBEDDING_LAYOUT)
    return {k: json.loads(metadata[k]) if k in metadata and metadata[k][:1] in "[{" else metadata.get(k) for k in keys}


# The fields of an encoder spec (its JSON in the metadata) that decide its vectors: not its path.
FUNCTIONS_FINGERPRINT = "functions_fingerprint"  # written since 2026-12: older specs lack it (see same_identity)
IDENTITY_FIELDS = ("modality", "fingerprint", FUNCTIONS_FINGERPRINT, "signature", "output_key", "image_size", "dim")


def spec_identity(spec: Mapping) -> dict:
    """An EncoderSpec as a dict (its JSON in the Parquet metadata) → the fields that decide its vectors.

    A spec written before fingerprints existed has none: its handle is then the only identity there is.
    """
    fields = IDENTITY_FIELDS if spec.get("fingerprint") else tuple(
        "handle" if field == "fingerprint" else field for field in IDENTITY_FIELDS)
    return {field: spec[field] for field in fields if spec.get(field) is not None}
