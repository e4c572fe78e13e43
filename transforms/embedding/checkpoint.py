"""Checkpoints: each batch the encoders finish is also written under the output's `_staging/checkpoints/`.

A killed run's rerun reads them back as one more reuse source (transforms.embedding.reuse), so it embeds again at
most the batches that were in flight when it died. They are Parquet files of the output schema, fingerprints and
`hubembed.reuse_key` included, written under a temporary name and renamed, so a file there is always whole; the
run that publishes deletes them with the rest of `_staging/`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import layout
from schemas.embeddings import dictionary_columns
from transforms.embedding.files import matching_files


def checkpoint_files(folder: str) -> list[tuple[str, int]]:
    """(path, size in bytes) of the whole checkpoint files under `folder` (none if it does not exist)."""
    return matching_files(FileSystems.join(folder, "part-*" + layout.PARQUET_SUFFIX))


class CheckpointBatches(beam.DoFn):
    """Tables of freshly embedded rows → the same tables, each first written to `folder` as one Parquet file."""

    def __init__(self, folder: str):
        self._folder = folder

    def setup(self):
        # Several workers start at once: one's mkdirs may lose the race to another's, and that is fine.
        try:
            FileSystems.mkdirs(self._folder)
        except OSError:
            if not FileSystems.exists(self._folder):
                raise

    def process(self, table: pa.Table) -> Iterator[pa.Table]:
        if table.num_rows:
            # Built in memory, then written at once: pyarrow's many small writes through a Python file object cost
            # more than the batch's data. Uncompressed: vectors barely compress, and the file lives one night.
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer, compression="none", use_dictionary=dictionary_columns(table.schema))
            name = f"part-{uuid.uuid4().hex}{layout.PARQUET_SUFFIX}"
            temporary = FileSystems.join(self._folder, "." + name)  # a leading dot: no reader takes it for data
            with FileSystems.create(temporary) as handle:
                handle.write(buffer.getvalue())
            FileSystems.rename([temporary], [FileSystems.join(self._folder, name)])
        yield table
