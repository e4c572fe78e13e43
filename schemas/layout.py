"""The layout of a job's output folder: the dataset at the top, sidecars under names Parquet readers skip.

    OUTPUT/
      embeddings-SSSSS-of-NNNNN.parquet    the dataset (predict: predictions-*.parquet)
      embeddings-reused-SSSSS-of-NNNNN.parquet   with --reuse: the rows taken from earlier outputs, same schema
      _dead_letters/dead_letters-*.parquet
      _run_report.json
      _SUCCESS                              written last: the run is complete and published
      _staging/                             only while a run works (or after one was killed): never read as data

pandas, pyarrow.dataset, Spark, Hive and DuckDB's Hive partitioning skip files and folders whose names start with `_`
or `.`, so `pandas.read_parquet(OUTPUT)` and `pyarrow.dataset.dataset(OUTPUT)` see the dataset and nothing else,
and a nightly root `ROOT/dt=YYYY-MM-DD/` reads as one dataset with a `dt` column.
"""

from __future__ import annotations

PARQUET_SUFFIX = ".parquet"
EMBEDDINGS_PREFIX = "embeddings"
REUSED_INFIX = "-reused"  # embeddings-reused-*.parquet: the rows a run took from --reuse outputs and checkpoints
PREDICTIONS_PREFIX = "predictions"
DEAD_LETTERS_DIR = "_dead_letters"
DEAD_LETTERS_PREFIX = "dead_letters"
REPORT_NAME = "_run_report.json"
SUCCESS_NAME = "_SUCCESS"
STAGING_DIR = "_staging"
LOCK_NAME = "_lock"
LEGACY_SIDECARS = ("run_report.json", "dead_letters-*.parquet")  # hubembed 0.1's, replaced with --overwrite
CHECKPOINTS_DIR = "checkpoints"  # under _staging/: finished batches of a run, taken back by the rerun of a killed one
