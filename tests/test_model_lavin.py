"""LaVIN against an independent computation of the official formulas on the plain HF model."""

import pytest
import torch
from torch.nn import functional as F

from memvp_ds.model.llm import load_frozen_llm
from tests.conftest import tiny_config, tiny_model

B, T, N, C = 3, 9, 16, 32


def _randomise_trainable(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


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


def _official_logits(cfg, strategy, ids, feats, has_image):
    """Per sample, LaVIN's sequence [modality token, visual tokens (image samples only), text] with the
    modality token masked from every later position, adapters on each block's attention input; the text's
    logits."""
    llm = load_frozen_llm(cfg.model.llm)
    llm.config._attn_implementation = "eager"
    for layer, adapter in zip(llm.model.layers, strategy.adapters):
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, a=adapter: (args, {**kwargs, "hidden_states": _official_adapter(
                a, kwargs["hidden_states"])}), with_kwargs=True)
    proj = strategy.projector
    visual = F.linear(F.silu(F.linear(feats, proj.fc1.weight, proj.fc1.bias)), proj.fc2.weight, proj.fc2.bias)
    visual = visual * cfg.model.projector.output_scale
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
    from memvp_ds import build_model

    model = build_model(cfg.model)
    _randomise_trainable(model)
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
