"""Throughput, model FLOPs utilisation and memory, plus the rank-0 TensorBoard writer."""

from __future__ import annotations

import os
import resource
import sys
from typing import Dict, Optional

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L40": 181e12, "A10": 125e12, "4090": 165e12, "V100": 125e12,
}


def peak_flops(override_tflops: Optional[float]) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops_per_position(model, positions_per_row: int) -> float:
    """Model FLOPs per processed position for one training step (forward + backward).

    The LLM is frozen, so its backward computes input gradients only: 2N forward + 2N backward for its N
    matmul weights (embeddings excluded), against the usual 6N when weights train too. Attention adds
    4 * layers * width * T forward (QK^T and AV), tripled for backward. The trainable part (projector and
    memory) is counted at 6 FLOPs per weight. MemVP's memory term per layer is a (T x d) @ (d x M) and a
    (T x M) @ (M x d) matmul: 4 * d * M forward, tripled.
    """
    cfg = model.llm.config
    width, layers = cfg.hidden_size, cfg.num_hidden_layers
    embed = model.llm.get_input_embeddings().weight.numel() if hasattr(model.llm.get_input_embeddings(), "weight") else 0
    frozen = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.llm.parameters()) - embed
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.trainable_parameters().values())
    memory_rows = model.strategy.cfg.memvp.memory_rows if model.strategy.name == "memvp" else 0
    flops = 4 * frozen + 3 * 4 * layers * width * positions_per_row + 3 * 4 * layers * width * memory_rows
    return flops + 6 * trainable / max(positions_per_row, 1)


def max_memory_gb() -> float:
    """Peak accelerator memory allocated; on CPU, the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def resident_memory_gb() -> float:
    """Memory held right now: allocated accelerator memory, or the process's resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    import ctypes

    import psutil

    if sys.platform.startswith("linux"):
        # glibc keeps freed heap pages (e.g. each layer's full weights before ZeRO-3 partitioned them)
        # mapped; trim them so that RSS shows what is actually held.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss / 2**30


class ScalarLogger:
    """TensorBoard on rank 0 (a no-op elsewhere); the run directory persists across resumes."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def log(self, scalars: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
