"""The pipelines' PTransforms and DoFns, a folder per stage: embedding/ (the embedding job's read → prepare →
embed → write) and downstream/ (the classifier stage on its Parquet); beside them what both stages share: the one
image decoder (image_decode), dead-letter routing and counters (dead_letters), progress and run reports (report)."""
