"""The downstream stage, on the embedding job's Parquet: embeddings_input (checked reads) → split → tft_features
(tf.Transform over Arrow) and training_input (the rows, streamed) → classify (the head) → serving (the exported
model) → predict (batch scoring); fine_tune (trainable encoders from the raw corpus), plots."""
