"""The running rows of continuous batching: their KV cache, attention mask, last hidden states and the
strategy's per-row decoding tensors, kept as one batch that rows join and leave between decode steps.

Rows prefilled in different calls have caches of different lengths. They are aligned by inserting masked
columns (attention mask 0) after the strategy's leading columns (DVP's token slot must stay at key 0), as
a left-padded batch is: masked keys get exactly zero attention weight and positions count attended columns
only, so each row decodes what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from transformers import DynamicCache


@dataclass
class Rows:
    """``hidden`` (B, d): each row's last hidden state (the next token comes from it); ``mask`` (B, S): the
    attended cache columns; ``cache``: the KV cache; ``state``: the strategy's ``decoding_rows``."""

    hidden: torch.Tensor
    mask: torch.Tensor
    cache: DynamicCache
    state: Tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return self.hidden.shape[0]


def check_cache(cache: DynamicCache) -> None:
    """Only plain growing cache layers can be aligned column by column (no sliding windows, no offload)."""
    sliding = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_sliding", False)]
    if sliding:
        raise ValueError(f"memvp-serve: cache layers {sliding} use a sliding window, which continuous batching "
                         "cannot align; serve a model without sliding-window attention")


def _insert_columns(tensor: torch.Tensor, dim: int, at: int, count: int) -> torch.Tensor:
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    head, tail = tensor.narrow(dim, 0, at), tensor.narrow(dim, at, tensor.shape[dim] - at)
    return torch.cat([head, tensor.new_zeros(shape), tail], dim=dim)


def _widen(rows: Rows, length: int, lead: int) -> None:
    extra = length - rows.mask.shape[1]
    rows.mask = _insert_columns(rows.mask, 1, lead, extra)
    for layer in rows.cache.layers:
        layer.keys = _insert_columns(layer.keys, -2, lead, extra)
        layer.values = _insert_columns(layer.values, -2, lead, extra)


def join(running: Rows, newcomers: Rows, lead: int) -> Rows:
    """``running`` and then ``newcomers`` as one batch (both are consumed)."""
    length = max(running.mask.shape[1], newcomers.mask.shape[1])
    _widen(running, length, lead)
    _widen(newcomers, length, lead)
    for mine, theirs in zip(running.cache.layers, newcomers.cache.layers):
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])
    state = tuple(torch.cat([a, b]) for a, b in zip(running.state, newcomers.state))
    return Rows(torch.cat([running.hidden, newcomers.hidden]), torch.cat([running.mask, newcomers.mask]),
                running.cache, state)


def keep(rows: Rows, keep_rows: List[int], lead: int) -> Rows:
    """Only the rows ``keep_rows`` (in that order), without the columns no remaining row attends to
    (after the ``lead`` columns), which padding for rows that left had added."""
    index = torch.tensor(keep_rows, dtype=torch.long, device=rows.mask.device)
    mask = rows.mask[index]
    attended = mask[:, lead:].any(0).nonzero()
    drop = int(attended[0]) if len(attended) else 0
    columns = torch.cat([torch.arange(lead, device=mask.device),
                         torch.arange(lead + drop, mask.shape[1], device=mask.device)])
    for layer in rows.cache.layers:
        layer.keys = layer.keys[index][:, :, columns]
        layer.values = layer.values[index][:, :, columns]
    return Rows(rows.hidden[index], mask[:, columns], rows.cache, tuple(t[index] for t in rows.state))
