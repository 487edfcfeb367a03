"""APT: approximated prompt tuning (Wu et al. 2023) with image-conditioned prompts, ported to a decoder LLM.

Deep prompt tuning lets every token attend to p extra prompt tokens in every layer. APT replaces that
attention path by a per-token term added to the attention output, so the sequence does not grow:

    A = ReLU(X (P + P W1 W2)^T)      (T x n)   X: the attention block's normalised input
    E = A P                          (T x d)
    w = stop_grad(max_k A[:, k])     (T x 1)
    out = (O + w * E) * exp(s)                 O: the attention output (after o_proj); then the residual add

Here the prompt rows P of each layer are the N projected visual features (zero for rows without an image)
followed by p learnable prompts, so image tokens never enter the sequence. Each position's term depends on
that position's X alone: causal by construction and nothing to keep in the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from memvp_ds.config import ModelConfig, check_at_least
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy, project_visual


@dataclass
class APTOptions:
    """Options of the ``apt`` strategy (``model.apt``; approximated prompt tuning, Wu et al. 2023); see
    docs/strategies/apt.md."""

    prompts: int = 200
    """p: learnable prompt rows per layer, beside the N projected visual tokens (0: the visual tokens alone)."""
    rank: int = 4
    """r of the low-rank map W1 W2 that approximates the prompts' key projection."""

    def validate(self, cfg) -> None:
        check_at_least("model.apt.prompts", self.prompts, 0)
        check_at_least("model.apt.rank", self.rank, 1)


class ApproximatedPrompts(nn.Module):
    """Per layer l: prompts P_l (p x d, N(0, 0.02)), W1_l (d x r, N(0, 1)), W2_l (r x d, zeros), s_l (0).

    Like MemVP's memory, the parameters are used only in this module's forward, which returns new tensors:
    the condition for ZeRO-3 to gather them for forward and backward.
    """

    def __init__(self, layers: int, prompts: int, width: int, rank: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(layers, prompts, width) * 0.02)
        self.down = nn.Parameter(torch.randn(layers, width, rank))
        self.up = nn.Parameter(torch.zeros(layers, rank, width))
        self.log_scale = nn.Parameter(torch.zeros(layers))

    def forward(self, visual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``visual`` (B, N, d) -> visual keys (L, B, N, d), prompt keys (L, p, d), prompts (L, p, d), exp(s) (L,).

        Keys are ``P + P W1 W2`` for the visual rows and the learnable rows alike; the values are the rows
        themselves. The visual values are ``visual`` as given (shared by every layer), so only the keys
        are materialised per layer.
        """
        # W1 W2 stays factored: (L, d, d) would cost more than the (.., r) intermediates for large d.
        visual_keys = visual + torch.matmul(torch.matmul(visual.unsqueeze(0), self.down.unsqueeze(1)),
                                            self.up.unsqueeze(1))
        prompt_keys = self.prompts + torch.matmul(torch.matmul(self.prompts, self.down), self.up)
        # The prompts come back as a new tensor: under ZeRO-3 the parameter itself is released after forward.
        return visual_keys, prompt_keys, self.prompts.clone(), self.log_scale.exp()


class APTStrategy(VisualStrategy):
    """In a packed batch each token's prompt rows are its own sample's: the attention block's inputs are
    moved to a per-sample layout for the prompt term and back (``PackedLayout``)."""

    name = "apt"
    options = APTOptions
    packs_exactly = True

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        width = llm.config.hidden_size
        layers = decoder_layers(llm)
        self.projector = VisualProjector(cfg.visual_dim, width, cfg.projector)
        self.prompts = ApproximatedPrompts(len(layers), cfg.apt.prompts, width, cfg.apt.rank)
        # Tensors of the current forward, kept for the backward recomputation of checkpointed blocks (as MemVP).
        self._terms: Optional[Tuple[torch.Tensor, ...]] = None
        self._layout: Optional[PackedLayout] = None
        for index, layer in enumerate(layers):
            layer.self_attn.register_forward_hook(partial(self._add_prompt_term, index), with_kwargs=True)

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        samples = layout.num_samples if layout is not None else input_ids.shape[0]
        visual = project_visual(self.projector, image_features, has_image, samples, self.cfg.visual_tokens)
        self._terms = (visual, *self.prompts(visual))
        self._layout = layout
        return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)

    def _add_prompt_term(self, index: int, attention: nn.Module, args: tuple, kwargs: dict, output):
        if self._terms is None:
            raise RuntimeError("APT prompts used before the strategy's forward computed them")
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn_out = output[0] if isinstance(output, tuple) else output
        if self._layout is not None:
            x = self._layout.to_samples(x)
        visual, visual_keys, prompt_keys, prompts, scales = (t.to(x.dtype) for t in self._terms)
        scores = F.relu(torch.cat([torch.matmul(x, visual_keys[index].transpose(1, 2)),
                                   torch.matmul(x, prompt_keys[index].transpose(0, 1))], dim=-1))
        visual_scores, prompt_scores = scores.split([visual.shape[1], prompts.shape[1]], dim=-1)
        prompt_out = torch.matmul(visual_scores, visual) + torch.matmul(prompt_scores, prompts[index])
        prompt_out = scores.amax(dim=-1, keepdim=True).detach() * prompt_out
        if self._layout is not None:
            prompt_out = self._layout.to_packed(prompt_out, like=attn_out)
        out = (attn_out + prompt_out) * scales[index]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def forward_flops_per_position_and_layer(self) -> float:
        rows = self.cfg.visual_tokens + self.cfg.apt.prompts
        return 4.0 * self.prompts.prompts.shape[-1] * rows  # X K^T and A V over n = N + p prompt rows
