"""Throughput, model FLOPs utilisation and memory."""

from __future__ import annotations

import resource
import sys
from typing import Optional

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
    matmul weights in computed layers (embeddings and skipped layers excluded), against the usual 6N when
    weights train too. Attention adds 4 * layers * width * T forward (QK^T and AV), tripled for backward.
    The trainable part is counted at 6 FLOPs per weight, and the strategy's own per-token terms in each
    computed layer (e.g. MemVP's (T x d) @ (d x M) and (T x M) @ (M x d)) are tripled for backward.
    """
    cfg = model.llm.config
    width, layers = cfg.hidden_size, model.computed_layers
    numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    not_computed = {id(model.llm.get_input_embeddings().weight)}
    if model.skipping:
        for i in model.skipping.skipped:
            inner = model.skipping.layers[i].layer
            not_computed |= {id(p) for p in inner.parameters()} if inner is not None else set()
    frozen = sum(numel(p) for p in model.llm.parameters() if not p.requires_grad and id(p) not in not_computed)
    trainable = sum(numel(p) for p in model.trainable_parameters().values())
    flops = 4 * frozen + 3 * layers * (4 * width * positions_per_row + model.strategy.forward_flops_per_position_and_layer())
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
