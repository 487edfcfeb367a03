"""data_prep: images -> CLIP features -> verified WebDataset shards."""
