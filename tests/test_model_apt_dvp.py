"""APT and DVP against independent computations of their formulas on a plain HF model."""

import pytest
import torch
from torch.nn import functional as F

from memvp_ds.model.llm import load_frozen_llm
from tests.conftest import additive_mask, dvp_batch, randomise_trainable, tiny_config, tiny_model

N, C = 16, 32


def _plain_llm(strategy, *overrides):
    return load_frozen_llm(tiny_config(strategy, *overrides).model.llm).eval()


def _apt_hook(strategy, index, rows_of):
    """The paper's approximated attention for layer ``index``, written out; ``rows_of(prompts)`` -> P."""
    def hook(attention, args, kwargs, output):
        x, o = kwargs["hidden_states"], output[0]
        rows = rows_of(strategy.prompts.prompts[index])
        keys = rows + rows @ strategy.prompts.down[index] @ strategy.prompts.up[index]
        a = F.relu(x @ keys.transpose(-1, -2))
        e = a @ rows
        w = a.max(dim=-1, keepdim=True).values
        return ((o + w * e) * strategy.prompts.log_scale[index].exp(), *output[1:])
    return hook


def test_apt_sequence_equals_the_formula_with_the_image_in_the_sequence():
    """Official setup: visual tokens before the text, p learnable prompts approximated in every layer; a
    left-padded row and a row without an image (its visual tokens masked) in the same batch."""
    model = tiny_model("apt").eval()
    assert model.strategy.cfg.apt.visual == "sequence"  # the default
    randomise_trainable(model, std=0.1)
    ids, feats = torch.randint(4, 512, (3, 9)), torch.randn(3, N, C)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    has_image = torch.tensor([True, True, False])
    strategy = model.strategy
    with torch.no_grad():
        ours = model(ids, mask, image_features=feats, has_image=has_image).logits
        reference = _plain_llm("apt")
        embeds = torch.cat([strategy.projector(feats), reference.model.embed_tokens(ids)], dim=1)
        full_mask = torch.cat([has_image.long()[:, None].expand(-1, N), mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        for i, layer in enumerate(reference.model.layers):
            layer.self_attn.register_forward_hook(_apt_hook(strategy, i, lambda p: p), with_kwargs=True)
        expected = reference(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).logits[:, N:]
        plain = _plain_llm("apt")(input_ids=ids[2:]).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert ours.shape == (3, 9, 512)
    # The row without an image sees no visual token: only the prompts change it.
    assert not torch.allclose(ours[2], plain[0], atol=1e-3)


def test_apt_prompt_rows_equals_the_formula_recomputed_on_a_plain_llm():
    """This project's extension: no visual tokens in the sequence, P = [visual features; prompts]."""
    model = tiny_model("apt", "model.apt.visual=prompt_rows").eval()
    randomise_trainable(model, std=0.1)
    ids, feats = torch.randint(4, 512, (2, 9)), torch.randn(2, N, C)
    has_image = torch.tensor([True, False])
    strategy = model.strategy
    with torch.no_grad():
        ours = model(ids, image_features=feats, has_image=has_image).logits
        visual = strategy.projector(feats) * has_image.float()[:, None, None]
        reference = _plain_llm("apt")
        rows_of = lambda prompts: torch.cat([visual, prompts.expand(2, -1, -1)], dim=1)  # P = [Z; P_l]
        for i, layer in enumerate(reference.model.layers):
            layer.self_attn.register_forward_hook(_apt_hook(strategy, i, rows_of), with_kwargs=True)
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("visual", ["sequence", "prompt_rows"])
def test_apt_term_is_per_token_so_earlier_positions_ignore_later_tokens(visual):
    """Changing the last tokens changes nothing before them: no attention across tokens through the term."""
    model = tiny_model("apt", f"model.apt.visual={visual}").eval()
    randomise_trainable(model, std=0.1)
    ids, feats = torch.randint(4, 512, (1, 10)), torch.randn(1, N, C)
    changed = ids.clone()
    changed[0, 6:] = torch.randint(4, 512, (4,))
    with torch.no_grad():
        a, b = model(ids, image_features=feats).logits, model(changed, image_features=feats).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("visual", ["sequence", "prompt_rows"])
def test_apt_gradients_reach_every_trainable_tensor(visual):
    model = tiny_model("apt", f"model.apt.visual={visual}")
    randomise_trainable(model, std=0.1)
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
def test_dvp_residual_equals_the_formula_recomputed_on_a_plain_llm(layer):
    model = tiny_model("dvp", f"model.dvp.layer={layer}", "model.dvp.insert=residual", "model.dvp.adapters=false").eval()
    randomise_trainable(model)
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
    randomise_trainable(model)
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


def test_dvp_adapters_are_on_by_default_start_as_identity_and_train():
    model = tiny_model("dvp").eval()
    plain = _plain_llm("dvp")
    ids = torch.randint(4, 512, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert len(model.strategy.adapters) == 2
    names = [n for n in model.trainable_parameters() if ".adapters." in n]
    assert len(names) == 2 * 2 * 4  # layers x (attn, mlp) x (down, up) x (weight, bias)


# -- DVP as a token (the default) -------------------------------------------------------------------------

THREE_LAYERS = "model.llm.config.num_hidden_layers=3"


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_dvp_token_equals_a_layer_by_layer_computation(layer):
    """The paper's method written out with the decoder blocks called one by one: a zero slot in front of
    the text, hidden from the other tokens below K by an explicit mask, overwritten at K with the
    cross-attention over the features queried by the mean prompt state, and visible from K on."""
    model = tiny_model("dvp", THREE_LAYERS, f"model.dvp.layer={layer}", "model.dvp.adapters=false").eval()
    randomise_trainable(model)
    ids, mask, labels, feats, has_image = dvp_batch()
    prompt_end = torch.tensor([4, 6, 5])
    gen = model.strategy.generators[str(layer)]
    with torch.no_grad():
        ours = model(ids, mask, labels=labels, image_features=feats, has_image=has_image).logits
        reference = _plain_llm("dvp", THREE_LAYERS)
        full_mask = torch.cat([has_image.long()[:, None], mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        keep = torch.ones(11, 11).tril().bool()[None, None] & full_mask.bool()[:, None, None, :]
        hidden_slot = keep.clone()
        hidden_slot[:, :, 1:, 0] = False
        h = torch.cat([torch.zeros(3, 1, 64), reference.model.embed_tokens(ids)], dim=1)
        rotary = reference.model.rotary_emb(h, positions)
        for i, block in enumerate(reference.model.layers):
            if i == layer:
                for row in (0, 1):
                    in_prompt = [j for j in range(10) if mask[row, j] and j <= prompt_end[row]]
                    query = h[row, [1 + j for j in in_prompt]].mean(0, keepdim=True)
                    h[row, 0] = _manual_cross_attention(gen, query, feats[row : row + 1])[0]
            h = block(h, attention_mask=additive_mask(hidden_slot if i < layer else keep), position_ids=positions,
                      position_embeddings=rotary)
        expected = reference.lm_head(reference.model.norm(h))[:, 1:]
        plain = reference(input_ids=ids[2:]).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2], plain[0], atol=1e-5, rtol=1e-5)  # no image: the frozen LLM


def _layer_outputs(model, ids, mask, feats, has_image):
    """Each decoder layer's output at the text positions (the slot dropped)."""
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[:, -ids.shape[1]:].clone()))
               for layer in model.llm.model.layers]
    with torch.no_grad():
        model(ids, mask, image_features=feats, has_image=has_image)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("layer", [1, 2])
def test_dvp_token_below_k_nothing_sees_the_image_from_k_on_every_later_token_does(layer):
    model = tiny_model("dvp", THREE_LAYERS, f"model.dvp.layer={layer}").eval()
    randomise_trainable(model)
    ids, mask, _, feats, _ = dvp_batch()
    has_image = torch.ones(3, dtype=torch.bool)
    a = _layer_outputs(model, ids, mask, feats, has_image)
    b = _layer_outputs(model, ids, mask, torch.randn(3, N, C), has_image)
    none = _layer_outputs(model, ids, mask, feats, torch.zeros(3, dtype=torch.bool))
    valid = mask.bool()
    for i in range(layer):  # below K: bit-identical for other images; without one only the positions shift
        torch.testing.assert_close(a[i], b[i], atol=0, rtol=0)
        torch.testing.assert_close(a[i][valid], none[i][valid], atol=1e-5, rtol=1e-5)
    for i in range(layer, 3):  # from K on, every text position, the first question token included
        changed = (a[i] - b[i]).abs().amax(-1)[valid]
        assert bool((changed > 1e-4).all()), f"layer {i}: {changed}"


def test_dvp_token_needs_a_backend_that_takes_a_4d_mask():
    from memvp_ds.config import ConfigError

    for backend in ("flash_attention_2", "flex_attention"):
        with pytest.raises(ConfigError, match=f"attn_implementation: {backend} cannot take the per-layer"):
            tiny_config("dvp", f"model.llm.attn_implementation={backend}")
    tiny_config("dvp", "model.llm.attn_implementation=flash_attention_2", "model.dvp.insert=residual")


def test_dvp_token_eager_equals_sdpa():
    """eager gets an additive float mask, sdpa a boolean one (or None without padding): same model."""
    ids, mask, labels, feats, has_image = dvp_batch()
    logits = []
    for backend in ("sdpa", "eager"):
        model = tiny_model("dvp", f"model.llm.attn_implementation={backend}").eval()
        randomise_trainable(model)
        with torch.no_grad():
            logits.append(model(ids, mask, labels=labels, image_features=feats, has_image=has_image).logits)
            logits.append(model(ids[:1], labels=labels[:1], image_features=feats[:1]).logits)  # no padding
    valid = mask.bool()
    torch.testing.assert_close(logits[0][valid], logits[2][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], logits[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1][0], logits[0][0], atol=1e-5, rtol=1e-5)
