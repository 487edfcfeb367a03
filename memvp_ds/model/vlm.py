"""The vision-language model: a frozen HF causal LM plus one visual-prompting strategy."""

from __future__ import annotations

import inspect
from functools import cached_property
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache, PreTrainedModel

from memvp_ds.config import ModelConfig
from memvp_ds.model.layer_skip import LayerSkipping, install_layer_skipping
from memvp_ds.model.llm import load_frozen_llm
from memvp_ds.model.lora import install_lora
from memvp_ds.model.strategies import STRATEGIES, DecoderInputs, VisualStrategy
from memvp_ds.model.strategies.base import PackedLayout
from memvp_ds.vision.tower import OnlineClipTower, build_vision_tower

_NO_LOSS = -100
"""Any negative label means 'no loss' (memvp_ds.data.prompts.IGNORE_INDEX)."""


class VLMOutput:
    """The loss (when labels were given) and, on demand, the logits.

    Training reads only ``loss``, for which the LM head ran at the labelled positions alone; ``logits``
    applies it to every position the first time it is read (tests, analysis).
    """

    def __init__(self, hidden: torch.Tensor, lm_head: nn.Module, loss: Optional[torch.Tensor] = None):
        self.hidden, self._lm_head, self.loss = hidden, lm_head, loss

    @cached_property
    def logits(self) -> torch.Tensor:
        """(B, T, vocab) for the text positions only, whatever the strategy prepends; (R, L, vocab) for the
        rows of a packed batch, visual positions placed in them included."""
        return self._lm_head(self.hidden)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens, so left padding and masked prefixes shift nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_prompt_positions(attention_mask: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """(B,) index of each row's last prompt token: the one before the first label, or without labels (a
    prompt to be answered) the last attended token. Labels are token ids where the loss applies and negative
    (memvp_ds.data.prompts.IGNORE_INDEX) elsewhere."""
    length = attention_mask.shape[1]
    last_attended = length - 1 - attention_mask.flip(1).long().argmax(1)
    if labels is None:
        return last_attended
    is_answer = labels >= 0
    first_answer = is_answer.long().argmax(1)
    return torch.where(is_answer.any(1), (first_answer - 1).clamp(min=0), last_attended)


def causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions with a label (>= 0); 0 if there are none.

    The LM head runs only on the hidden states that predict a label: with a 32k vocabulary its logits are
    the largest activation of a training step, and most positions (prompt, padding) have no label.
    """
    shifted_labels = labels[:, 1:]
    counted = shifted_labels >= 0
    logits = lm_head(hidden[:, :-1][counted])
    total = F.cross_entropy(logits.float(), shifted_labels[counted], reduction="sum")
    return total / counted.sum().clamp(min=1)


def _is_flash_attention(llm: PreTrainedModel) -> bool:
    return llm.config._attn_implementation.startswith("flash_attention")


def is_trainable(param: nn.Parameter) -> bool:
    """The one predicate for what trains: used for the optimizer, checkpoints and exports alike."""
    return param.requires_grad


class VisualPromptedLM(nn.Module):
    """``llm`` (frozen HF causal LM) + ``strategy`` (its trainable tensors) + optional layer skipping (DAS,
    whose adapters are trainable too) + optional online ``vision`` tower (frozen CLIP with trainable
    adapters), which turns ``images`` (uint8 pixels) into the features the strategy receives."""

    def __init__(self, llm: PreTrainedModel, strategy: VisualStrategy, skipping: Optional[LayerSkipping] = None,
                 vision: Optional[OnlineClipTower] = None):
        super().__init__()
        self.llm = llm
        self.strategy = strategy
        self.skipping = skipping
        self.vision = vision

    @property
    def computed_layers(self) -> int:
        """Decoder layers that really run (all of them unless some are skipped)."""
        return self.skipping.computed_layers if self.skipping else self.llm.config.num_hidden_layers

    @property
    def _decoder(self) -> nn.Module:
        return self.llm.base_model

    @property
    def _cache_argument(self) -> str:
        """transformers renamed the decoder's ``past_key_values`` argument to ``cache`` during 5.x."""
        return "cache" if "cache" in inspect.signature(self._decoder.forward).parameters else "past_key_values"

    def _visual_features(self, image_features: Optional[torch.Tensor], images: Optional[torch.Tensor]
                         ) -> Optional[torch.Tensor]:
        """The strategy's features: pre-extracted ones, or the online tower's from pixels ((B, k x 3, S, S) for
        k image slots: (B, k x N, C), each slot's image through the tower alone; empty slots run too, on zero
        pixels, and the strategy ignores them as it ignores empty slots' stored features)."""
        if self.vision is None:
            if images is not None:
                raise ValueError("got images but the model has no online vision tower (model.vision.online=false)")
            return image_features
        if images is None:
            raise ValueError("the online vision tower (model.vision.online=true) needs images, not features")
        if images.shape[1] > 3:  # k image slots of 3 channels (multi-image): one batch through the tower
            slots = images.shape[1] // 3
            features = self.vision(images.reshape(-1, 3, *images.shape[2:]))
            return features.reshape(images.shape[0], slots * features.shape[1], features.shape[2])
        if not self.strategy.reads_last_clip_block:
            return self.vision(images)
        features, last = self.vision.forward_with_last_block(images)
        self.strategy.set_last_clip_block(last)
        return features

    def _run_decoder(self, inputs: DecoderInputs, **kwargs) -> torch.Tensor:
        out = self._decoder(
            input_ids=inputs.input_ids,
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=positions_from_mask(inputs.attention_mask),
            **kwargs,
        )
        return out.last_hidden_state[:, inputs.prefix_len :]

    def _run_packed_decoder(self, inputs: DecoderInputs, layout: PackedLayout) -> torch.Tensor:
        """Rows of several samples, attention kept within each sample through position ids that restart at 0
        for every sample (and every padding run). Without a 2D mask transformers turns these resets into a
        block-diagonal causal mask (sdpa, eager, flex); flash attention runs varlen over them, for which
        the rows go in flattened into one sequence (it reads resets only at batch size 1)."""
        tokens = inputs.input_ids if inputs.input_ids is not None else inputs.inputs_embeds
        shape = tokens.shape
        positions = layout.positions
        if _is_flash_attention(self.llm):
            tokens, positions = tokens.reshape(1, -1, *shape[2:]), positions.reshape(1, -1)
        key = "input_ids" if inputs.input_ids is not None else "inputs_embeds"
        hidden = self._decoder(**{key: tokens}, attention_mask=None, position_ids=positions, use_cache=False)
        return hidden.last_hidden_state.view(*shape[:2], -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        has_image: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> VLMOutput:
        """One training/scoring forward.

        ``segment_ids`` (R, L) marks a packed batch (``memvp_ds.data.collate.pack``): each position's sample
        index (the row of ``image_features`` / ``has_image``), -1 on padding. Each sample then computes what it
        would alone: its own positions from 0, attention within it, its own visual terms, and no loss on its
        first token (which would otherwise be "predicted" by the sample before it).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm_head = self.llm.get_output_embeddings()
        image_features = self._visual_features(image_features, images)
        if segment_ids is None:
            inputs = self.strategy(input_ids, attention_mask, image_features, has_image,
                                   last_prompt_positions(attention_mask, labels))
            hidden = self._run_decoder(inputs, use_cache=False)
        else:
            samples = image_features.shape[0] if image_features is not None else int(segment_ids.max()) + 1
            layout = PackedLayout(segment_ids, samples)
            inputs = self.strategy(input_ids, attention_mask, image_features, has_image,
                                   layout.prompt_ends(labels), layout=layout)
            hidden = self._run_packed_decoder(inputs, layout)
            if labels is not None:
                labels = labels.masked_fill(layout.positions == 0, _NO_LOSS)
        loss = causal_lm_loss(hidden, lm_head, labels) if labels is not None else None
        return VLMOutput(hidden, lm_head, loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        has_image: Optional[torch.Tensor] = None,
        max_new_tokens: int = 16,
        eos_token_id: Optional[int] = None,
        stop_when_done: bool = True,
        images: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Batched greedy decoding with the LLM's KV cache; prompts must be left-padded.

        Returns the (B, max_new_tokens or fewer) new tokens; rows that produced ``eos_token_id`` are
        filled with it afterwards. ``stop_when_done=False`` always runs ``max_new_tokens`` steps, which
        data-parallel ZeRO-3 needs: every rank must make the same number of forward calls.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, cache, mask = self.prefill(input_ids, attention_mask, image_features, has_image, images)
        lm_head = self.llm.get_output_embeddings()
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            next_token = lm_head(hidden).argmax(-1)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            new_tokens.append(next_token)
            if step == max_new_tokens - 1 or (stop_when_done and bool(finished.all())):
                break
            hidden, mask = self.decode_step(next_token, mask, cache)
        return torch.stack(new_tokens, dim=1)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for this model."""
        # With skipped layers the cache slots are renumbered, so the config's per-layer cache types (sliding
        # window or full) would no longer line up: let the cache create plain slots as layers use them.
        return DynamicCache() if self.skipping and self.skipping.skipped else DynamicCache(config=self.llm.config)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_features: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """The prompt pass of greedy decoding (left-padded prompts): (B, d) hidden state of each row's last
        token, the KV cache, and the cache's (B, S) attention mask (visual prefix included). The strategy
        is then in decoding mode (``prefill_finished``) for these rows."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate expects left-padded prompts: attention_mask[:, -1] must be 1 for every row")
        image_features = self._visual_features(image_features, images)
        inputs = self.strategy(input_ids, attention_mask, image_features, has_image,
                               last_prompt_positions(attention_mask, None))
        cache = self.new_cache()
        hidden = self._run_decoder(inputs, **{self._cache_argument: cache}, use_cache=True)
        self.strategy.prefill_finished()
        return hidden[:, -1], cache, inputs.attention_mask

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One decoded token per row from the KV cache: (B,) ``tokens`` -> their (B, d) hidden states and
        the mask grown by one column. ``mask`` (B, S) marks the attended cache columns of each row."""
        positions = positions_from_mask(mask)[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        hidden = self._decoder(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_argument: cache},
            use_cache=True,
        ).last_hidden_state
        return hidden[:, -1], mask

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant checkpointing of every decoder block.

        Reentrant checkpointing would silently drop the gradient of the MemVP K/V, which enter each block
        from outside rather than through its inputs.
        """
        kwargs = {"use_reentrant": False}
        # transformers renamed the method (and its argument) during 5.x; use whichever this version has.
        if hasattr(self.llm, "activation_checkpointing_enable"):
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def trainable_parameters(self) -> Dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if is_trainable(p)}

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trainable tensors (detached), keyed by their names in this module."""
        return {name: p.detach() for name, p in self.trainable_parameters().items()}

    def load_trainable(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore trainable tensors; the key set must match exactly (no frozen weights, nothing missing)."""
        expected = set(self.trainable_parameters())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"trainable weights do not match the model: missing {missing}, unexpected {unexpected}")
        params = self.trainable_parameters()
        with torch.no_grad():
            for name, tensor in state.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{name}: stored shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
                params[name].copy_(tensor)


def build_model(cfg: ModelConfig, skippable: Iterable[int] = (), llm: Optional[PreTrainedModel] = None
                ) -> VisualPromptedLM:
    """Load the frozen LLM named by ``cfg.llm`` (or take ``llm``, e.g. a meta-device copy to plan with), attach
    the strategy ``cfg.strategy`` and drop the layers in ``cfg.skip.layers``. ``skippable`` layers get adapters
    but stay, for a DAS search to toggle. LoRA (``cfg.lora``) goes on the LLM's Linears after the strategy and
    before layer skipping, so the strategy's initialisation is the same with and without it. With
    ``cfg.vision.online`` the frozen CLIP with its adapters comes last, so the strategy's initialisation is the
    same in both modes."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"model.strategy: unknown strategy '{cfg.strategy}'; choose one of {sorted(STRATEGIES)}")
    llm = llm if llm is not None else load_frozen_llm(cfg.llm)
    strategy = STRATEGIES[cfg.strategy](cfg, llm)
    if cfg.lora.active(strategy.has_lora):
        install_lora(llm, cfg.lora)
    skipping = install_layer_skipping(llm, cfg.skip.layers, skippable, cfg)
    vision = build_vision_tower(cfg.vision) if cfg.vision.online else None
    if vision is not None and (vision.tokens, vision.dim) != (cfg.visual_tokens, cfg.visual_dim):
        raise ValueError(f"model.vision.recipe: {cfg.vision.recipe.model} makes {vision.tokens} x {vision.dim} "
                         f"features but model.visual_tokens x model.visual_dim is {cfg.visual_tokens} x {cfg.visual_dim}")
    if strategy.reads_last_clip_block and not (vision is not None and vision.runs_every_block):
        raise ValueError(f"model.strategy {cfg.strategy} reads the last CLIP block's output: it needs "
                         "model.vision.online=true with a recipe that runs every block (layer last or cls_every_4)")
    return VisualPromptedLM(llm, strategy, skipping, vision)
