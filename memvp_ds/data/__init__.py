"""memvp_ds.data: prompts and label masks, tokenizers, and streaming data_prep shards into batches."""
