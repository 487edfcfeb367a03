"""Shared fixtures: tiny random models built from the shipped tiny configs, a tokenizer trained here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memvp_ds import build_model, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "memvp_ds" / "recipes" / "configs"


def tiny_config(strategy: str = "memvp", *overrides: str):
    return load_config(str(CONFIGS / f"tiny_{strategy}.yaml"), list(overrides))


def tiny_model(strategy: str = "memvp", *overrides: str):
    torch.manual_seed(0)
    return build_model(tiny_config(strategy, *overrides).model)


def randomise_trainable(module: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Every trainable tensor of ``module`` drawn anew, N(0, std^2) from a generator seeded with ``seed``: tests
    then see non-trivial values everywhere (zero-initialised output maps included), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write_tiny_export(path, tokenizer_dir: str, strategy: str = "memvp", *overrides: str) -> str:
    """An export of the tiny ``strategy`` without training: its trainable tensors perturbed (a fresh memory
    has zero values and would add nothing), the tiny CLIP recipe, the official ScienceQA prompt format unless
    ``overrides`` say otherwise."""
    from memvp_ds.export import write_export

    options = [f"data.tokenizer={tokenizer_dir}", "data.prompt_format=qcm_a", *overrides]
    generator = torch.Generator().manual_seed(1)
    tensors = {name: (p.detach() + 0.5 * torch.randn(p.shape, generator=generator)).contiguous()
               for name, p in tiny_model(strategy, *options).trainable_parameters().items()}
    write_export(tensors, str(path), tiny_config(strategy, *options),
                 {"model": TINY_VIT, "pretrained": "random", "image_size": 64})
    return str(path)


def dvp_batch(visual_tokens: int = 16, visual_dim: int = 32):
    """A batch for DVP's formula tests: (ids, mask, labels, features, has_image). Row 0: image; row 1: image,
    left-padded by 3; row 2: no image. Prompts end at 4, 6 and 5."""
    g = torch.Generator().manual_seed(5)
    ids, feats = torch.randint(4, 512, (3, 10), generator=g), torch.randn(3, visual_tokens, visual_dim, generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    labels = ids.clone()
    labels[0, :5], labels[1, :7], labels[2, :6] = -100, -100, -100
    return ids, mask, labels, feats, torch.tensor([True, True, False])


def additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean ``keep`` attention mask as the additive float mask a decoder block takes."""
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from memvp_ds.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [
        f"Question: What colour is the {shape} at the {pos}?\nContext: N/A\nOptions: (A) red (B) blue\n"
        f"Answer: The answer is {letter}."
        for shape in ("circle", "square", "triangle")
        for pos in ("left", "right", "top", "bottom")
        for letter in "ABCD"
    ]
    train_tokenizer(texts * 4, str(out), vocab_size=300)
    return str(out)


@pytest.fixture(autouse=True)
def _cpu_threads():
    # Never more torch threads than cores: subprocess ranks started by a test share the same cores.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


TINY_VIT = str(REPO / "memvp_ds" / "vision" / "model_configs" / "tiny-vit.json")


def prepare_dataset(root: Path, num_train=192, num_val=32, num_test=32, samples_per_shard=24,
                    clip_pretrained: str = "random", store: str = "features") -> dict:
    """Synthetic ScienceQA -> tiny-CLIP shards -> tokenizer trained on its text (the real pipeline)."""
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import ScienceQASource
    from data_prep.synthetic import make_synthetic_scienceqa
    from memvp_ds.data.prompts import build_segments
    from memvp_ds.data.tokenizer import train_tokenizer
    from memvp_ds.vision.clip_features import FeatureRecipe

    make_synthetic_scienceqa(str(root / "sqa"), num_train, num_val, num_test, seed=0)
    recipe = FeatureRecipe(model=TINY_VIT, pretrained=clip_pretrained, image_size=64)
    manifest = run_extract(ScienceQASource(str(root / "sqa")), recipe,
                           ExtractOptions(out_dir=str(root / "shards"), samples_per_shard=samples_per_shard, num_workers=0,
                                          store=store))
    import json

    problems = json.load(open(root / "sqa" / "problems.json"))
    texts = ["".join(t for t, _ in build_segments(p, "qcm_a")) for p in problems.values()]
    train_tokenizer(texts, str(root / "tokenizer"), vocab_size=400)
    shards = lambda split: "::".join(str(root / "shards" / s["name"]) for s in manifest["shards"] if s["split"] == split)
    return {"root": root, "train": shards("train"), "val": shards("val"), "test": shards("test"),
            "tokenizer": str(root / "tokenizer"), "manifest": manifest}


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict:
    return prepare_dataset(tmp_path_factory.mktemp("dataset"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is available (pytest -m gpu on a GPU machine) and skip elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
