"""Model FLOPs for MFU count the work that really runs: each weight matmul by the rows it processes (the
projector on visual tokens, the LM head at labelled positions, the LLM's layers at every position), frozen
weights at 4 FLOPs per weight and row, trainable ones at 6; checked against hand counts."""

import pytest
import torch
from torch import nn

from memvp_ds.engine.metrics import MatmulFlopCounter
from tests.conftest import tiny_model

N, C = 16, 32


def test_input_prefix_step_counts_layers_at_every_position_projector_on_visual_tokens_head_at_labels():
    model = tiny_model("input_prefix").train()
    ids = torch.randint(4, 512, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 6:], labels[1, 9:] = ids[0, 6:], ids[1, 9:]  # 6 + 3 labels, each predicted by the position before
    counter = MatmulFlopCounter(model)
    with torch.no_grad(), counter.counting():
        model(ids, labels=labels, image_features=torch.randn(2, N, C))
    layers = sum(p.numel() for p in model.llm.model.layers.parameters() if p.dim() == 2)  # q k v o gate up down
    projector = sum(p.numel() for p in model.strategy.projector.parameters() if p.dim() == 2)
    head = model.llm.lm_head.weight.numel()
    positions, visual_rows, predicting = 2 * (12 + N), 2 * N, 6 + 3
    assert counter.take() == 4 * layers * positions + 6 * projector * visual_rows + 4 * head * predicting
    with torch.no_grad():  # outside counting(): nothing is added (e.g. checkpointing's recomputation)
        model(ids, labels=labels, image_features=torch.randn(2, N, C))
    assert counter.take() == 0


def test_multihead_attention_and_conv_adapters_are_counted():
    attention = nn.MultiheadAttention(8, 2, batch_first=True).requires_grad_(False)
    adapter = nn.Conv1d(8, 4, 1)  # trainable, as a RepAdapter-style 1x1 convolution
    counter = MatmulFlopCounter(nn.ModuleList([attention, adapter]))
    x = torch.randn(3, 5, 8)
    with counter.counting():
        attention(x, x, x)
        adapter(x.transpose(1, 2))
    rows = 3 * 5
    # Fused q/k/v and output projections (4 x 8 x 8 frozen weights), attention's QK^T and AV (4 x 8 x 5 per
    # row, tripled for backward), and the adapter's 8 x 4 trainable weights.
    assert counter.take() == pytest.approx(rows * (4 * 4 * 64 + 3 * 4 * 8 * 5) + 6 * 32 * rows)
