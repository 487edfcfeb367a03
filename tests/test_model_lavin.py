"""LaVIN against an independent computation of the official formulas on the plain HF model."""

import json

import pytest
import torch
from torch.nn import functional as F

from memvp_ds import build_model, load_config
from memvp_ds.model.llm import load_frozen_llm
from tests.conftest import (CONFIGS, TINY_VIT, additive_mask, dvp_batch, randomise_trainable, tiny_config,
                            tiny_model)

B, T, N, C = 3, 9, 16, 32


def _official_adapter(adapter, x):
    """RepAdapter_Router as in LaVIN's lavin/mm_adapter.py: 1x1 convolutions (groups=2) over (B, d, L), the
    router on the adapter input's token 0, softmax / t."""
    d, h = adapter.down.in_features, adapter.down.out_features
    weights = torch.softmax(F.linear(x[:, 0], adapter.router.weight, adapter.router.bias) / adapter.temperature, -1)
    conv_b = adapter.expert_b.weight.reshape(d, h // 2, 1)
    conv_d = adapter.expert_d.weight.reshape(d, h // 2, 1)
    xt = x.transpose(1, 2)
    hidden = F.conv1d(xt, adapter.down.weight[..., None], adapter.down.bias)
    out = (F.conv1d(hidden, conv_b, adapter.expert_b.bias, groups=2) * adapter.scale * weights[:, 0, None, None]
           + F.conv1d(hidden, conv_d, adapter.expert_d.bias, groups=2) * adapter.scale * weights[:, 1, None, None]
           + xt)
    return out.transpose(1, 2)


def _with_official_adapters(llm, adapters):
    """``llm`` with the official adapter on each block's attention input."""
    for block, adapter in zip(llm.model.layers, adapters):
        block.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, a=adapter: (args, {**kwargs, "hidden_states": _official_adapter(
                a, kwargs["hidden_states"])}), with_kwargs=True)


def _official_visual(projector, feats):
    """LaVIN's adapter_proj: fc2(SiLU(fc1 f))."""
    return F.linear(F.silu(F.linear(feats, projector.fc1.weight, projector.fc1.bias)), projector.fc2.weight,
                    projector.fc2.bias)


def _official_logits(cfg, strategy, ids, feats, has_image, replaced=None):
    """Per sample, LaVIN's sequence [modality token, visual tokens (image samples only), text] with the
    modality token masked from every later position, adapters on each block's attention input; the text's
    logits. ``replaced`` {layer: RoutedAdapter}: LaVIN-DAS skips that block, ``x + mix(attention_norm x)``
    (the official RepAdapter_Router with res=False, routed by token 0)."""
    llm = load_frozen_llm(cfg.model.llm)
    llm.config._attn_implementation = "eager"
    for index, adapter in (replaced or {}).items():
        def skip(module, args, kwargs, output, a=adapter):
            x = args[0] if args else kwargs["hidden_states"]
            n = module.input_layernorm(x)
            return x + (_official_adapter(a, n) - n)
        llm.model.layers[index].register_forward_hook(skip, with_kwargs=True)
    _with_official_adapters(llm, strategy.adapters)
    visual = _official_visual(strategy.projector, feats) * cfg.model.projector.output_scale
    rows = []
    for i in range(ids.shape[0]):
        parts = [strategy.modality.weight[int(has_image[i])][None]]
        if has_image[i]:
            parts.append(visual[i])
        parts.append(llm.model.embed_tokens(ids[i]))
        seq = torch.cat(parts)[None]
        length = seq.shape[1]
        mask = torch.full((length, length), torch.finfo(seq.dtype).min).triu(1)
        mask[1:, 0] = torch.finfo(seq.dtype).min  # official: nothing attends to the modality token
        with torch.no_grad():
            logits = llm(inputs_embeds=seq, attention_mask=mask[None, None]).logits
        rows.append(logits[0, -ids.shape[1]:])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["eval", "train_no_dropout"])
def test_matches_official_formulas(mode):
    cfg = tiny_config("lavin", "model.lavin.dropout=0.0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    randomise_trainable(model)
    model.train(mode != "eval")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (B, T), generator=g)
    feats = torch.randn(B, N, C, generator=g)
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        ours = model(ids, image_features=feats, has_image=has_image).logits
        text_only = model(ids).logits
    reference = _official_logits(cfg, model.strategy, ids, feats, has_image)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    no_image_reference = _official_logits(cfg, model.strategy, ids, feats, torch.zeros(B, dtype=torch.bool))
    torch.testing.assert_close(text_only, no_image_reference, atol=2e-5, rtol=1e-4)
    # The two modality tokens route differently (else the comparison could not tell them apart).
    with torch.no_grad():
        routes = model.strategy._route(model.strategy.modality.weight[:, None])
    assert all(not torch.allclose(w[0], w[1], atol=1e-4) for w in routes)


def test_fresh_adapters_leave_text_only_logits_unchanged():
    model = tiny_model("lavin").eval()
    plain = load_frozen_llm(tiny_config("lavin").model.llm).eval()
    ids = torch.randint(4, 512, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(input_ids=ids).logits, atol=0, rtol=0)


def test_trainable_set_is_projector_modality_and_adapters():
    model = tiny_model("lavin")
    names = set(model.trainable_parameters())
    assert {n.split(".")[1] for n in names} == {"projector", "modality", "adapters"}
    assert all(n.startswith("strategy.") for n in names)
    per_adapter = {n.split(".", 3)[3] for n in names if ".adapters." in n}
    assert per_adapter == {"down.weight", "down.bias", "expert_b.weight", "expert_b.bias", "expert_d.weight",
                           "expert_d.bias", "router.weight", "router.bias"}


@pytest.mark.parametrize("size,t,expected", [("7b", 10.0, 3_781_296), ("13b", 5.0, 5_390_080)])
def test_trainable_count_matches_the_official_one_at_llama_shapes(size, t, expected):
    """Official printout (mm_adaptation.py, '+ Number of trainable params'): 3.78 M at 7B, 5.39 M at 13B
    (rounded there to 3.8 / 5.4). Per LLaMA block 20d + 10 (A: 8d + 8, B and D: 4d + d each, router: 2d + 2),
    the projector 1024 x 128 + 128 + 128 d + d, the modality embedding 2d, and per CLIP block 20 x 1024 + 10:
    all 24 CLIP blocks run (the last one's CLS is visual token 6). Built on the meta device."""
    d, layers, heads, ffn = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]
    llm = {"model_type": "llama", "hidden_size": d, "intermediate_size": ffn, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": 32000}
    cfg = load_config(str(CONFIGS / f"lavin_llama{size}_sqa.yaml"), [
        "model.llm.path=null", f"model.llm.config={json.dumps(llm)}", "model.vision.recipe.pretrained=random"])
    assert cfg.model.lavin.temperature == cfg.model.vision.adapter_temperature == t
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = {n: p.numel() for n, p in model.trainable_parameters().items()}
    assert sum(counts.values()) == expected
    assert sum(v for n, v in counts.items() if n.startswith("vision.")) == 24 * (20 * 1024 + 10)
    assert sum(v for n, v in counts.items() if ".adapters." in n) == layers * (20 * d + 10)
    assert model.vision.tokens == cfg.model.visual_tokens == 6


def test_routed_clip_block_and_cls_taps_match_the_official_formulas(tmp_path):
    """LaVIN's CLIP: x + attn(RepAdapter_Router(ln_1 x)) (router per token), then the CLS token after every 4th
    block, no ln_post; a 4-block tiny ViT gives one visual token."""
    from memvp_ds.vision.clip_features import FeatureRecipe
    from memvp_ds.vision.tower import VisionOptions, build_vision_tower

    vit = json.loads(open(TINY_VIT).read())
    vit["vision_cfg"]["layers"] = 4
    path = tmp_path / "tiny-vit-4.json"
    path.write_text(json.dumps(vit))
    recipe = FeatureRecipe(model=str(path), pretrained="random", image_size=64, layer="cls_every_4", ln_post=False)
    tower = build_vision_tower(VisionOptions(online=True, recipe=recipe, adapter_form="routed_attention",
                                             adapter_dim=8, adapter_scale=1.0, adapter_temperature=5.0)).eval()
    randomise_trainable(tower, seed=2)
    assert tower.tokens == 1
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from memvp_ds.vision.clip_features import normalize_pixels
        x = tower.embed(normalize_pixels(pixels, recipe.mean, recipe.std))
        for routed in tower.blocks:
            b, a = routed.block, routed.adapter
            h = b.ln_1(x)
            # The official router applied to each token alone (batch of one sequence per token).
            adapted = torch.cat([_official_adapter(a, h[:, j:j + 1]) for j in range(h.shape[1])], dim=1)
            x = x + b.attention(adapted)
            x = x + b.mlp(b.ln_2(x))
        torch.testing.assert_close(tower(pixels), x[:, :1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_dvp_on_lavin_equals_the_official_formulas(layer):
    """DVP-SQA (the authors' code on LaVIN) written out with the blocks called one by one: [modality token,
    visual tokens, slot (learned embedding), text]; the modality token hidden from every later position, the
    slot hidden below K; at K the slot becomes the cross-attention (no LayerNorm) over the features, queried
    by the mean state of the prompt tokens after the slot without BOS; routed adapters on every block's
    attention input. Row 1 is left-padded, row 2 has no image."""
    cfg = tiny_config("dvp", "model.dvp.base=lavin", f"model.dvp.layer={layer}", "model.dvp.dropout=0.0",
                      "model.lavin.dropout=0.0")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    randomise_trainable(model)
    ids, mask, labels, feats, has_image = dvp_batch(N, C)
    prompt_end, first = torch.tensor([4, 6, 5]), torch.tensor([0, 3, 0])
    strategy, gen = model.strategy, model.strategy.generators[str(layer)]
    lavin = strategy.base
    with torch.no_grad():
        ours = model(ids, mask, labels=labels, image_features=feats, has_image=has_image).logits
        ref = load_frozen_llm(cfg.model.llm).eval()
        _with_official_adapters(ref, lavin.adapters)
        visual = _official_visual(lavin.projector, feats)
        h = torch.cat([lavin.modality.weight[has_image.long()][:, None], visual * cfg.model.projector.output_scale,
                       strategy.slot.expand(3, 1, -1), ref.model.embed_tokens(ids)], dim=1)
        slot, text0, length = 1 + N, 2 + N, 2 + N + 10
        full_mask = torch.cat([torch.ones(3, 1, dtype=torch.long), has_image.long()[:, None].expand(3, N + 1), mask], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        keep = torch.ones(length, length).tril().bool()[None, None] & full_mask.bool()[:, None, None, :]
        keep[:, :, 1:, 0] = False
        hidden_slot = keep.clone()
        hidden_slot[:, :, slot + 1:, slot] = False
        rotary = ref.model.rotary_emb(h, positions)
        for i, block in enumerate(ref.model.layers):
            if i == layer:
                for row in (0, 1):
                    prompt = [text0 + j for j in range(first[row] + 1, prompt_end[row] + 1)]
                    q = gen.query(h[row, prompt].mean(0))
                    k, v = gen.key(feats[row]), gen.value(feats[row])
                    heads = gen.heads
                    scores = torch.einsum("hd,nhd->hn", q.view(heads, -1), k.view(N, heads, -1)) / (q.shape[0] // heads) ** 0.5
                    h[row, slot] = gen.out(torch.einsum("hn,nhd->hd", scores.softmax(-1), v.view(N, heads, -1)).reshape(-1))
            h = block(h, attention_mask=additive_mask(hidden_slot if i < layer else keep), position_ids=positions,
                      position_embeddings=rotary)
        expected = ref.lm_head(ref.model.norm(h))[:, text0:]
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=2e-5, rtol=1e-4)
    assert isinstance(gen.query_norm, torch.nn.Identity)


def test_lavin_das_replacement_equals_the_official_formula():
    """LaVIN-DAS (DoubtedSteam/DAS, LaVIN-DAS/das/mm_adapter.py): a skipped block becomes
    x + RepAdapter_Router(attention_norm x, res=False), hidden 4 x 8, routed by the modality token."""
    from memvp_ds.model.layer_skip import RoutedReplacement

    cfg = tiny_config("lavin", "model.lavin.dropout=0.0", "model.skip.layers=[0]", "model.skip.adapter_dim=null")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    randomise_trainable(model)
    replacement = model.llm.model.layers[0].adapter
    assert isinstance(replacement, RoutedReplacement) and replacement.adapter.down.out_features == 32
    g = torch.Generator().manual_seed(0)
    ids, feats = torch.randint(4, 512, (B, T), generator=g), torch.randn(B, N, C, generator=g)
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        ours = model(ids, image_features=feats, has_image=has_image).logits
    reference = _official_logits(cfg, model.strategy, ids, feats, has_image, {0: replacement.adapter})
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
