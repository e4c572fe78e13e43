"""The sinks: embeddings and dead letters as sharded Parquet, through Beam's file sinks.

Beam's FileBasedSink writes each bundle to a temporary file and renames the files into place only when the
whole write finalises, so a failed or retried bundle never leaves a partial or duplicate file in the output.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes

from schemas.dead_letters import DEAD_LETTER_SCHEMA
from schemas.embeddings import dictionary_columns
from schemas.layout import PARQUET_SUFFIX
from transforms.dead_letters import CountDeadLetters

# The batched sink writes a row group per Table it is given, and the job's Tables are model batches of 8-32 rows:
# without gathering them, a file of 10,000 rows held hundreds of row groups, slow to open for every reader and for
# --reuse. Not Beam's WriteToParquet's 64 MiB: a bundle's last row group is written after its last model batch, on
# the run's critical path (a 6,000-row run ended 0.24 s sooner with 16 MiB; about 4,000 rows of 1,024-d vectors).
ROW_GROUP_BYTES = 16 * 1024 * 1024


def one_table(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks()


class ParquetTableSink(FileBasedSink):
    """Beam's file sink for pyarrow Tables, a row group per Table, as `WriteToParquetBatched`'s, except that the
    writer dictionary-encodes only `dictionary_columns`, never the vectors (whose dictionary only slowed the write
    and grew the file); Beam's takes no such option. Snappy-compressed, as the job's files always were."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__(file_path_prefix, coder=None, file_name_suffix=PARQUET_SUFFIX, num_shards=num_shards,
                         mime_type="application/x-parquet", compression_type=CompressionTypes.UNCOMPRESSED)
        self._schema = schema

    def open(self, temp_path: str) -> tuple:
        handle = super().open(temp_path)
        return handle, pq.ParquetWriter(handle, self._schema, compression="snappy",
                                        use_dictionary=dictionary_columns(self._schema))

    def write_record(self, file_handle: tuple, value: pa.Table) -> None:
        file_handle[1].write_table(value)

    def close(self, file_handle: tuple) -> None:
        handle, writer = file_handle
        writer.close()
        handle.close()


class WriteEmbeddings(beam.PTransform):
    """pyarrow Tables of `schema` → `<prefix>-SSSSS-of-NNNNN.parquet` (num_shards 0: the runner chooses), the
    Tables of a bundle gathered into row groups of about ROW_GROUP_BYTES."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self._prefix = file_path_prefix
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, tables):
        return (tables
                | "ToRowGroups" >> beam.BatchElements(min_batch_size=ROW_GROUP_BYTES, max_batch_size=ROW_GROUP_BYTES,
                                                      element_size_fn=lambda table: table.nbytes)
                | "Concatenate" >> beam.Map(one_table)
                | "WriteParquet" >> beam.io.Write(ParquetTableSink(self._prefix, self._schema, self._num_shards)))


class WriteDeadLetters(beam.PTransform):
    """Dead letters from every step → counted (in total and by reason) → `<prefix>-*.parquet`."""

    def __init__(self, file_path_prefix: str, progress=None):
        super().__init__()
        self._prefix = file_path_prefix
        self._progress = progress

    def expand(self, dead_letters):
        return (dead_letters
                | "Count" >> beam.ParDo(CountDeadLetters(self._progress))
                | "ToRows" >> beam.Map(dataclasses.asdict)
                | "WriteParquet" >> beam.io.WriteToParquet(
                    self._prefix, schema=DEAD_LETTER_SCHEMA, file_name_suffix=PARQUET_SUFFIX, num_shards=1))
