"""Entry points, one module per job: embed_corpus (the embedding job), train_classifier, predict."""
