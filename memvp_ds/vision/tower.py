"""Online CLIP: the frozen vision tower run inside the trained model, with a small trainable adapter in every
block that runs (the official MemVP / LaVIN setup). Off by default: the model then takes pre-extracted
features, which cannot train these adapters.

MemVP's form (``adapter_form=parallel_mlp``): each adapted block computes ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + s * adapter(ln_2(x))`` with
``adapter = fc2(Dropout(GELU(fc1(.))))``: fc1 (width -> dim) and fc2 (dim -> width) without biases, exact
(erf) GELU, fc2 zero-initialised, so a fresh tower computes exactly the recipe's features. Only the blocks the
recipe runs are kept (the last one is dropped for penultimate-layer features), so no adapter sits idle.
LaVIN's form (``routed_attention``): a routed adapter on each block's attention input (RoutedAttentionBlock).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from memvp_ds.config import ConfigError, check_at_least, check_choice
from memvp_ds.vision.clip_features import (FeatureRecipe, load_clip_visual, normalize_pixels, output_tokens,
                                           recipe_depth, recipe_output, run_blocks)
from memvp_ds.vision.routed_adapter import RoutedAdapter

ADAPTER_FORMS = ("parallel_mlp", "routed_attention")


@dataclass
class VisionOptions:
    """The vision tower inside the model (``model.vision``). Off: the model receives pre-extracted features."""

    online: bool = False
    """Run the frozen CLIP on pixels inside the model and train an adapter in each block that runs (the
    official setup). Needs shards written with ``memvp-prep extract --store images`` (or both)."""
    recipe: FeatureRecipe = field(default_factory=FeatureRecipe)
    """The CLIP model, its weights (a local file, or 'random' for tests) and the feature recipe; the
    shards' manifest must agree on image size, mean/std, layer and CLS."""
    adapter_dim: int = 12
    """Hidden width of each block's adapter (official: 12)."""
    adapter_scale: float = 0.1
    """Factor on the adapter's output (official: 0.1)."""
    adapter_dropout: float = 0.1
    """Dropout between the adapter's activation and its up-projection (official: 0.1)."""
    adapter_form: str = "parallel_mlp"
    """parallel_mlp (MemVP's: an adapter beside each block's MLP) or routed_attention (LaVIN's: a routed
    mixture-of-modality adapter on each block's attention input; official dim 8, scale 1)."""
    adapter_temperature: float = 10.0
    """routed_attention: t of the router's softmax (official: LaVIN's temperature, 10 at 7B, 5 at 13B)."""

    def validate(self, cfg) -> None:
        check_at_least("model.vision.adapter_dim", self.adapter_dim, 1)
        check_choice("model.vision.adapter_form", self.adapter_form, ADAPTER_FORMS)
        if self.adapter_form == "routed_attention" and self.adapter_dim % 2:
            raise ConfigError(f"model.vision.adapter_dim: {self.adapter_dim} must be even with routed_attention "
                              "(two expert groups)")
        if self.adapter_temperature <= 0:
            raise ConfigError(f"model.vision.adapter_temperature must be > 0, got {self.adapter_temperature}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ConfigError(f"model.vision.adapter_dropout must be in [0, 1), got {self.adapter_dropout}")


class ClipBlockAdapter(nn.Module):
    """``fc2(Dropout(GELU(fc1(x))))`` without biases; fc2 starts at zero (fc1 keeps PyTorch's default init)."""

    def __init__(self, width: int, dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, dim, bias=False)
        self.fc2 = nn.Linear(dim, width, bias=False)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact erf GELU as in the official adapter, not CLIP's QuickGELU.
        return self.fc2(self.dropout(F.gelu(self.fc1(x.to(self.fc1.weight.dtype))))).to(x.dtype)


class AdaptedBlock(nn.Module):
    """An open_clip ResidualAttentionBlock with an adapter parallel to its MLP (same ln_2 input)."""

    def __init__(self, block: nn.Module, adapter: ClipBlockAdapter, scale: float):
        super().__init__()
        _check_block(block)
        self.block, self.adapter, self.scale = block, adapter, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.ls_1(b.attention(b.ln_1(x)))
        h = b.ln_2(x)
        return x + b.ls_2(b.mlp(h)) + self.scale * self.adapter(h)


class RoutedAttentionBlock(nn.Module):
    """LaVIN's CLIP block: ``x = x + attn(adapter(ln_1(x))); x = x + mlp(ln_2(x))`` with a routed adapter whose
    experts are weighted per token from that token's own ``ln_1(x)``. (The official code routes each
    position by batch element 0's token there, an artefact of running (L, B, C) tensors through a router
    written for (B, L, C); at batch size 1 the two agree.)"""

    def __init__(self, block: nn.Module, adapter: RoutedAdapter):
        super().__init__()
        _check_block(block)
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        h = b.ln_1(x)
        x = x + b.ls_1(b.attention(self.adapter(h, self.adapter.route(h))))
        return x + b.ls_2(b.mlp(b.ln_2(x)))


def _check_block(block: nn.Module) -> None:
    missing = [name for name in ("ln_1", "attention", "ls_1", "ln_2", "mlp", "ls_2") if not hasattr(block, name)]
    if missing:
        raise ValueError(f"CLIP block {type(block).__name__} lacks {missing}; online mode needs open_clip's "
                         "ResidualAttentionBlock")


class PatchEmbedding(nn.Module):
    """Patches + CLS + positions + ln_pre. The embeddings are re-owned here so that ZeRO-3, which gathers a
    module's parameters around its own forward, finds them when this module runs."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.conv1, self.ln_pre = visual.conv1, visual.ln_pre
        self.class_embedding, self.positional_embedding = visual.class_embedding, visual.positional_embedding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same casts as ClipFeatureExtractor, so a fresh tower reproduces its features bit for bit.
        x = self.conv1(images.to(self.class_embedding.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))


class OnlineClipTower(nn.Module):
    """uint8 pixels (B, 3, S, S) -> features (B, N, C) by the recipe, through the adapted blocks.

    Frozen CLIP (requires_grad False) plus trainable adapters; no ``no_grad``, so gradients flow back
    through the frozen blocks to every adapter. Normalisation happens here in fp32 (the recipe's mean/std),
    so batches carry 8-bit pixels and the result equals ``ClipFeatureExtractor`` on the same image.
    """

    def __init__(self, visual: nn.Module, recipe: FeatureRecipe, adapter_dim: int, adapter_scale: float,
                 adapter_dropout: float, adapter_form: str = "parallel_mlp", adapter_temperature: float = 10.0):
        super().__init__()
        self.recipe = recipe
        self.image_size = recipe.image_size
        self.embed = PatchEmbedding(visual)
        blocks = visual.transformer.resblocks
        depth = recipe_depth(recipe, len(blocks))
        width = visual.transformer.width
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        if adapter_form == "routed_attention":
            self.blocks = nn.ModuleList(
                RoutedAttentionBlock(block, RoutedAdapter(width, adapter_dim, adapter_scale, adapter_temperature,
                                                          adapter_dropout))
                for block in blocks[:depth])
        else:
            self.blocks = nn.ModuleList(
                AdaptedBlock(block, ClipBlockAdapter(width, adapter_dim, adapter_dropout), adapter_scale)
                for block in blocks[:depth])
        self.ln_post = visual.ln_post
        self.dim = width
        """C: channels per output token."""
        self.tokens = output_tokens(recipe, visual.positional_embedding.shape[0] - 1, len(blocks))
        """N: output tokens per image (patches, plus CLS if kept)."""
        self.runs_every_block = depth == len(blocks)
        """Whether the last CLIP block runs (not for penultimate-layer recipes): ``forward_with_last_block``."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_last_block(pixels)[0]

    def forward_with_last_block(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The recipe's features (B, N, C) and the output of the last block that ran (B, 1 + patches, C): CLS
        first, without ln_post, through the adapters (DVP-SQA's cross-attention reads it when that block is
        CLIP's last, ``runs_every_block``)."""
        if tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"online CLIP expects (B, 3, {self.image_size}, {self.image_size}) pixels, got "
                             f"{tuple(pixels.shape)}: shards resized to another size than model.vision.recipe")
        x = self.embed(normalize_pixels(pixels, self.recipe.mean, self.recipe.std))
        last, taps = run_blocks(x, self.blocks, self.recipe, self.batch_first)
        return recipe_output(last, taps, self.recipe, self.ln_post), last


def build_vision_tower(options: VisionOptions) -> OnlineClipTower:
    """Load the frozen CLIP of ``options.recipe`` (a local file, or 'random') and add fresh adapters.

    Loading runs on a forked RNG: open_clip's initialisation (and 'random' weights' fixed seed) must not
    move the caller's random stream. The adapters are drawn from that stream, like any trainable tensor.
    """
    with torch.random.fork_rng(devices=[]):
        visual = load_clip_visual(options.recipe)
    return OnlineClipTower(visual, options.recipe, options.adapter_dim, options.adapter_scale, options.adapter_dropout,
                           options.adapter_form, options.adapter_temperature)
