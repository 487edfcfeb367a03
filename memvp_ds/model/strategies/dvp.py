"""DVP: dynamic visual prompting (Huang et al. 2023) on a decoder-only LLM.

A cross-attention reads the CLIP patch features with a query built from the text and produces ONE compact,
text-related visual prompt vector per sample, which enters the LLM at layer K. Two ways of entering
(``model.dvp.insert``):

* ``token`` (default, the method as its authors built it for LLaMA): one slot in front of the text is
  reserved from the input on. Below K it holds a placeholder (a zero vector) and is hidden from every other
  token by the attention mask; at the input of layer K it is overwritten with the prompt, and from K on
  every later token (prompt and answer alike) attends to it. The query is the mean hidden state of the
  prompt tokens entering layer K. With a KV cache the slot's entries of layers < K hold the placeholder's
  K/V (masked, as in the full forward) and those of layers >= K the prompt's, so decoding needs nothing
  else. The per-layer mask is a pre-hook on every decoder layer that swaps its ``attention_mask``; it needs
  a backend that takes a 4D mask (sdpa, eager). In a packed batch each image sample's slot is the position
  the data layer reserves in front of its text, hidden below K from every other position of the row.
* ``residual`` (this project's earlier port, kept for comparison): the prompt is added to the residual
  stream at the input of layer K at the last prompt token and every position after it (per sample in a
  packed batch).

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

from memvp_ds.config import ConfigError, ModelConfig, check_at_least, check_choice
from memvp_ds.model.adapters import BottleneckAdapter
from memvp_ds.model.llm import decoder_layers
from memvp_ds.model.strategies.base import DecoderInputs, PackedLayout, VisualStrategy, place_visual_tokens
from memvp_ds.model.strategies.lavin import MODALITY_PASS, LavinStrategy

DVP_INSERT = ("token", "residual")
DVP_BASE = ("lavin", "plain")
CROSS_FEATURES = ("auto", "last_with_cls", "visual")
MASKABLE_BACKENDS = ("sdpa", "eager")
"""Attention backends that accept the 4D per-layer mask the token slot needs."""


@dataclass
class DVPOptions:
    """Options of the ``dvp`` strategy (``model.dvp``; dynamic visual prompting, Huang et al. 2023); see
    docs/strategies/dvp.md."""

    base: str = "lavin"
    """The model DVP is added to. ``lavin`` (the authors' ScienceQA code): LaVIN (model.lavin: its visual
    tokens in the input, routed adapters, modality routing) with the slot after the visual tokens, a learned
    slot embedding and the query without BOS or LayerNorm. ``plain`` (this project's earlier form): the
    frozen LLM with the slot in front of the text, a zero placeholder, bottleneck adapters."""
    insert: str = "token"
    """How the prompt enters layer K. ``token`` (official): a slot in front of the text, hidden below K and
    overwritten with the prompt at K, visible to every later token from K on (needs attn_implementation
    sdpa or eager). ``residual``: added to the residual stream of the last prompt token and the answer."""
    layer: Optional[int] = None
    """K: the decoder layer whose input receives the visual prompt. Unset: taken from ``from_search``, or,
    under ``train.mode=dvp_search``, every layer is a candidate."""
    from_search: Optional[str] = None
    """Output directory of a ``train.mode=dvp_search`` run: fills ``layer`` from its search.json when unset."""
    cross_features: str = "auto"
    """What the cross-attention reads. ``last_with_cls`` (official DVP-SQA): the last CLIP block's whole output,
    CLS first, without ln_post, through CLIP's adapters (257 x 1024 for ViT-L/14); needs
    ``model.vision.online=true`` (shards carry one feature set per sample). ``visual``: the features the
    strategy receives (LaVIN's 6 CLS tokens on the lavin base). ``auto``: last_with_cls on the lavin base with
    the online tower, visual otherwise."""
    heads: int = 16
    """Attention heads of the prompt generator's cross-attention (official: 16)."""
    inner_dim: int = 512
    """Width of the cross-attention (queries from the text state, keys/values from the CLIP features;
    official: 512)."""
    dropout: float = 0.1
    """Attention dropout of the cross-attention (training only; official: 0.1)."""
    adapters: bool = True
    """DVP + adapter (official LLaMA configs: on): bottleneck adapters after every attention and MLP output."""
    adapter_reduction: int = 64
    """Adapter hidden width = hidden_size / adapter_reduction (official: 64)."""

    def validate(self, cfg) -> None:
        check_choice("model.dvp.insert", self.insert, DVP_INSERT)
        check_choice("model.dvp.base", self.base, DVP_BASE)
        check_choice("model.dvp.cross_features", self.cross_features, CROSS_FEATURES)
        check_at_least("model.dvp.adapter_reduction", self.adapter_reduction, 1)
        if cfg.model.strategy != "dvp":
            return
        if self.base == "lavin" and self.insert != "token":
            raise ConfigError("model.dvp.insert: the lavin base inserts the prompt as a token (its official form); "
                              "use model.dvp.base=plain for insert=residual")
        if self.cross_features == "last_with_cls":
            vision = cfg.model.vision
            if not vision.online:
                raise ConfigError("model.dvp.cross_features: last_with_cls (the last CLIP block with CLS, the official "
                                  "DVP-SQA input) is computed by the online tower only; set model.vision.online=true "
                                  "(shards with images) or model.dvp.cross_features=visual")
            if vision.recipe.layer == "penultimate":
                raise ConfigError("model.dvp.cross_features: last_with_cls needs the last CLIP block, which a "
                                  "penultimate-layer recipe does not run; set model.vision.recipe.layer to "
                                  "cls_every_4 or last, or model.dvp.cross_features=visual")
        if self.inner_dim % self.heads:
            raise ConfigError(f"model.dvp.inner_dim ({self.inner_dim}) must be divisible by model.dvp.heads ({self.heads})")
        backend = cfg.model.llm.attn_implementation
        if self.insert == "token" and backend not in MASKABLE_BACKENDS:
            raise ConfigError(f"model.llm.attn_implementation: {backend} cannot take the per-layer attention mask "
                              f"that hides DVP's token below layer K; use {' or '.join(MASKABLE_BACKENDS)}, or "
                              "model.dvp.insert=residual")
        if cfg.train.mode == "train" and self.layer is None:
            raise ConfigError("model.dvp.layer: set it or model.dvp.from_search (a train.mode=dvp_search output), "
                              "or run train.mode=dvp_search to find it")
        if self.layer is not None and self.layer in cfg.model.skip.layers:
            raise ConfigError(f"model.dvp.layer {self.layer} is in model.skip.layers: the prompt's layer must run")


def reads_last_clip_block(cfg: ModelConfig) -> bool:
    """Whether the cross-attention reads the last CLIP block (``model.dvp.cross_features``, auto resolved)."""
    dvp = cfg.dvp
    if dvp.cross_features == "auto":
        return dvp.base == "lavin" and cfg.vision.online and cfg.vision.recipe.layer != "penultimate"
    return dvp.cross_features == "last_with_cls"


class VisualPromptGenerator(nn.Module):
    """Multi-head cross-attention: query LayerNorm(h) (d), keys/values the CLIP features (N x C), output d.

    ``zero_output``: the output projection starts at zero, so a fresh generator adds nothing (the residual
    variant). The token variant keeps PyTorch's default init as the official code does: a zero token would
    sit at RMSNorm's singular point, 0 / sqrt(eps).
    """

    def __init__(self, width: int, visual_dim: int, heads: int, inner_dim: int, dropout: float, zero_output: bool,
                 query_norm: bool = True):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        # The lavin base's official Cross_Attention projects the pooled state as is.
        self.query_norm = nn.LayerNorm(width) if query_norm else nn.Identity()
        self.query = nn.Linear(width, inner_dim)
        self.key = nn.Linear(visual_dim, inner_dim)
        self.value = nn.Linear(visual_dim, inner_dim)
        self.out = nn.Linear(inner_dim, width)
        if zero_output:
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


def hide_slot_keys(mask: Optional[torch.Tensor], slot_keys: torch.Tensor, queries: int, past: int, batch: int,
                   float_dtype: Optional[torch.dtype], device: torch.device) -> torch.Tensor:
    """The layer mask with the DVP slots' keys hidden from every query but the slot itself.

    ``slot_keys`` (batch or 1, keys) is True at the slot positions: key 0 of a padded batch, each image
    sample's first position in a packed one. ``mask`` is what HF built for this forward: 4D bool (True =
    attend, sdpa), 4D additive float (eager), or None for plain causal attention without padding (sdpa);
    ``past`` cached positions precede the ``queries`` new ones. A None mask becomes bool, or additive in
    ``float_dtype`` when that is given. Returns a new tensor: the HF mask is shared by all layers and must
    stay as it is for layers >= K.
    """
    if mask is None:
        keys = past + queries
        mask = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
        mask = mask.expand(batch, 1, queries, keys)
        if float_dtype is not None:
            mask = torch.full(mask.shape, torch.finfo(float_dtype).min, dtype=float_dtype, device=device).masked_fill(mask, 0)
    keys = mask.shape[-1]
    query_index = torch.arange(keys - queries, keys, device=device)
    other_query = query_index[:, None] != torch.arange(keys, device=device)[None, :]
    hidden = slot_keys[:, None, None, :] & other_query[None, None]
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return mask.masked_fill(hidden, torch.finfo(mask.dtype).min)


class DVPStrategy(VisualStrategy):
    name = "dvp"
    options = DVPOptions
    # Its one inserted token summarises one image (the cross-attention and the KAB-APP search are defined per
    # image): several images per sample would be a method of our own.
    multi_image = False

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__(cfg, llm)
        layers = decoder_layers(llm)
        width, dvp = llm.config.hidden_size, cfg.dvp
        candidates = list(range(len(layers))) if dvp.layer is None else [dvp.layer]
        if not 0 <= candidates[0] <= candidates[-1] < len(layers):
            raise ConfigError(f"model.dvp.layer: {dvp.layer} is out of range for a {len(layers)}-layer model")
        self.as_token = dvp.insert == "token"
        self.on_lavin = dvp.base == "lavin"
        self.generators = nn.ModuleDict({
            str(i): VisualPromptGenerator(width, cfg.visual_dim, dvp.heads, dvp.inner_dim, dvp.dropout,
                                          zero_output=not self.as_token, query_norm=not self.on_lavin)
            for i in candidates
        })
        # The lavin base: LaVIN's strategy (its own hooks) as a part; the slot sits after its visual tokens and
        # starts as a learned embedding (official ``image_params``, N(0, 1)).
        self.slot_index = cfg.visual_tokens if self.on_lavin else 0
        if self.on_lavin:
            self.base = LavinStrategy(cfg, llm)
            self.slot = nn.Parameter(torch.randn(1, width))
        self.active_layer = candidates[0]
        self.reads_last_clip_block = reads_last_clip_block(cfg)
        self._last_clip_block: Optional[torch.Tensor] = None
        # Per-sample inputs of the prompt, kept from ``forward`` for the layer-K hook (and for the backward
        # recomputation of checkpointed blocks). Token: (features, has_image, prompt-span weights over each
        # sample's positions, slot positions); residual: (features, has_image, prompt_end). Cleared when
        # decoding from the cache starts.
        self._state: Optional[tuple] = None
        self._layout: Optional[PackedLayout] = None
        if self.as_token:
            # A plain list keeps the frozen embedding out of this module's parameters (it belongs to the LLM).
            self._embed_tokens = [llm.get_input_embeddings()]
            # eager takes additive float masks; when HF passes none (plain causal sdpa), the hook builds a boolean one.
            self._eager_mask_dtype = llm.dtype if llm.config._attn_implementation == "eager" else None
            self._has_slot = False  # does the running forward / generate call carry the slot?
            self._memo: Optional[tuple] = None  # (HF mask, queries, past, slot-hidden mask) of the last call
            for i, layer in enumerate(layers):
                layer.register_forward_pre_hook(partial(self._token_hook, i), with_kwargs=True)
        else:
            self._decoding_prompt: Optional[torch.Tensor] = None
            for i in candidates:
                layers[i].register_forward_pre_hook(partial(self._residual_hook, i), with_kwargs=True)
        if dvp.adapters and not self.on_lavin:
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

    def set_last_clip_block(self, tokens: torch.Tensor) -> None:
        self._last_clip_block = tokens

    def forward(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout=None) -> DecoderInputs:
        self._state, self._layout = None, layout
        if image_features is not None and has_image is None:
            has_image = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
        # What the cross-attention reads: the strategy's features, or the last CLIP block the model handed over.
        cross, self._last_clip_block = (self._last_clip_block if self.reads_last_clip_block else image_features), None
        if cross is None and image_features is not None:
            raise RuntimeError("DVP reads the last CLIP block (model.dvp.cross_features) but the model handed none over")
        if not self.as_token:
            self._decoding_prompt = None
            if image_features is not None:
                self._state = (cross, has_image, prompt_end)
            return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)
        self._has_slot, self._memo = image_features is not None, None
        if self.on_lavin:
            return self._forward_on_lavin(input_ids, attention_mask, image_features, has_image, prompt_end, layout,
                                          cross)
        if image_features is None:
            return DecoderInputs(attention_mask=attention_mask, input_ids=input_ids)
        text = self._embed_tokens[0](input_ids)
        placeholder = text.new_zeros(image_features.shape[0], 1, text.shape[2])
        if layout is not None:
            # The data layer reserved each image sample's slot in front of its text; prompt_end counts it.
            slots = layout.visual_slots(1, has_image)
            in_prompt = layout.sample_mask() & _between(1, prompt_end, layout.longest)
            self._state = (cross, has_image, _mean_weights(in_prompt), slots)
            return DecoderInputs(attention_mask=attention_mask,
                                 inputs_embeds=place_visual_tokens(layout, text, placeholder, has_image))
        # The query pools the prompt tokens: attended text positions up to each row's last prompt token
        # (prompt_end counts text positions; the slot in front is position 0).
        in_text_prompt = _between(0, prompt_end, input_ids.shape[1]) & attention_mask.bool()
        in_prompt = torch.cat([torch.zeros_like(in_text_prompt[:, :1]), in_text_prompt], dim=1)
        slots = torch.cat([has_image[:, None], torch.zeros_like(in_text_prompt)], dim=1)
        self._state = (cross, has_image, _mean_weights(in_prompt), slots)
        # Rows without an image keep the slot with attention mask 0: their text is the frozen LLM's alone.
        slot_mask = has_image.to(attention_mask.dtype)[:, None]
        return DecoderInputs(attention_mask=torch.cat([slot_mask, attention_mask], dim=1),
                             inputs_embeds=torch.cat([placeholder, text], dim=1), prefix_len=1)

    def _forward_on_lavin(self, input_ids, attention_mask, image_features, has_image, prompt_end, layout, cross):
        """LaVIN's inputs with the slot after its N visual tokens: [visual, slot, BOS, text]. The query pools the
        prompt tokens after the slot without BOS, as officially."""
        inputs = self.base(input_ids, attention_mask, image_features, has_image, prompt_end, layout)
        if image_features is None:
            return inputs
        embeds, at = inputs.inputs_embeds, self.slot_index
        slot = self.slot.to(embeds.dtype)
        if layout is not None:
            # The data layer reserved N + 1 positions in front of each image sample's text; LaVIN filled N.
            slots = layout.visual_slots(at + 1, has_image) & (layout.positions == at)
            in_prompt = layout.sample_mask() & _between(at + 2, prompt_end, layout.longest)
            self._state = (cross, has_image, _mean_weights(in_prompt), slots)
            return DecoderInputs(attention_mask=attention_mask, inputs_embeds=torch.where(slots[..., None], slot, embeds))
        # prompt_end counts text positions; the first attended text token is BOS (left padding before it).
        text_mask = attention_mask.bool()
        bos = torch.arange(text_mask.shape[1], device=text_mask.device)[None] == text_mask.long().argmax(1)[:, None]
        in_text_prompt = _between(0, prompt_end, input_ids.shape[1]) & text_mask & ~bos
        front = in_text_prompt.new_zeros(in_text_prompt.shape[0], at + 1)
        in_prompt = torch.cat([front, in_text_prompt], dim=1)
        slots = torch.cat([front[:, :at], has_image[:, None], torch.zeros_like(in_text_prompt)], dim=1)
        self._state = (cross, has_image, _mean_weights(in_prompt), slots)
        batch = embeds.shape[0]
        slot_mask = has_image.to(inputs.attention_mask.dtype)[:, None]
        return DecoderInputs(
            attention_mask=torch.cat([inputs.attention_mask[:, :at], slot_mask, inputs.attention_mask[:, at:]], dim=1),
            inputs_embeds=torch.cat([embeds[:, :at], slot.expand(batch, 1, -1), embeds[:, at:]], dim=1),
            prefix_len=at + 1)

    def prefill_finished(self) -> None:
        """From now on each call of layer K is one decoded token: the prompt is already in place (the token
        slot's cached K/V) or is the one made in the prefill (residual)."""
        self._state = None

    def decoding_rows(self) -> Tuple[torch.Tensor, ...]:
        # The lavin base's routing first; the token's prompt is in the KV cache.
        base = self.base.decoding_rows() if self.on_lavin else ()
        if self.as_token or self._decoding_prompt is None:
            return base
        return (*base, self._decoding_prompt)

    def set_decoding_rows(self, rows: Tuple[torch.Tensor, ...]) -> None:
        if self.on_lavin:
            routed = len(self.base.decoding_rows())
            self.base.set_decoding_rows(rows[:routed])
            rows = rows[routed:]
        if not self.as_token:
            self._decoding_prompt = rows[0] if rows else None

    def leading_cache_columns(self) -> int:
        # Layers below K hide the slot's key by its index: everything up to it stays in place.
        return self.slot_index + 1 if self.as_token and self._has_slot else 0

    def prefix_positions(self) -> int:
        return self.slot_index + 1 if self.as_token else 0

    def forward_flops_per_position_and_layer(self) -> float:
        return self.base.forward_flops_per_position_and_layer() if self.on_lavin else 0.0

    def _token_hook(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        if not self._has_slot or index > self.active_layer or kwargs.get(MODALITY_PASS):
            return None
        if index < self.active_layer:
            return args, {**kwargs, "attention_mask": self._slot_hidden_mask(layer, args, kwargs)}
        if self._state is None:  # a decoded token at layer K: it reads the prompt from the cache
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        features, has_image, span, slots = self._state
        per_sample = hidden if self._layout is None else self._layout.to_samples(hidden)
        query = torch.bmm(span.to(hidden.dtype)[:, None], per_sample).squeeze(1)
        prompt = self.generators[str(index)](query, features).to(hidden.dtype)
        per_position = prompt[:, None] if self._layout is None else self._layout.per_position(prompt)
        hidden = torch.where(slots[..., None], per_position, hidden)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _slot_hidden_mask(self, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"DVP token: {type(layer).__name__} was called without an attention_mask keyword; "
                               "this decoder cannot be given a per-layer mask (use model.dvp.insert=residual)")
        mask = kwargs["attention_mask"]
        hidden = args[0] if args else kwargs["hidden_states"]
        queries, past = hidden.shape[1], 0
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if mask is None and cache is not None:
            past = cache.get_seq_length(layer.self_attn.layer_idx)
        if self._memo is not None and self._memo[0] is mask and self._memo[1:3] == (queries, past):
            return self._memo[3]
        # Padded batches (and decoding from the cache) have the slot at one key (0, or N after LaVIN's visual
        # tokens); a packed row has one per image sample.
        if self._layout is None:
            keys = past + queries if mask is None else mask.shape[-1]
            slot_keys = (torch.arange(keys, device=hidden.device) == self.slot_index)[None]
        else:
            slot_keys = self._state[3]
        hidden_mask = hide_slot_keys(mask, slot_keys, queries, past, hidden.shape[0], self._eager_mask_dtype,
                                     hidden.device)
        self._memo = (mask, queries, past, hidden_mask)
        return hidden_mask

    def _residual_hook(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        if index != self.active_layer:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._state is not None:
            features, has_image, prompt_end = self._state
            layout = self._layout
            if layout is None:
                query = hidden[torch.arange(hidden.shape[0], device=hidden.device), prompt_end]
                positions, prompt_end_per_position = torch.arange(hidden.shape[1], device=hidden.device)[None], prompt_end[:, None]
            else:
                query = hidden.reshape(-1, hidden.shape[-1])[layout.packed_index(prompt_end)]
                positions, prompt_end_per_position = layout.positions, layout.per_position(prompt_end)
            prompt = self.generators[str(index)](query, features)
            prompt = (prompt * has_image.to(prompt.dtype)[:, None]).to(hidden.dtype)
            self._decoding_prompt = prompt.detach()
            from_query = (positions >= prompt_end_per_position).to(hidden.dtype)[..., None]
            per_position = prompt[:, None] if layout is None else layout.per_position(prompt)
            # (R, L, d) for packed rows, which flash attention runs flattened as (1, R*L, d)
            hidden = hidden + (from_query * per_position).view(hidden.shape)
        elif self._decoding_prompt is not None:
            hidden = hidden + self._decoding_prompt[:, None]
        else:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def _between(first: int, last: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) True at positions first..last[b] of each row."""
    positions = torch.arange(length, device=last.device)[None]
    return (positions >= first) & (positions <= last[:, None])


def _mean_weights(selected: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> weights that average each row's selected positions."""
    return selected.float() / selected.sum(1, keepdim=True).clamp(min=1)


def _adapt_output(adapter: BottleneckAdapter, module: nn.Module, args: tuple, output):
    """DVP + adapter: ``y + adapter(y)`` on an attention (tuple output) or MLP output."""
    if isinstance(output, tuple):
        return (output[0] + adapter(output[0]), *output[1:])
    return output + adapter(output)
