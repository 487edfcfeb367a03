"""Bottleneck adapter: the light trainable block used by DVP+adapter and by DAS for skipped layers."""

from __future__ import annotations

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """``W_up SiLU(W_down x)`` (the caller adds the residual). W_up starts at zero, so a fresh adapter adds
    nothing: inserting one leaves the frozen model's output unchanged until it trains."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.silu(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)
