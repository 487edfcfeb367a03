"""APT: approximated prompt tuning (Wu et al. 2023), ported to a decoder LLM.

Deep prompt tuning lets every token attend to p extra prompt tokens in every layer. APT replaces that
attention path by a per-token term added to the attention output, so the prompts never enter the sequence:

    A = ReLU(X (P + P W1 W2)^T)      (T x n)   X: the attention block's normalised input
    E = A P                          (T x d)
    w = stop_grad(max_k A[:, k])     (T x 1)
    out = (O + w * E) * exp(s)                 O: the attention output (after o_proj); then the residual add

``model.apt.visual`` says where the image is:

* ``sequence`` (default, the authors' setup): APT tunes a model that already sees the image. The N
  projected visual tokens go in front of the text as in ``input_prefix``, and P holds the p learnable
  prompts of each layer.
* ``prompt_rows`` (this project's extension): the image never enters the sequence; P is the N projected
  visual features (zero for rows without an image) followed by the p learnable prompts.

Either way each position's term depends on that position's X (and its own sample's image) alone: causal by
construction, nothing extra to keep in the KV cache, and exact in a packed batch (the visual tokens go in
the positions the data layer reserves; the visual rows are read per sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial, reduce
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, ModelConfig, check_at_least, check_choice
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.projector import VisualProjector
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy, project_visual
from memvp_ds.model.strategies.input_prefix import prepend_visual_tokens

APT_VISUAL = ("sequence", "prompt_rows")


@dataclass
class APTOptions:
    """Options of the ``apt`` strategy (``model.apt``; approximated prompt tuning, Wu et al. 2023); see
    docs/strategies/apt.md."""

    visual: str = "sequence"
    """Where the image is. ``sequence`` (official setup): the N visual tokens precede the text, as in
    input_prefix, and APT tunes p learnable prompts per layer. ``prompt_rows`` (this project's extension):
    no visual tokens in the sequence; each layer's prompt rows are the N visual features plus p prompts."""
    prompts: int = 200
    """p: learnable prompt rows per layer (official: 200 on METER, 50 on ViLT). With ``visual=prompt_rows``,
    0 leaves the visual rows alone."""
    rank: int = 4
    """r of the low-rank map W1 W2 that approximates the prompts' key projection (official: 4)."""

    def validate(self, cfg) -> None:
        check_choice("model.apt.visual", self.visual, APT_VISUAL)
        check_at_least("model.apt.prompts", self.prompts, 0)
        check_at_least("model.apt.rank", self.rank, 1)
        if cfg.model.strategy == "apt" and self.visual == "sequence" and self.prompts == 0:
            raise ConfigError("model.apt.prompts: 0 with model.apt.visual=sequence would tune nothing but the "
                              "projector (that is input_prefix); set p >= 1")


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

    def forward(self, visual: Optional[torch.Tensor]
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """``visual`` (B, N, d) or None -> visual keys (L, B, N, d) or None, prompt keys (L, p, d),
        prompts (L, p, d), exp(s) (L,).

        Keys are ``P + P W1 W2`` for the visual rows and the learnable rows alike; the values are the rows
        themselves. The visual values are ``visual`` as given (shared by every layer), so only the keys
        are materialised per layer.
        """
        # W1 W2 stays factored: (L, d, d) would cost more than the (.., r) intermediates for large d.
        visual_keys = None
        if visual is not None:
            visual_keys = visual + torch.matmul(torch.matmul(visual.unsqueeze(0), self.down.unsqueeze(1)),
                                                self.up.unsqueeze(1))
        prompt_keys = self.prompts + torch.matmul(torch.matmul(self.prompts, self.down), self.up)
        # The prompts come back as a new tensor: under ZeRO-3 the parameter itself is released after forward.
        return visual_keys, prompt_keys, self.prompts.clone(), self.log_scale.exp()


class APTStrategy(VisualStrategy):
    name = "apt"
    options = APTOptions

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        width = llm.config.hidden_size
        layers = decoder_layers(llm)
        self.in_sequence = cfg.apt.visual == "sequence"
        self.projector = VisualProjector(cfg.visual_dim, width, cfg.projector)
        self.prompts = ApproximatedPrompts(len(layers), cfg.apt.prompts, width, cfg.apt.rank)
        # A plain list keeps the frozen embedding out of this module's parameters (it belongs to the LLM).
        self._embed_tokens = [llm.get_input_embeddings()]
        # Tensors of the current forward, kept for the backward recomputation of checkpointed blocks (as MemVP).
        self._terms: Optional[Tuple[Optional[torch.Tensor], ...]] = None
        self._layout: Optional[PackedLayout] = None
        for index, layer in enumerate(layers):
            layer.self_attn.register_forward_hook(partial(self._add_prompt_term, index), with_kwargs=True)

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        self._layout = layout
        if self.in_sequence:
            self._terms = (None, *self.prompts(None))
            return prepend_visual_tokens(self._embed_tokens[0], self.projector, input_ids, attention_mask,
                                         image_features, has_image, layout)
        samples = layout.num_samples if layout is not None else input_ids.shape[0]
        visual = project_visual(self.projector, image_features, has_image, samples, self.cfg.visual_tokens)
        self._terms = (visual, *self.prompts(visual))
        return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)

    def _add_prompt_term(self, index: int, attention: nn.Module, args: tuple, kwargs: dict, output):
        if self._terms is None:
            raise RuntimeError("APT prompts used before the strategy's forward computed them")
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn_out = output[0] if isinstance(output, tuple) else output
        visual, visual_keys, prompt_keys, prompts, scales = (None if t is None else t.to(x.dtype) for t in self._terms)
        terms, maxima = [], []
        if prompts.shape[1]:
            scores = F.relu(torch.matmul(x, prompt_keys[index].transpose(0, 1)))
            terms.append(torch.matmul(scores, prompts[index]))
            maxima.append(scores.amax(dim=-1, keepdim=True))
        if visual is not None:
            # Each sample's own visual rows: a packed row's positions go to a per-sample layout and back.
            per_sample_x = x if self._layout is None else self._layout.to_samples(x)
            scores = F.relu(torch.matmul(per_sample_x, visual_keys[index].transpose(1, 2)))
            term, peak = torch.matmul(scores, visual), scores.amax(dim=-1, keepdim=True)
            if self._layout is not None:
                term, peak = self._layout.to_packed(term, like=x), self._layout.to_packed(peak, like=x[..., :1])
            terms.append(term)
            maxima.append(peak)
        # w is the largest attention score over all prompt rows, visual and learnable alike.
        weight = reduce(torch.maximum, maxima).detach()
        out = (attn_out + weight * sum(terms)) * scales[index]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def decoding_rows(self) -> Tuple[torch.Tensor, ...]:
        visual, visual_keys = self._terms[:2]
        # Visual keys are (layers, B, N, d): batch first for the server, back in set_decoding_rows.
        return () if visual is None else (visual, visual_keys.transpose(0, 1))

    def set_decoding_rows(self, rows: Tuple[torch.Tensor, ...]) -> None:
        if rows:  # the prompt rows are the same for every row
            self._terms = (rows[0], rows[1].transpose(0, 1), *self._terms[2:])

    def prefix_positions(self) -> int:
        return self.cfg.visual_tokens if self.in_sequence else 0

    def forward_flops_per_position_and_layer(self) -> float:
        rows = self.cfg.apt.prompts + (0 if self.in_sequence else self.cfg.visual_tokens)
        return 4.0 * self.prompts.prompts.shape[-1] * rows  # X K^T and A V over n prompt rows
