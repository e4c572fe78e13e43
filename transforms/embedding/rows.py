"""Records and vectors → Arrow RecordBatches of the output schema, for freshly embedded and for reused rows alike.

NumPy matrices become `FixedSizeListArray`s directly, in the schema's value type (float32 or float16), with no
Python float in between.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from schemas import embeddings as cols
from schemas.records import Record

# Arrow's own variable for its default pool: a user's choice, which choose_arrow_memory_pool leaves in force.
ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def choose_arrow_memory_pool() -> str:
    """Make jemalloc (else the system's malloc) this process's Arrow memory pool, unless the user chose one in
    ARROW_DEFAULT_MEMORY_POOL; returns the name of the pool in force.

    pyarrow's default, mimalloc, takes its memory in 2 MiB huge pages, and on this project's VMs the first touch
    of each cost about 16 ms (a 64 MiB buffer: 0.6 s of system time and 39 page faults, against 0.03 s with
    jemalloc). Every process paid it for its first row groups: the text job's last row group took 0.3-0.5 s to
    write against 0.02 s, and a 4,000-caption run ended 0.7 s sooner with jemalloc, the free-model image job 5 %.
    The job's Arrow buffers are batches and row groups, freed once written: nothing that huge pages speed up.

    Called as each of the job's processes starts (beam_jobs.launch.job_main, beam_jobs.sdk_worker), and in the
    setup of the DoFns that build tables, for remote workers, whose processes are not the job's. A night whose 6,000
    records were all reused took 1.6-2.1 s of pipeline with jemalloc, 2.7-2.9 s with mimalloc.
    """
    if not os.environ.get(ARROW_POOL_VARIABLE):
        for pool_factory in (pa.jemalloc_memory_pool, pa.system_memory_pool):
            try:
                pa.set_memory_pool(pool_factory())
                break
            except NotImplementedError:  # a pyarrow built without jemalloc
                continue
    return pa.default_memory_pool().backend_name


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
