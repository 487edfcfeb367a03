"""Task metrics and batched generation for evaluation."""
