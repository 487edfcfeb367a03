"""APT and DVP against independent computations of their formulas on a plain HF model."""

import pytest
import torch
from torch.nn import functional as F

from memvp_ds.model.llm import load_frozen_llm
from tests.conftest import tiny_config, tiny_model

N, C = 16, 32


def _randomise_trainable(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _plain_llm(strategy, *overrides):
    return load_frozen_llm(tiny_config(strategy, *overrides).model.llm).eval()


def test_apt_equals_the_formula_recomputed_on_a_plain_llm():
    model = tiny_model("apt").eval()
    _randomise_trainable(model, std=0.1)
    ids, feats = torch.randint(4, 512, (2, 9)), torch.randn(2, N, C)
    has_image = torch.tensor([True, False])
    strategy = model.strategy
    with torch.no_grad():
        ours = model(ids, image_features=feats, has_image=has_image).logits
        visual = strategy.projector(feats) * has_image.float()[:, None, None]
        reference = _plain_llm("apt")

        def apt_term(index):
            def hook(attention, args, kwargs, output):
                x, o = kwargs["hidden_states"], output[0]
                rows = torch.cat([visual, strategy.prompts.prompts[index].expand(2, -1, -1)], dim=1)  # P = [Z; P_l]
                keys = rows + rows @ strategy.prompts.down[index] @ strategy.prompts.up[index]
                a = F.relu(x @ keys.transpose(1, 2))
                e = a @ rows
                w = a.max(dim=-1, keepdim=True).values
                return ((o + w * e) * strategy.prompts.log_scale[index].exp(), *output[1:])
            return hook

        for i, layer in enumerate(reference.model.layers):
            layer.self_attn.register_forward_hook(apt_term(i), with_kwargs=True)
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_apt_term_is_per_token_so_earlier_positions_ignore_later_tokens():
    """Changing the last tokens changes nothing before them: no attention across tokens through the term."""
    model = tiny_model("apt").eval()
    _randomise_trainable(model, std=0.1)
    ids, feats = torch.randint(4, 512, (1, 10)), torch.randn(1, N, C)
    changed = ids.clone()
    changed[0, 6:] = torch.randint(4, 512, (4,))
    with torch.no_grad():
        a, b = model(ids, image_features=feats).logits, model(changed, image_features=feats).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_apt_gradients_reach_every_trainable_tensor():
    model = tiny_model("apt")
    _randomise_trainable(model, std=0.1)
    ids = torch.randint(4, 512, (2, 8))
    model(ids, labels=ids, image_features=torch.randn(2, N, C)).loss.backward()
    for name, p in model.trainable_parameters().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _manual_cross_attention(gen, text_state, features):
    """Multi-head softmax attention written out: one query per sample over the N feature tokens."""
    q = gen.query(F.layer_norm(text_state, (text_state.shape[-1],), gen.query_norm.weight, gen.query_norm.bias))
    k, v = gen.key(features), gen.value(features)
    heads = gen.heads
    q = q.view(q.shape[0], heads, -1)
    k = k.view(k.shape[0], k.shape[1], heads, -1)
    v = v.view(v.shape[0], v.shape[1], heads, -1)
    weights = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) / q.shape[-1] ** 0.5, dim=-1)
    return gen.out(torch.einsum("bhn,bnhd->bhd", weights, v).reshape(q.shape[0], -1))


@pytest.mark.parametrize("layer", [0, 1])
def test_dvp_equals_the_formula_recomputed_on_a_plain_llm(layer):
    model = tiny_model("dvp", f"model.dvp.layer={layer}").eval()
    _randomise_trainable(model)
    ids, feats = torch.randint(4, 512, (2, 9)), torch.randn(2, N, C)
    labels = ids.clone()
    labels[0, :5], labels[1, :7] = -100, -100  # prompts end at positions 4 and 6
    prompt_end = torch.tensor([4, 6])
    has_image = torch.tensor([True, False])
    gen = model.strategy.generators[str(layer)]
    with torch.no_grad():
        ours = model(ids, labels=labels, image_features=feats, has_image=has_image).logits
        reference = _plain_llm("dvp")
        plain = reference(input_ids=ids).logits

        def insert(module, args, kwargs):
            hidden = args[0]
            prompt = _manual_cross_attention(gen, hidden[torch.arange(2), prompt_end], feats)
            prompt = prompt * has_image.float()[:, None]
            after = (torch.arange(9)[None] >= prompt_end[:, None]).float()[..., None]
            return (hidden + after * prompt[:, None], *args[1:]), kwargs

        reference.model.layers[layer].register_forward_pre_hook(insert, with_kwargs=True)
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # Before the query position nothing changes; a row without an image is the frozen LLM throughout.
    torch.testing.assert_close(ours[0, :4], plain[0, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1], plain[1], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[0, 4:], plain[0, 4:], atol=1e-4)


def test_dvp_search_model_has_a_generator_per_layer_and_switches_between_them():
    model = tiny_model("dvp", "model.dvp.layer=null", "train.mode=dvp_search", "data.val_shards=x").eval()
    strategy = model.strategy
    assert strategy.candidate_layers == [0, 1]
    _randomise_trainable(model)
    ids, feats = torch.randint(4, 512, (1, 8)), torch.randn(1, N, C)
    outputs = []
    for layer in (0, 1):
        strategy.set_active_layer(layer)
        model.zero_grad()
        out = model(ids, labels=ids, image_features=feats)
        out.loss.backward()
        outputs.append(out.logits.detach())
        unused = strategy.generators[str(1 - layer)]
        assert all(p.grad is None for p in unused.parameters()), "only the active layer's generator trains"
    assert not torch.allclose(outputs[0], outputs[1])
    with pytest.raises(ValueError, match="candidates"):
        strategy.set_active_layer(5)


def test_dvp_adapters_start_as_identity_and_train():
    model = tiny_model("dvp", "model.dvp.adapters=true").eval()
    plain = _plain_llm("dvp")
    ids = torch.randint(4, 512, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert len(model.strategy.adapters) == 2
    names = [n for n in model.trainable_parameters() if ".adapters." in n]
    assert len(names) == 2 * 2 * 4  # layers x (attn, mlp) x (down, up) x (weight, bias)
