"""DVP-SQA's cross-attention input (model.dvp.cross_features): the last CLIP block's whole output, CLS first,
without ln_post, through CLIP's routed adapters, against open_clip's own intermediates and a hand computation."""

import json

import pytest
import torch

from memvp_ds import ConfigError, build_model
from memvp_ds.vision.clip_features import load_clip_visual, normalize_pixels
from tests.conftest import TINY_VIT, randomise_trainable, tiny_config
from tests.test_model_lavin import _official_adapter


def _online_lavin_dvp(tmp_path, *overrides):
    """DVP on LaVIN with the online tiny ViT at 8 blocks (cls_every_4: 2 visual tokens of width 32)."""
    vit = json.loads(open(TINY_VIT).read())
    vit["vision_cfg"]["layers"] = 8
    path = tmp_path / "tiny-vit-8.json"
    path.write_text(json.dumps(vit))
    return tiny_config("dvp", "model.dvp.base=lavin", "model.dvp.layer=0", "model.dvp.dropout=0.0",
                       "model.lavin.dropout=0.0", "model.visual_tokens=2", "model.vision.online=true",
                       f"model.vision.recipe.model={path}", "model.vision.recipe.pretrained=random",
                       "model.vision.recipe.image_size=64", "model.vision.recipe.layer=cls_every_4",
                       "model.vision.recipe.ln_post=false", "model.vision.adapter_form=routed_attention",
                       "model.vision.adapter_dim=8", "model.vision.adapter_scale=1.0", "model.vision.adapter_dropout=0.0",
                       *overrides)


def _generator_input(model, pixels):
    """The features the layer-K generator's cross-attention receives in one forward."""
    seen = []
    generator = model.strategy.generators["0"]
    handle = generator.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    ids = torch.randint(4, 512, (pixels.shape[0], 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, images=pixels, has_image=torch.ones(pixels.shape[0], dtype=torch.bool))
    handle.remove()
    return seen[0]


def test_cross_attention_reads_the_last_clip_block_with_cls_through_the_adapters(tmp_path):
    cfg = _online_lavin_dvp(tmp_path)
    assert cfg.model.dvp.cross_features == "auto"  # resolves to the official input on the lavin base, online
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert model.strategy.reads_last_clip_block
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recipe = cfg.model.vision.recipe
    normalized = normalize_pixels(pixels, recipe.mean, recipe.std)
    # Fresh routed adapters are the identity: open_clip's own last intermediate, CLS in front, no ln_post.
    visual = load_clip_visual(recipe)
    with torch.no_grad():
        out = visual.forward_intermediates(normalized, indices=[7], intermediates_only=True, output_fmt="NLC",
                                           output_extra_tokens=True)
    expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    got = _generator_input(model, pixels)
    assert got.shape == (2, 17, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Trained adapters: LaVIN's CLIP block x + attn(RepAdapter_Router(ln_1 x)) (router per token) by hand.
    randomise_trainable(model.vision, seed=2)
    with torch.no_grad():
        x = model.vision.embed(normalized)
        for routed in model.vision.blocks:
            b, a = routed.block, routed.adapter
            h = b.ln_1(x)
            adapted = torch.cat([_official_adapter(a, h[:, j:j + 1]) for j in range(h.shape[1])], dim=1)
            x = x + b.attention(adapted)
            x = x + b.mlp(b.ln_2(x))
    got = _generator_input(model, pixels)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, expected, atol=1e-3)


def test_visual_option_reads_the_strategys_features(tmp_path):
    """cross_features=visual: the generator reads LaVIN's visual tokens (the CLS taps), as before."""
    cfg = _online_lavin_dvp(tmp_path, "model.dvp.cross_features=visual")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert not model.strategy.reads_last_clip_block
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        taps = model.vision(pixels)
    torch.testing.assert_close(_generator_input(model, pixels), taps)


def test_official_features_need_the_online_tower_running_the_last_block(tmp_path):
    offline = ["model.dvp.base=lavin", "model.dvp.layer=0"]
    assert tiny_config("dvp", *offline).model.dvp.cross_features == "auto"  # offline: the shards' features
    torch.manual_seed(0)
    assert not build_model(tiny_config("dvp", *offline).model).strategy.reads_last_clip_block
    with pytest.raises(ConfigError, match="model.dvp.cross_features: last_with_cls .*model.vision.online=true"):
        tiny_config("dvp", *offline, "model.dvp.cross_features=last_with_cls")
    with pytest.raises(ConfigError, match="model.dvp.cross_features: last_with_cls needs the last CLIP block"):
        tiny_config("dvp", *offline, "model.dvp.cross_features=last_with_cls", "model.vision.online=true")
    with pytest.raises(ConfigError, match="model.dvp.cross_features"):
        tiny_config("dvp", *offline, "model.dvp.cross_features=penultimate")
