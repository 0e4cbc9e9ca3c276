"""Everything before the batch: synthetic data, ingest, the grain pipeline, tokenizer, latent cache."""
