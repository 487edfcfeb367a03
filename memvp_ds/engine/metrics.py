"""Throughput, model FLOPs utilisation and memory."""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

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


def attention_flops_per_position(model, context: int) -> float:
    """Model FLOPs per processed position of one training step that no weight matmul accounts for: attention
    (QK^T and AV, 4 * width * context per computed layer) and the strategy's own per-layer terms (e.g.
    MemVP's (T x d) @ (d x M) and (T x M) @ (M x d)), forward tripled for backward. ``context`` is the
    row length when padded, about a sample's length when packed."""
    per_layer = 4 * model.llm.config.hidden_size * context + model.strategy.forward_flops_per_position_and_layer()
    return 3 * model.computed_layers * per_layer


class MatmulFlopCounter:
    """Model FLOPs of the weight matmuls that really run in the forward passes inside ``counting()``.

    Every ``nn.Linear`` and ``nn.Conv1d`` counts by the rows it processes, so each part of the model costs what
    it does: the LM head only at labelled positions, the projector on visual tokens, adapters and LoRA at
    every position of the layers that run (none in a skipped layer), the online CLIP tower on its tokens;
    ``nn.MultiheadAttention`` (the online CLIP's) counts its fused projections and its attention. A frozen
    weight costs 4 FLOPs per weight and row (forward and input gradient: frozen weights get no weight
    gradient), a trainable one 6. Gradient checkpointing's recomputation runs outside ``counting()`` and is
    not counted: this is MFU, not hardware FLOPs.
    """

    def __init__(self, model: nn.Module):
        self.flops = 0.0
        self._active = False
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.register_forward_hook(self._count_weight)
            elif isinstance(module, nn.MultiheadAttention):
                module.register_forward_hook(self._count_attention)

    @contextmanager
    def counting(self) -> Iterator[None]:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def take(self) -> float:
        """FLOPs counted since the last call."""
        flops, self.flops = self.flops, 0.0
        return flops

    def _count_weight(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if self._active:
            out_dim = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            rows = output.numel() // out_dim
            self.flops += _flops_per_weight_and_row(module.weight) * _full_numel(module.weight) * rows

    def _count_attention(self, module: nn.MultiheadAttention, inputs, output) -> None:
        if self._active:
            query = inputs[0]
            width = module.embed_dim
            length = query.shape[1] if module.batch_first or query.dim() == 2 else query.shape[0]
            rows = query.numel() // width
            per_weight = _flops_per_weight_and_row(module.in_proj_weight if module.in_proj_weight is not None
                                                   else module.q_proj_weight)
            self.flops += rows * (per_weight * 4 * width * width + 3 * 4 * width * length)


def _full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()  # ZeRO-3 partitions it


def _flops_per_weight_and_row(param: torch.Tensor) -> int:
    return 6 if param.requires_grad else 4


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
