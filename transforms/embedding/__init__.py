"""The embedding job's steps, in the order a record meets them: read (ReadCorpus; files) → prepare (PrepareRecords;
image_check, match_ids, reuse) → embed (EmbedRecords; rows, in_flight, checkpoint) → write (WriteEmbeddings,
WriteDeadLetters)."""
