"""MemVP: projected visual features become extra key/value memory of every FFN (Jie et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, ModelConfig, check_at_least
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy, project_visual


@dataclass
class MemVPOptions:
    """Options of the ``memvp`` strategy (``model.memvp``; Jie et al., ICML 2024)."""

    memory_rows: int = 400
    """M: visual tokens are zero-padded to M rows; the extra rows act as learnable memory slots
    (official: 320 for 7B, 400 for 13B)."""
    memory_scale: float = 0.1
    """s in ``out = h + FFN(x) + s * Dropout(SiLU(x K^T)) V``."""
    dropout: float = 0.1
    """Dropout on the memory scores SiLU(x K^T) (training only)."""

    def validate(self, cfg) -> None:
        check_at_least("model.memvp.memory_rows", self.memory_rows, 1)
        rows = cfg.model.visual_tokens * cfg.data.max_images
        if cfg.model.strategy == "memvp" and rows > self.memory_rows:
            raise ConfigError(f"model.visual_tokens ({cfg.model.visual_tokens}) x data.max_images "
                              f"({cfg.data.max_images}) exceeds model.memvp.memory_rows ({self.memory_rows}): every "
                              "visual token of every image needs a memory row")


class VisualMemory(nn.Module):
    """P1 ("memory keys", randn * 0.02) and P2 ("memory values", zeros), shared by all layers.

    A module of its own whose forward returns K and V as tensors: ZeRO-3 gathers a module's parameters
    around its forward and, through hooks on its tensor outputs, again for its backward. Keeping P1/P2
    here, used nowhere else, is what makes MemVP safe under ZeRO-3.
    """

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.memory_keys = nn.Parameter(torch.randn(1, rows, width) * 0.02)
        self.memory_values = nn.Parameter(torch.zeros(1, rows, width))

    def forward(self, visual_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return visual_rows + self.memory_keys, visual_rows + self.memory_values


class MemVPStrategy(VisualStrategy):
    """``out = h + FFN(x) + s * Dropout(SiLU(x K^T)) V`` in every decoder block, with x = ffn_norm(h).

    K = Z + P1 and V = Z + P2, where Z is the projected visual features (zeroed for text-only rows) padded
    with zero rows to M; with several images per sample, Z holds each image's N rows in turn (zero for an
    empty slot), so the memory has k x N distinct image rows (the projector works row by row). K/V are built once in ``forward`` and read by a forward hook on each block's
    ``mlp``, whose input is exactly x, so the FFN input is computed once and the HF module tree (and its
    weight names) is unchanged. In a packed batch each token's memory is its own sample's K/V: the FFN
    inputs are moved to a per-sample layout for the memory term and back.
    """

    name = "memvp"
    options = MemVPOptions

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        width = llm.config.hidden_size
        self.projector = VisualProjector(cfg.visual_dim, width, cfg.projector)
        self.memory = VisualMemory(cfg.memvp.memory_rows, width)
        self.memory_scale = cfg.memvp.memory_scale
        self.dropout = nn.Dropout(cfg.memvp.dropout)
        # K/V of the current forward. Deliberately kept after forward returns: backward through a
        # gradient-checkpointed block re-runs the hook, which must see the very same K/V tensors.
        self._keys: Optional[torch.Tensor] = None
        self._values: Optional[torch.Tensor] = None
        self._layout: Optional[PackedLayout] = None
        for layer in decoder_layers(llm):
            layer.mlp.register_forward_hook(self._add_memory_term)

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        rows = self.memory.memory_keys.shape[1]
        if image_features is not None and image_features.shape[1] > rows:
            raise ValueError(
                f"{image_features.shape[1]} visual tokens exceed the {rows} memory rows (model.memvp.memory_rows)"
            )
        samples = layout.num_samples if layout is not None else input_ids.shape[0]
        visual = project_visual(self.projector, image_features, has_image, samples, rows)
        visual = F.pad(visual, (0, 0, 0, rows - visual.shape[1]))
        self._keys, self._values = self.memory(visual)
        self._layout = layout
        return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)

    def decoding_rows(self) -> Tuple[torch.Tensor, ...]:
        return self._keys, self._values

    def set_decoding_rows(self, rows: Tuple[torch.Tensor, ...]) -> None:
        self._keys, self._values = rows

    def forward_flops_per_position_and_layer(self) -> float:
        rows, width = self.memory.memory_keys.shape[1:]
        return 4.0 * width * rows  # (T x d) @ (d x M) and (T x M) @ (M x d)

    def _add_memory_term(self, mlp: nn.Module, args: tuple, ffn_out: torch.Tensor) -> torch.Tensor:
        ffn_in = args[0]
        if self._keys is None:
            raise RuntimeError("MemVP memory used before the strategy's forward computed K/V")
        if self._layout is not None:
            ffn_in = self._layout.to_samples(ffn_in)
        # .to() is a no-op when trainable and frozen weights share a dtype (the DeepSpeed case); it only
        # copies when fp32 trainable tensors meet a bf16 LLM outside autocast.
        scores = F.silu(torch.matmul(ffn_in, self._keys.transpose(1, 2).to(ffn_in.dtype)))
        memory_out = torch.matmul(self.dropout(scores), self._values.to(ffn_in.dtype))
        if self._layout is not None:
            memory_out = self._layout.to_packed(memory_out, like=ffn_out)
        return ffn_out + self.memory_scale * memory_out
