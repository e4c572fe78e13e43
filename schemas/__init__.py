"""Every schema and metadata key of hubembed, defined once.

- `records`: the in-pipeline input record and the dead-letter reasons.
- `embeddings`: the Arrow schema of the embeddings Parquet, its column names and its key-value metadata keys.
- `dead_letters`: the Arrow schema of the dead-letter Parquet.
- `report`: the run report of the row-in, row-out jobs (embed_corpus, predict).
- `predictions`: the predictions Parquet and the predict job's run report.
- `training`: the training report and what a trained model records about its inputs.
"""
