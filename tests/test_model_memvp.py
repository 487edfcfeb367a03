"""MemVP against independent computations on the plain HF model."""

import pytest
import torch
from torch.nn import functional as F

from memvp_ds.model.llm import load_frozen_llm
from tests.conftest import randomise_trainable, tiny_config, tiny_model

B, T, N, C = 3, 9, 16, 32


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 512, (B, T), generator=g)
    feats = torch.randn(B, N, C, generator=g)
    return ids, feats


def _reference_logits(cfg, strategy, ids, feats, has_image):
    """The MemVP formula (Jie et al., ICML 2024; memvp_ds/model/strategies/memvp.py), applied with hooks to a separately built plain HF model."""
    llm = load_frozen_llm(cfg.model.llm)
    proj = strategy.projector
    z = F.linear(F.silu(F.linear(feats, proj.fc1.weight, proj.fc1.bias)), proj.fc2.weight, proj.fc2.bias)
    z = z * cfg.model.projector.output_scale
    z = z * has_image.float()[:, None, None]
    rows = cfg.model.memvp.memory_rows
    z = torch.cat([z, torch.zeros(B, rows - N, z.shape[-1])], dim=1)
    keys, values = z + strategy.memory.memory_keys, z + strategy.memory.memory_values
    s = cfg.model.memvp.memory_scale

    def hook(module, args, out):
        x = args[0]
        return out + s * torch.einsum("btm,bmd->btd", F.silu(torch.einsum("btd,bmd->btm", x, keys)), values)

    for layer in llm.model.layers:
        layer.mlp.register_forward_hook(hook)
    with torch.no_grad():
        return llm(input_ids=ids).logits


def test_text_only_logits_equal_frozen_llm_exactly_at_init():
    model = tiny_model("memvp").eval()
    plain = load_frozen_llm(tiny_config("memvp").model.llm).eval()
    ids, feats = _batch()
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
        assert torch.equal(model(ids).logits, reference)
        no_image = torch.zeros(B, dtype=torch.bool)
        assert torch.equal(model(ids, image_features=feats, has_image=no_image).logits, reference)


def test_images_change_logits_and_differ_between_images():
    model = tiny_model("memvp").eval()
    randomise_trainable(model, std=0.5)
    ids, feats = _batch()
    with torch.no_grad():
        text_only = model(ids).logits
        img_a = model(ids, image_features=feats).logits
        img_b = model(ids, image_features=torch.randn_like(feats)).logits
    assert not torch.allclose(img_a, text_only, atol=1e-4)
    assert not torch.allclose(img_a, img_b, atol=1e-4)


@pytest.mark.parametrize("mode", ["eval", "train_no_dropout"])
def test_matches_independent_formula(mode):
    cfg = tiny_config("memvp", "model.memvp.dropout=0.0")
    torch.manual_seed(0)
    from memvp_ds import build_model

    model = build_model(cfg.model)
    randomise_trainable(model, std=0.5)
    model.train(mode != "eval")
    ids, feats = _batch()
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        ours = model(ids, image_features=feats, has_image=has_image).logits
    reference = _reference_logits(cfg, model.strategy, ids, feats, has_image)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    model = tiny_model("memvp", "model.memvp.dropout=0.5")
    randomise_trainable(model, std=0.5)
    ids, feats = _batch()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids, image_features=feats).logits, model(ids, image_features=feats).logits)
        model.train()
        assert not torch.equal(model(ids, image_features=feats).logits, model(ids, image_features=feats).logits)


def test_trainable_set_is_exactly_projector_and_memory():
    model = tiny_model("memvp")
    names = set(model.trainable_state_dict())
    assert names == {
        "strategy.memory.memory_keys",
        "strategy.memory.memory_values",
        "strategy.projector.fc1.weight",
        "strategy.projector.fc1.bias",
        "strategy.projector.fc2.weight",
        "strategy.projector.fc2.bias",
    }
    assert not any(p.requires_grad for p in model.llm.parameters())
    keys, values = model.strategy.memory.memory_keys, model.strategy.memory.memory_values
    assert keys.shape == values.shape == (1, 24, 64)
    assert torch.count_nonzero(values) == 0 and 0.01 < keys.std() < 0.03


def test_more_visual_tokens_than_rows_is_an_error():
    model = tiny_model("memvp")
    with pytest.raises(ValueError, match="memory rows"):
        model(torch.ones(1, 4, dtype=torch.long), image_features=torch.randn(1, 30, C))


def _grads(model, ids, feats, labels):
    model.zero_grad(set_to_none=True)
    model(ids, image_features=feats, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.trainable_parameters().items()}


@pytest.mark.parametrize("strategy,overrides", [
    ("memvp", []), ("input_prefix", []), ("apt", []), ("apt", ["model.apt.visual=prompt_rows"]),
    ("dvp", ["model.dvp.layer=0"]), ("dvp", ["model.dvp.layer=1"]), ("dvp", ["model.dvp.insert=residual", "model.dvp.layer=0"]),
    ("memvp", ["model.skip.layers=[1]"]), ("lavin", []),
])
def test_gradients_reach_trainable_only_and_match_with_checkpointing(strategy, overrides):
    """Every strategy's hooks (and skipped layers' adapters) get the same gradients when blocks are
    recomputed in backward. DVP's prompt enters at layer 0 (token and residual) or, as a token at layer 1,
    reaches layer 0's checkpointed block through the mask that hides it there."""
    model = tiny_model(strategy, "model.memvp.dropout=0.0", "model.dvp.dropout=0.0", "model.lavin.dropout=0.0",
                       *overrides).train()
    if strategy != "input_prefix":
        randomise_trainable(model, std=0.5)  # zero-initialised output maps would leave their inputs without gradient
    ids, feats = _batch()
    labels = ids.clone()
    labels[:, :4] = -100
    plain = _grads(model, ids, feats, labels)
    assert all(torch.count_nonzero(g) > 0 for g in plain.values()), [n for n, g in plain.items() if not g.any()]
    assert all(p.grad is None for p in model.llm.parameters() if not p.requires_grad)
    model.enable_gradient_checkpointing()
    mlp_calls = []
    model.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    checkpointed = _grads(model, ids, feats, labels)
    # LaVIN's modality token runs every block once more, on its own (recomputed as well).
    passes = 2 if strategy == "lavin" else 1
    assert len(mlp_calls) == 2 * passes, "the block was not recomputed in backward: checkpointing is not active"
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_loss_is_mean_cross_entropy_over_labelled_positions():
    model = tiny_model("memvp").eval()
    ids, feats = _batch()
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]
    labels[2, 2:4] = ids[2, 2:4]
    out = model(ids, image_features=feats, labels=labels)
    picked = [(b, t) for b in range(B) for t in range(1, T) if labels[b, t] != -100]
    manual = torch.stack(
        [-torch.log_softmax(out.logits[b, t - 1], -1)[labels[b, t]] for b, t in picked]
    ).mean()
    torch.testing.assert_close(out.loss, manual)


def test_bf16_llm_with_fp32_trainable_under_autocast():
    model = tiny_model("memvp", "model.llm.dtype=bfloat16").train()
    assert model.llm.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters().values())
    ids, feats = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, image_features=feats, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters().values())
