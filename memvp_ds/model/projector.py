"""The visual projector: CLIP features (C) to the LLM width (d)."""

from __future__ import annotations

import torch
from torch import nn

from memvp_ds.config import ProjectorConfig


class VisualProjector(nn.Module):
    """Linear(C -> hidden) -> SiLU (or GELU, LLaVA-1.5's) -> Linear(hidden -> d), output multiplied by a small scale.

    Xavier-uniform weights, zero biases and the x0.01 output scale follow the official MemVP code: the
    visual term starts small so the frozen LLM's behaviour is barely disturbed at initialisation.
    """

    def __init__(self, visual_dim: int, model_dim: int, cfg: ProjectorConfig):
        super().__init__()
        self.fc1 = nn.Linear(visual_dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, model_dim)
        self.output_scale = cfg.output_scale
        self.activation = nn.functional.gelu if cfg.activation == "gelu" else nn.functional.silu
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.fc1.weight.dtype)
        return self.fc2(self.activation(self.fc1(features))) * self.output_scale
