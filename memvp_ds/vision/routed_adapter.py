"""LaVIN's routed mixture-of-modality adapter, used in the LLM's blocks (the lavin strategy) and in CLIP's
(the online tower's LaVIN form): it lives in the vision layer so both towers can import it."""

from __future__ import annotations

import torch
from torch import nn


class RoutedAdapter(nn.Module):
    """LaVIN's mixture-of-modality adapter (``RepAdapter_Router``), residual included:

        a = Dropout(A x)
        out = x + s * (w_0 B(a) + w_1 D(a))

    A: Linear(d -> h) (Xavier-uniform weight, zero bias); B and D: grouped Linear(h -> d) with ``groups``
    groups (the official 1x1 Conv1d with groups=2: output channel block g reads hidden block g only), both
    zero, so a fresh adapter is the identity. The weights w = softmax(router(m) / t) come from a
    "modality" vector m per sample (``route``) and are passed to ``forward``. The router keeps PyTorch's
    default Linear init, as officially.
    """

    def __init__(self, width: int, hidden: int, scale: float, temperature: float, dropout: float, groups: int = 2):
        super().__init__()
        if hidden % groups or width % groups:
            raise ValueError(f"adapter hidden width {hidden} and model width {width} must divide by {groups} groups")
        self.down = nn.Linear(width, hidden)
        self.expert_b = GroupedLinear(hidden, width, groups)
        self.expert_d = GroupedLinear(hidden, width, groups)
        self.router = nn.Linear(width, 2)
        self.dropout = nn.Dropout(dropout)
        self.scale, self.temperature = scale, temperature
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def route(self, modality: torch.Tensor) -> torch.Tensor:
        """(..., d) modality vectors -> (..., 2) expert weights."""
        logits = self.router(modality.to(self.router.weight.dtype))
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, residual: bool = True) -> torch.Tensor:
        """``x`` (..., d); ``weights`` (..., 2) broadcastable against x's leading dimensions. ``residual=False``
        returns the expert mix alone (LaVIN-DAS's replacement of a skipped block, ``res=False``)."""
        hidden = self.dropout(self.down(x.to(self.down.weight.dtype)))
        weights = weights.to(hidden.dtype)
        mixed = (self.scale * (self.expert_b(hidden) * weights[..., :1] + self.expert_d(hidden) * weights[..., 1:]))
        return x + mixed.to(x.dtype) if residual else mixed.to(x.dtype)


class GroupedLinear(nn.Module):
    """Linear(h -> d) split into ``groups`` independent blocks (a 1x1 grouped convolution); starts at zero."""

    def __init__(self, hidden: int, width: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(groups, width // groups, hidden // groups))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.unflatten(-1, (self.groups, -1))
        out = torch.einsum("...gi,goi->...go", blocks, self.weight)
        return out.flatten(-2) + self.bias
