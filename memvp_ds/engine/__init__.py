"""The engine: DeepSpeed setup, the training loop, checkpoints, logging."""
