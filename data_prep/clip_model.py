"""The CLIP tower for extraction: weights that are really there, the model's own input size, and a log line
that states the preprocessing the recipe applies.

While building a model, open_clip logs its own preprocessing config at INFO, with CLIP's mean/std. The
MemVP recipe normalises with ImageNet's mean/std instead (memvp_ds.vision.clip_features), so that line
would mislead; it is muted and replaced by one that states what extraction really does.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from torch import nn

from data_prep.sources.records import load_json
from memvp_ds.vision.clip_features import FeatureRecipe, load_clip_visual

log = logging.getLogger("data_prep")
_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


def _model_config(model: str) -> Dict[str, Any]:
    """open_clip's config for a model name, or the contents of a model-config JSON file."""
    import open_clip

    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"--clip-model {model}: model config file not found")
        config = load_json(model)
    else:
        config = open_clip.get_model_config(model)
        if config is None:
            raise ValueError(f"--clip-model {model}: neither an open_clip model name (see open_clip.list_models()) "
                             "nor a model-config .json file (for other models, give --image-size)")
    if not isinstance(config, dict) or "vision_cfg" not in config:
        raise ValueError(f"--clip-model {model}: not an open_clip model config (no 'vision_cfg')")
    return config


def native_image_size(model: str) -> int:
    """The square input size the open_clip model is built for (its vision_cfg.image_size)."""
    from open_clip.model import CLIPVisionCfg

    size = _model_config(model)["vision_cfg"].get("image_size", CLIPVisionCfg().image_size)
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    if height != width:
        raise ValueError(f"--clip-model {model}: input {height}x{width} is not square; the recipe resizes to squares")
    return int(height)


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


def check_weights_available(recipe: FeatureRecipe, allow_download: bool) -> None:
    """Fail at once with a one-line fix when the CLIP weights are neither local nor allowed to download."""
    pretrained = recipe.pretrained
    if pretrained == "random" or os.path.isfile(pretrained):
        return
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"--clip-pretrained {pretrained}: no such checkpoint file")
    if not allow_download:
        raise ValueError(
            f"--clip-pretrained {pretrained} is an open_clip download tag and downloads are off: download the "
            "weights once with --allow-download on a machine with internet access, or pass the path of a local "
            "checkpoint file (e.g. --clip-pretrained /ckpt/open_clip_pytorch_model.bin)"
        )


def preprocessing_summary(recipe: Dict[str, Any]) -> str:
    """How images become model input under a recipe (as stored in a manifest), in one phrase."""
    size = recipe["image_size"]
    return (f"images resized to {size}x{size} (bicubic, no crop), normalised with mean "
            f"{tuple(recipe['mean'])} std {tuple(recipe['std'])}")


@contextmanager
def _open_clip_info_muted() -> Iterator[None]:
    # open_clip logs through the root logger, so its INFO lines can only be held back there; its warnings
    # (e.g. randomly initialised weights) still pass.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def load_visual(recipe: FeatureRecipe, allow_download: bool) -> nn.Module:
    """The recipe's CLIP vision tower, checked to take inputs of the recipe's image size."""
    with _open_clip_info_muted():
        visual = load_clip_visual(recipe, allow_download)
    size = tuple(visual.image_size)
    if size != (recipe.image_size, recipe.image_size):
        raise ValueError(f"--image-size {recipe.image_size} does not fit {recipe.model}, whose position embedding "
                         f"is for {size[0]}x{size[1]} inputs; leave --image-size out to use the model's own size")
    log.info("CLIP %s (weights: %s): %s", recipe.model, recipe.pretrained, preprocessing_summary(recipe.to_dict()))
    return visual
