"""The dead-letter Parquet: one row per record that did not reach the embeddings."""

import pyarrow as pa

ID = "id"
REASON = "reason"
MESSAGE = "message"

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field(ID, pa.string()),  # null when the record had no id
    pa.field("source", pa.string(), nullable=False),  # file:line, shard.tar#key, file.tfrecord#n
    pa.field("stage", pa.string(), nullable=False),  # read | prepare | embed
    pa.field(REASON, pa.string(), nullable=False),  # a schemas.records.Reason code
    pa.field("error_class", pa.string(), nullable=False),  # the exception class, or the check that failed
    pa.field(MESSAGE, pa.string(), nullable=False),
])
