"""DVP: dynamic visual prompting (Huang et al. 2023), ported to a decoder-only LLM.

A cross-attention reads the CLIP patch features with a query built from the text, and produces ONE compact,
text-related visual prompt vector per sample. The original inserts it as an extra token at layer K of an
encoder, where every token attends to it. A decoder-only LLM with a KV cache cannot grow the sequence in
the middle of the stack (the layers below K would have one cache entry fewer than the ones above), so this
port adds the prompt to the residual stream at the input of layer K instead: at the query position (the
last prompt token, whose hidden state there has seen the whole prompt and is the query) and at every
position after it, i.e. the answer and, in generation, each decoded token. Adding it at the query
position alone was tried first and learnt nothing on the quickstart task: later tokens then reach the
prompt only through frozen attention to one position (docs/strategies/dvp.md has the figures).

K comes from the KAB-APP search (memvp_ds.search.dvp); during the search every layer has its own prompt
generator and the search sets which one is active for each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from memvp_ds.config import ConfigError, ModelConfig
from memvp_ds.model.adapters import BottleneckAdapter
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy


@dataclass
class DVPOptions:
    """Options of the ``dvp`` strategy (``model.dvp``; dynamic visual prompting, Huang et al. 2023); see
    docs/strategies/dvp.md."""

    layer: Optional[int] = None
    """K: the decoder layer whose input receives the visual prompt. Unset: taken from ``from_search``, or,
    under ``train.mode=dvp_search``, every layer is a candidate."""
    from_search: Optional[str] = None
    """Output directory of a ``train.mode=dvp_search`` run: fills ``layer`` from its search.json when unset."""
    heads: int = 16
    """Attention heads of the prompt generator's cross-attention."""
    inner_dim: int = 512
    """Width of the cross-attention (queries from the text state, keys/values from the CLIP features)."""
    dropout: float = 0.1
    """Attention dropout of the cross-attention (training only)."""
    adapters: bool = False
    """DVP + adapter: bottleneck adapters after every attention and MLP output."""
    adapter_reduction: int = 64
    """Adapter hidden width = hidden_size / adapter_reduction."""

    def validate(self, cfg) -> None:
        if cfg.model.strategy != "dvp":
            return
        if self.inner_dim % self.heads:
            raise ConfigError(f"model.dvp.inner_dim ({self.inner_dim}) must be divisible by model.dvp.heads ({self.heads})")
        if cfg.train.mode == "train" and self.layer is None:
            raise ConfigError("model.dvp.layer: set it or model.dvp.from_search (a train.mode=dvp_search output), "
                              "or run train.mode=dvp_search to find it")
        if self.layer is not None and self.layer in cfg.model.skip.layers:
            raise ConfigError(f"model.dvp.layer {self.layer} is in model.skip.layers: the prompt's layer must run")


class VisualPromptGenerator(nn.Module):
    """Multi-head cross-attention: query LayerNorm(h) (d), keys/values the CLIP features (N x C), output d.

    The output projection starts at zero, so a fresh generator leaves the frozen LLM's output unchanged.
    """

    def __init__(self, width: int, visual_dim: int, heads: int, inner_dim: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query_norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, inner_dim)
        self.key = nn.Linear(visual_dim, inner_dim)
        self.value = nn.Linear(visual_dim, inner_dim)
        self.out = nn.Linear(inner_dim, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, text_state: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``text_state`` (B, d), ``features`` (B, N, C) -> the prompt vector (B, d)."""
        batch, tokens, _ = features.shape
        dtype = self.query.weight.dtype
        query = self.query(self.query_norm(text_state.to(dtype))).view(batch, self.heads, 1, -1)
        key = self.key(features.to(dtype)).view(batch, tokens, self.heads, -1).transpose(1, 2)
        value = self.value(features.to(dtype)).view(batch, tokens, self.heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.reshape(batch, -1))


class DVPStrategy(VisualStrategy):
    """In a packed batch each sample's query is its own last prompt token and its prompt is added to its own
    positions only (``PackedLayout.packed_index`` / ``per_position``)."""

    name = "dvp"
    options = DVPOptions
    packs_exactly = True

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        layers = decoder_layers(llm)
        width, dvp = llm.config.hidden_size, cfg.dvp
        candidates = list(range(len(layers))) if dvp.layer is None else [dvp.layer]
        if not 0 <= candidates[0] <= candidates[-1] < len(layers):
            raise ConfigError(f"model.dvp.layer: {dvp.layer} is out of range for a {len(layers)}-layer model")
        self.generators = nn.ModuleDict({
            str(i): VisualPromptGenerator(width, cfg.visual_dim, dvp.heads, dvp.inner_dim, dvp.dropout)
            for i in candidates
        })
        self.active_layer = candidates[0]
        # (features, has_image, prompt_end) of the current forward, kept for the backward recomputation of
        # checkpointed blocks; and the prompt vectors of a generate call, added to every decoded token.
        self._state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._layout: Optional[PackedLayout] = None
        self._decoding_prompt: Optional[torch.Tensor] = None
        for i in candidates:
            layers[i].register_forward_pre_hook(partial(self._insert_prompt, i), with_kwargs=True)
        if dvp.adapters:
            hidden = max(1, width // dvp.adapter_reduction)
            self.adapters = nn.ModuleList(
                nn.ModuleDict({"attn": BottleneckAdapter(width, hidden), "mlp": BottleneckAdapter(width, hidden)})
                for _ in layers
            )
            for layer, pair in zip(layers, self.adapters):
                layer.self_attn.register_forward_hook(partial(_adapt_output, pair["attn"]))
                layer.mlp.register_forward_hook(partial(_adapt_output, pair["mlp"]))

    @property
    def candidate_layers(self):
        return [int(i) for i in self.generators]

    def set_active_layer(self, layer: int) -> None:
        """Which layer's generator inserts the prompt (the DVP search picks one per step)."""
        if str(layer) not in self.generators:
            raise ValueError(f"layer {layer} has no DVP prompt generator; candidates: {self.candidate_layers}")
        self.active_layer = layer

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        self._decoding_prompt = None
        self._layout = layout
        if image_features is None:
            self._state = None
        else:
            if has_image is None:
                has_image = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
            self._state = (image_features, has_image, prompt_end)
        return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)

    def prefill_finished(self) -> None:
        """From now on each call of layer K is one decoded token: it gets the prompt made in the prefill."""
        self._state = None

    def _insert_prompt(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        if index != self.active_layer:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._state is not None:
            features, has_image, prompt_end = self._state
            layout = self._layout
            if layout is None:
                query = hidden[torch.arange(hidden.shape[0], device=hidden.device), prompt_end]
            else:
                query = hidden.reshape(-1, hidden.shape[-1])[layout.packed_index(prompt_end)]
            prompt = self.generators[str(index)](query, features)
            prompt = (prompt * has_image.to(prompt.dtype)[:, None]).to(hidden.dtype)
            self._decoding_prompt = prompt.detach()
            if layout is None:
                positions = torch.arange(hidden.shape[1], device=hidden.device)
                from_query = (positions[None] >= prompt_end[:, None]).to(hidden.dtype)[..., None]
                hidden = hidden + from_query * prompt[:, None]
            else:
                from_query = layout.valid & (layout.positions >= layout.per_position(prompt_end))
                term = from_query.to(hidden.dtype)[..., None] * layout.per_position(prompt)
                hidden = hidden + term.view(hidden.shape)
        elif self._decoding_prompt is not None:
            hidden = hidden + self._decoding_prompt[:, None]
        else:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def _adapt_output(adapter: BottleneckAdapter, module: nn.Module, args: tuple, output):
    """DVP + adapter: ``y + adapter(y)`` on an attention (tuple output) or MLP output."""
    if isinstance(output, tuple):
        return (output[0] + adapter(output[0]), *output[1:])
    return output + adapter(output)
