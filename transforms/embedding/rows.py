"""Records and vectors → Arrow RecordBatches of the output schema, for freshly embedded and for reused rows alike.

NumPy matrices become `FixedSizeListArray`s directly, in the schema's value type (float32 or float16), with no
Python float in between.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from schemas import embeddings as cols
from schemas.records import Record


def vector_column(vectors: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(vectors, value_type.to_pandas_dtype()).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values, value_type), vectors.shape[1])


def record_columns(records: Sequence[Record], schema: pa.Schema, passthrough: Sequence[str], has_image: np.ndarray,
                   has_text: np.ndarray, vectors: dict[str, np.ndarray | pa.FixedSizeListArray]) -> pa.RecordBatch:
    """One RecordBatch of `schema`: the records' own fields, the masks, and the vector columns from `vectors`
    (NumPy matrices, or Arrow columns of the schema's type taken as they are)."""
    columns = {
        cols.ID: pa.array([record.id for record in records], pa.string()),
        cols.LABEL: pa.array([record.label for record in records], pa.string()),
        cols.HAS_IMAGE: pa.array(has_image, pa.bool_()),
        cols.HAS_TEXT: pa.array(has_text, pa.bool_()),
        cols.IMAGE_SHA256: pa.array([record.image_sha256 for record in records], pa.string()),
        cols.TEXT_SHA256: pa.array([record.text_sha256 for record in records], pa.string()),
    }
    for name in passthrough:
        columns[name] = pa.array([record.extras.get(name) for record in records], pa.string())
    arrays = []
    for field in schema:
        if field.name in columns:
            arrays.append(columns[field.name])
        elif isinstance(vectors[field.name], pa.Array):
            arrays.append(vectors[field.name])
        else:
            arrays.append(vector_column(vectors[field.name], field.type.value_type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
