"""CLIP patch features with the official MemVP recipe, shared by data_prep, online prediction and the online
vision tower (memvp_ds/vision/tower.py).

Default recipe: bicubic resize of the whole image to 224 x 224 (no crop), ImageNet mean/std (a quirk of the
official code, not CLIP's own statistics), all transformer blocks but the last, CLS dropped, ln_post
applied, no projection: 256 x 1024 for ViT-L/14, stored as fp16.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FEATURE_LAYERS = ("penultimate", "last", "cls_every_4")
CLS_TAP_EVERY = 4
"""cls_every_4: LaVIN reads the CLS token after blocks 4, 8, ... (its CLIP returns them instead of the image
embedding)."""


@dataclass
class FeatureRecipe:
    model: str = "ViT-L-14"
    """open_clip model name, a shipped model config (``tiny-vit``: memvp_ds/vision/model_configs/), or a path
    to an open_clip model-config JSON (custom or tiny models)."""
    pretrained: str = "openai"
    """open_clip pretrained tag, a local checkpoint file, or 'random' (random weights: tests and demos)."""
    image_size: int = 224
    """Side of the square the whole image is resized to (bicubic, aspect ratio not kept, no crop)."""
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    """Per-channel mean subtracted after scaling pixels to [0, 1] (official: ImageNet's, not CLIP's)."""
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    """Per-channel standard deviation the centred pixels are divided by."""
    layer: str = "penultimate"
    """penultimate (official MemVP) or last transformer block's tokens, or cls_every_4: the CLS token after
    every 4th block (LaVIN's visual tokens: 6 for ViT-L/14's 24 blocks)."""
    keep_cls: bool = False
    """Keep the CLS token in front of the patch tokens (not the official recipe; cls_every_4 has only CLS)."""
    ln_post: bool = True
    """Apply CLIP's final LayerNorm to the output tokens (official MemVP: yes; LaVIN and DVP read the blocks'
    output as is)."""
    quick_gelu: bool = True
    """OpenAI's CLIP weights were trained with QuickGELU; a local checkpoint file cannot tell open_clip so."""
    dtype: str = "float16"
    """Storage dtype of extracted features."""

    def __post_init__(self) -> None:
        if self.layer not in FEATURE_LAYERS:
            raise ValueError(f"feature layer must be one of {', '.join(FEATURE_LAYERS)}, got '{self.layer}'")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_stored(cls, stored: Dict[str, Any], **overrides: Any) -> "FeatureRecipe":
        """The recipe in a stored dict (an export's or a manifest's, which also hold derived entries such as
        the token count), with ``overrides`` on top."""
        names = cls.__dataclass_fields__
        return cls(**{**{k: v for k, v in stored.items() if k in names}, **overrides})


def resize_image(image: Image.Image, recipe: FeatureRecipe) -> Image.Image:
    """The recipe's resize: the whole image squashed to image_size x image_size, bicubic (PIL)."""
    size = (recipe.image_size, recipe.image_size)
    return transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)(image)


def image_pixels(image: Image.Image, recipe: FeatureRecipe) -> torch.Tensor:
    """(3, S, S) uint8 pixels after the recipe's resize: what shards store for online use (as PNG)."""
    return transforms.functional.pil_to_tensor(resize_image(image, recipe))


def normalize_pixels(pixels: torch.Tensor, mean: List[float], std: List[float]) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 scaled to [0, 1] and normalised per channel.

    The very operations of torchvision's ToTensor + Normalize, in the same order, so features made from
    stored pixels equal features made from the decoded image bit for bit.
    """
    x = pixels.to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub(mean_t).div(std_t)


def _transform(image: Image.Image, recipe: FeatureRecipe) -> torch.Tensor:
    return normalize_pixels(image_pixels(image, recipe), recipe.mean, recipe.std)


def image_transform(recipe: FeatureRecipe) -> Callable[[Image.Image], torch.Tensor]:
    """RGB image -> (3, S, S) float32 CLIP input: resize, scale to [0, 1], normalise (picklable)."""
    return functools.partial(_transform, recipe=recipe)


def load_image(path: str) -> Image.Image:
    """Fully decode an image as RGB; raises on missing, truncated or corrupt files."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


SHIPPED_MODEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def _model_name(recipe: FeatureRecipe) -> str:
    """Register a model-config JSON (a path, or the name of a shipped one) with open_clip and return the
    name it is known by. A shipped name keeps the recipe portable: it names no install location."""
    import open_clip

    path = recipe.model
    shipped = os.path.join(SHIPPED_MODEL_CONFIGS, path + ".json")
    if os.path.isfile(shipped):
        path = shipped
    elif not path.endswith(".json"):
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"open_clip model config not found: {path}")
    with open(path) as f:
        if "vision_cfg" not in json.load(f):
            raise ValueError(f"{path}: not an open_clip model config (no 'vision_cfg')")
    open_clip.add_model_config(path)
    return os.path.splitext(os.path.basename(path))[0]


def load_clip_visual(recipe: FeatureRecipe, allow_download: bool = False) -> nn.Module:
    """The vision tower of an open_clip model; weights from a local file unless downloads are allowed."""
    import open_clip

    name = _model_name(recipe)
    pretrained = recipe.pretrained
    if pretrained == "random":
        pretrained = None
        torch.manual_seed(0)  # every process (array task, rank) must build the same random tower
    elif not os.path.isfile(pretrained) and not allow_download:
        raise FileNotFoundError(
            f"CLIP weights '{pretrained}' are not a local file; pass the checkpoint path "
            "(e.g. open_clip_pytorch_model.bin) or allow downloads explicitly"
        )
    # On the default device, so a model built under ``torch.device("meta")`` (sizing without allocating) stays there.
    model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=recipe.quick_gelu,
                                   device=torch.get_default_device())
    visual = model.visual.eval().requires_grad_(False)
    for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post"):
        if not hasattr(visual, attr):
            raise ValueError(f"open_clip model '{name}' has no ViT attribute '{attr}'; only ViT towers are supported")
    return visual


class ClipFeatureExtractor(nn.Module):
    """Batched images (B, 3, H, W), already transformed -> patch tokens (B, N, C) per the recipe."""

    def __init__(self, visual: nn.Module, recipe: FeatureRecipe):
        super().__init__()
        self.visual, self.recipe = visual, recipe

    @property
    def tokens(self) -> int:
        grid = self.visual.grid_size
        return output_tokens(self.recipe, grid[0] * grid[1], len(self.visual.transformer.resblocks))

    @property
    def dim(self) -> int:
        return self.visual.transformer.width

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        blocks = v.transformer.resblocks
        return run_recipe_blocks(x, blocks[:recipe_depth(self.recipe, len(blocks))], self.recipe,
                                 getattr(v.transformer, "batch_first", True), v.ln_post)


def recipe_depth(recipe: FeatureRecipe, blocks: int) -> int:
    """Transformer blocks the recipe runs: all but the last for penultimate-layer features."""
    return blocks - 1 if recipe.layer == "penultimate" else blocks


def output_tokens(recipe: FeatureRecipe, patches: int, blocks: int) -> int:
    """N: tokens per image the recipe makes from ``patches`` patch tokens and a ``blocks``-block tower."""
    if recipe.layer == "cls_every_4":
        if blocks < CLS_TAP_EVERY:
            raise ValueError(f"feature layer cls_every_4 needs a tower of at least {CLS_TAP_EVERY} blocks; "
                             f"{recipe.model} has {blocks}")
        return blocks // CLS_TAP_EVERY
    return patches + (1 if recipe.keep_cls else 0)


def run_recipe_blocks(x: torch.Tensor, blocks, recipe: FeatureRecipe, batch_first: bool,
                      ln_post: nn.Module) -> torch.Tensor:
    """(B, 1 + patches, C) embedded tokens through ``blocks`` -> the recipe's (B, N, C) output tokens."""
    return recipe_output(*run_blocks(x, blocks, recipe, batch_first), recipe, ln_post)


def run_blocks(x: torch.Tensor, blocks, recipe: FeatureRecipe, batch_first: bool
               ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(B, 1 + patches, C) embedded tokens through ``blocks`` -> the last block's whole output (B, 1 + patches,
    C), CLS first, and the CLS taps the recipe reads on the way (cls_every_4; else none)."""
    if not batch_first:
        x = x.transpose(0, 1)
    taps = []
    for index, block in enumerate(blocks):
        x = block(x)
        if recipe.layer == "cls_every_4" and (index + 1) % CLS_TAP_EVERY == 0:
            taps.append(x[:, :1] if batch_first else x[:1].transpose(0, 1))
    if not batch_first:
        x = x.transpose(0, 1)
    return x, taps


def recipe_output(last: torch.Tensor, taps: List[torch.Tensor], recipe: FeatureRecipe, ln_post: nn.Module
                  ) -> torch.Tensor:
    """The recipe's (B, N, C) tokens from ``run_blocks``' results."""
    if taps:
        x = torch.cat(taps, dim=1)
    elif not recipe.keep_cls:
        x = last[:, 1:]
    else:
        x = last
    return ln_post(x) if recipe.ln_post else x
