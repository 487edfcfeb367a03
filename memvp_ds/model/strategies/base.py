"""The interface every visual-prompting strategy implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
from torch import nn
from transformers import PreTrainedModel

from memvp_ds.config import ModelConfig


@dataclass
class DecoderInputs:
    """What the strategy hands to the LLM's decoder stack for one forward (or one generation prefill).

    Exactly one of ``input_ids`` / ``inputs_embeds`` is set. ``prefix_len`` positions at the front are
    not text (e.g. visual tokens) and are dropped before the LM head.
    """

    attention_mask: torch.Tensor
    input_ids: Optional[torch.Tensor] = None
    inputs_embeds: Optional[torch.Tensor] = None
    prefix_len: int = 0


class PackedLayout:
    """Where each sample of a packed batch lies: sequence packing puts several samples in one row.

    ``segment_ids`` (R, L) holds, for each position, the index of its sample (0..B-1: the row of
    ``image_features``, ``has_image`` and the per-sample tensors a strategy makes) and -1 on padding. A sample
    occupies one contiguous span of one row. Positions restart at 0 for every sample (RoPE, attention
    isolation) and for every run of padding.

    Per-sample terms (MemVP's memory, APT's visual keys) are computed exactly as in an unpacked batch by
    moving positions into a per-sample layout (B, longest, ...) and back: two gathers of the activations,
    against B times the term's FLOPs for scoring every token against every sample's K/V. Any tensor whose
    leading dimensions hold R x L positions in row-major order works, so a backend that runs the rows
    flattened into one sequence (varlen flash attention) is served by the same layout.
    """

    def __init__(self, segment_ids: torch.Tensor, num_samples: int):
        if segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be (rows, length), got shape {tuple(segment_ids.shape)}")
        self.segment_ids, self.num_samples = segment_ids, num_samples
        rows, length = segment_ids.shape
        index = torch.arange(length, device=segment_ids.device).expand(rows, length)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        self.positions = index - torch.where(starts, index, 0).cummax(dim=1).values
        """(R, L) position of each token within its sample (within its padding run on padding)."""
        self.valid = segment_ids >= 0
        """(R, L) True where a sample is, False on padding."""
        flat_segments = segment_ids.flatten()
        self.lengths = torch.bincount(flat_segments[flat_segments >= 0], minlength=num_samples)
        """(B,) positions each sample occupies."""
        self.longest = int(self.lengths.max()) if num_samples else 0
        sample_slot = segment_ids.clamp(min=0) * self.longest + self.positions
        self._packed_to_sample = sample_slot.flatten()
        # Slots beyond a sample's length point at position 0 of the batch: their values are never read back.
        self._sample_to_packed = torch.zeros(num_samples * self.longest, dtype=torch.long, device=segment_ids.device)
        self._sample_to_packed[sample_slot[self.valid]] = torch.arange(rows * length, device=segment_ids.device)[
            self.valid.flatten()]

    def sample_mask(self) -> torch.Tensor:
        """(B, longest) True at the slots that hold one of the sample's positions."""
        return torch.arange(self.longest, device=self.lengths.device)[None] < self.lengths[:, None]

    def to_samples(self, packed: torch.Tensor) -> torch.Tensor:
        """(R, L, ...) or (1, R*L, ...) -> (B, longest, ...): each sample's positions in order, from slot 0.
        Slots past a sample's length hold arbitrary positions' values."""
        flat = packed.reshape(-1, *packed.shape[self._leading_dims(packed):])
        return flat[self._sample_to_packed].view(self.num_samples, self.longest, *flat.shape[1:])

    def to_packed(self, samples: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_samples``, shaped like ``like``; padding positions get zeros."""
        flat = samples.reshape(-1, *samples.shape[2:])
        out = flat[self._packed_to_sample] * self.valid.flatten().view(-1, *[1] * (flat.dim() - 1)).to(flat.dtype)
        return out.view(like.shape)

    def per_position(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (R, L, ...): each position gets its sample's value (padding gets sample 0's)."""
        return per_sample[self.segment_ids.clamp(min=0)]

    def packed_index(self, sample_positions: torch.Tensor) -> torch.Tensor:
        """(B,) positions within each sample -> their (B,) indices among the R*L flattened packed positions."""
        slots = torch.arange(self.num_samples, device=sample_positions.device) * self.longest + sample_positions
        return self._sample_to_packed[slots]

    def visual_slots(self, visual_tokens: int, has_image: Optional[torch.Tensor]) -> torch.Tensor:
        """(R, L) True at the first ``visual_tokens`` positions of every sample with an image: where a strategy
        that puts visual tokens in the sequence finds them reserved in a packed row (see
        ``VisualStrategy.prefix_positions``)."""
        first = self.valid & (self.positions < visual_tokens)
        return first if has_image is None else first & self.per_position(has_image.bool())

    def prompt_ends(self, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """(B,) position within each sample of its last prompt token (as ``last_prompt_positions`` for rows):
        the one before the first label, or the sample's last position when it has no label."""
        last = self.lengths - 1
        if labels is None:
            return last
        is_answer = (self.to_samples(labels) >= 0) & self.sample_mask()
        first_answer = is_answer.long().argmax(1)
        return torch.where(is_answer.any(1), (first_answer - 1).clamp(min=0), last)

    def _leading_dims(self, tensor: torch.Tensor) -> int:
        rows, length = self.segment_ids.shape
        if tensor.shape[:2] == (rows, length):
            return 2
        if tensor.shape[:2] == (1, rows * length):
            return 2
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not hold the {rows} x {length} packed positions")


def image_indicator(image_features: torch.Tensor, has_image: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 1, 1) float mask, 0 for rows without an image; ``has_image=None`` means every row has one. For
    multi-image batches (``has_image`` (B, k) per image slot) a (B, k x N, 1) mask, 0 on the N rows of each
    empty slot."""
    if has_image is None:
        return image_features.new_ones(image_features.shape[0], 1, 1)
    if has_image.dim() == 2:
        per_slot = image_features.shape[1] // has_image.shape[1]
        return has_image.to(image_features.dtype).repeat_interleave(per_slot, dim=1)[..., None]
    return has_image.to(image_features.dtype).view(-1, 1, 1)


def project_visual(projector: nn.Module, image_features: Optional[torch.Tensor], has_image: Optional[torch.Tensor],
                   batch_size: int, tokens_without_features: int) -> torch.Tensor:
    """(B, N, d) projected visual tokens, zero for rows without an image. With no features at all (a text-only
    batch), ``tokens_without_features`` zero rows, so the strategy's shapes stay the same."""
    if image_features is None:
        weight = projector.fc2.weight
        return weight.new_zeros(batch_size, tokens_without_features, weight.shape[0])
    return projector(image_features) * image_indicator(image_features, has_image)


def place_visual_tokens(layout: PackedLayout, text_embeds: torch.Tensor, visual: torch.Tensor,
                        has_image: Optional[torch.Tensor]) -> torch.Tensor:
    """Packed rows: each image sample's N visual tokens (``visual`` (B, N, d)) in the N positions reserved in
    front of its text, the text embeddings elsewhere. Each sample's visual tokens precede only its own text,
    and attention never crosses samples, so they are visible to that sample alone."""
    tokens = visual.shape[1]
    slots = layout.visual_slots(tokens, has_image)
    per_position = visual.reshape(-1, visual.shape[-1])[
        layout.segment_ids.clamp(min=0) * tokens + layout.positions.clamp(max=tokens - 1)]
    return torch.where(slots[..., None], per_position.to(text_embeds.dtype), text_embeds)


def is_multi_image(has_image: Optional[torch.Tensor]) -> bool:
    """Whether a batch holds samples with several image slots: ``has_image`` (B, k) per slot."""
    return has_image is not None and has_image.dim() == 2


def place_in_text(input_ids: torch.Tensor, text_embeds: torch.Tensor, visual: torch.Tensor, has_image: torch.Tensor,
                  layout: Optional[PackedLayout]) -> torch.Tensor:
    """Multi-image batches: the data layer puts each image's positions at its ``<image>`` tag in the text, as
    negative input ids, -1 - r for row r of the sample's visual tokens (``visual`` (B, k x N, d): image j's
    token t is row j x N + t; memvp_ds.data.collate.visual_marker). Those positions get the visual tokens of
    their own sample (a padded batch's row, a packed row's ``segment_ids``), the others keep ``text_embeds``.
    Every image of ``has_image`` (B, k) must have its positions: a batch encoded without them would otherwise
    train on the text alone."""
    marked = input_ids < 0
    if int(marked.sum()) != int(visual.shape[1] // has_image.shape[1] * has_image.sum()):
        raise ValueError("a multi-image batch whose text lacks its images' positions: encode it with the strategy's "
                         "prefix_positions (memvp_ds.data.collate.SampleEncoder visual_positions)")
    if layout is None:
        samples = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    else:
        samples = layout.segment_ids.clamp(min=0)
    rows = samples * visual.shape[1] + (-1 - input_ids).clamp(min=0)
    per_position = visual.reshape(-1, visual.shape[-1])[rows]
    return torch.where(marked[..., None], per_position.to(text_embeds.dtype), text_embeds)


class VisualStrategy(nn.Module):
    """One way of feeding projected visual features to a frozen decoder-only LLM.

    A strategy owns all of its trainable tensors and uses them only inside its own ``forward`` (or in hooks
    it registers on LLM submodules with tensors computed in that ``forward``): under ZeRO-3 a parameter is
    gathered only while the module that owns it runs. ``forward`` is called once per model forward and once
    per ``generate`` call; anything per-image is computed there, never per layer or per decoded token.
    Submodules called from such hooks are fine too: ZeRO-3 gathers a module's parameters around its own call.
    """

    name: ClassVar[str]
    options: ClassVar[Optional[type]] = None
    """The strategy's options dataclass, added to the config as ``model.<name>`` (None: no options)."""
    has_lora: ClassVar[bool] = False
    """Whether the method is defined with LoRA on the LLM (``model.lora``, on unless set otherwise)."""
    reads_last_clip_block: bool = False
    """Whether ``forward`` also reads the online CLIP tower's last block output (CLS first, no ln_post), which
    the model hands over through ``set_last_clip_block`` before each call (DVP-SQA's cross-attention)."""
    multi_image: ClassVar[bool] = True
    """Takes samples with several images (data.max_images > 1): ``image_features`` (B, k x N, C), a sample's
    images in consecutive slots of N rows, and ``has_image`` (B, k) per slot. A strategy with
    ``prefix_positions`` then finds each image's positions at its tag in the text (``place_in_text``)."""

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel):
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: Optional[torch.Tensor],
        has_image: Optional[torch.Tensor],
        prompt_end: torch.Tensor,
        layout: Optional[PackedLayout] = None,
    ) -> DecoderInputs:
        """``prompt_end`` (B,) is the index of each row's last prompt token: the answer starts after it.

        Every strategy has an exact packed form: with ``layout`` (a packed batch, training only) ``input_ids``
        is (R, L) rows of several samples, ``image_features``/``has_image``/``prompt_end`` have one entry per
        sample (``prompt_end`` counts within the sample, reserved positions included) and the strategy must
        keep every term per sample (``layout.to_samples`` / ``per_position``); ``attention_mask`` then marks
        text tokens only, attention isolation is the wrapper's.
        """
        raise NotImplementedError

    def set_last_clip_block(self, tokens: torch.Tensor) -> None:
        """(B, 1 + patches, C): the last CLIP block's output for the coming ``forward`` (strategies that set
        ``reads_last_clip_block``)."""
        raise NotImplementedError(f"the {self.name} strategy does not read the last CLIP block")

    def prefill_finished(self) -> None:
        """``generate`` calls this after the prompt pass, before decoding from the KV cache. Strategies whose
        term applies to prompt positions only (DVP) stop applying it; the others keep theirs."""

    def decoding_rows(self) -> Tuple[torch.Tensor, ...]:
        """The per-row tensors that decoding from the KV cache reads after ``prefill_finished`` (batch
        first; default none). A server decoding rows prefilled in different calls together (continuous
        batching, memvp_ds.serve) slices and concatenates them and hands them back to
        ``set_decoding_rows`` before each step."""
        return ()

    def set_decoding_rows(self, rows: Tuple[torch.Tensor, ...]) -> None:
        """Decode the rows whose ``decoding_rows`` are ``rows`` (concatenated in the batch's order)."""

    def leading_cache_columns(self) -> int:
        """KV-cache columns that must stay first in every row while decoding (DVP's token slot, which its
        layers below K find at key 0); a server that aligns rows of different lengths pads after them."""
        return 0

    def prefix_positions(self) -> int:
        """Positions the strategy puts in front of each image sample's text (input-space strategies: its N
        visual tokens; DVP's token: 1; the others: 0). A padded batch with image features gains them in every
        row, a packed row reserves them per image sample (the data layer does), and they are computed in
        every layer like text (speed and FLOPs accounting)."""
        return 0

    def forward_flops_per_position_and_layer(self) -> float:
        """Forward FLOPs the strategy adds per position in each computed decoder layer (MFU accounting)."""
        return 0.0
