"""input_prefix against a manual inputs_embeds computation; generate against repeated full forwards."""

import pytest
import torch

from tests.conftest import randomise_trainable, tiny_model

N, C = 16, 32


def test_input_prefix_text_logits_equal_manual_inputs_embeds():
    model = tiny_model("input_prefix").eval()
    ids = torch.randint(4, 512, (2, 7))
    feats = torch.randn(2, N, C)
    with torch.no_grad():
        ours = model(ids, image_features=feats).logits
        visual = model.strategy.projector(feats)
        embeds = torch.cat([visual, model.llm.get_input_embeddings()(ids)], dim=1)
        manual = model.llm(inputs_embeds=embeds).logits[:, N:]
    assert ours.shape == (2, 7, 512)
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)


def test_input_prefix_text_only_row_equals_plain_llm():
    model = tiny_model("input_prefix").eval()
    ids = torch.randint(4, 512, (2, 7))
    with torch.no_grad():
        ours = model(ids, image_features=torch.randn(2, N, C), has_image=torch.tensor([False, True])).logits
        plain = model.llm(input_ids=ids).logits
    torch.testing.assert_close(ours[0], plain[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[1], plain[1], atol=1e-4)


def test_input_prefix_loss_ignores_visual_positions():
    model = tiny_model("input_prefix").eval()
    ids = torch.randint(4, 512, (2, 7))
    feats = torch.randn(2, N, C)
    out = model(ids, image_features=feats, labels=ids)
    logp = torch.log_softmax(out.logits[:, :-1], -1)
    manual = -logp.gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, manual)


def _greedy_by_full_forwards(model, ids, feats, has_image, steps):
    prompt_len, ids = len(ids), ids.clone()
    for _ in range(steps):
        # Labels mark where the prompt ends, as in training (DVP's query position is the last prompt token).
        labels = ids.clone()
        labels[:prompt_len] = -100
        logits = model(ids[None], labels=labels[None], image_features=feats[None], has_image=has_image[None]).logits
        ids = torch.cat([ids, logits[0, -1].argmax()[None]])
    return ids[-steps:]


@pytest.mark.parametrize("strategy,overrides", [
    ("memvp", []), ("input_prefix", []), ("apt", []), ("apt", ["model.apt.visual=prompt_rows"]),
    ("dvp", ["model.dvp.layer=0"]), ("dvp", ["model.dvp.layer=1"]), ("dvp", ["model.llm.attn_implementation=eager"]),
    ("dvp", ["model.dvp.insert=residual"]), ("memvp", ["model.skip.layers=[0]"]), ("apt", ["model.skip.layers=[1]"]),
    ("dvp", ["model.skip.layers=[0]"]), ("lavin", []), ("lavin", ["model.skip.layers=[0]"]),
    ("dvp", ["model.dvp.base=lavin", "model.dvp.layer=1"]),
])
def test_generate_matches_repeated_full_forwards(strategy, overrides):
    """The KV-cache decode of every strategy (and of skipped layers, whose cache slots are renumbered)
    reproduces greedy decoding by full forwards over the growing sequence. DVP's token: the slot's cache
    entries below K hold the masked placeholder, from K on the prompt; decoded tokens see it from K on."""
    model = tiny_model(strategy, *overrides).eval()
    randomise_trainable(model)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 512, (n,), generator=g) for n in (3, 8, 5)]
    feats = torch.randn(3, N, C, generator=g)
    has_image = torch.tensor([True, True, False])
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), 3)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    steps = 6
    with torch.no_grad():
        generated = model.generate(batch, mask, image_features=feats, has_image=has_image, max_new_tokens=steps)
        for row, prompt in enumerate(prompts):
            expected = _greedy_by_full_forwards(model, prompt, feats[row], has_image[row], steps)
            assert generated[row].tolist() == expected.tolist(), f"row {row}"


@pytest.mark.parametrize("overrides", [["model.dvp.layer=1"], ["model.dvp.layer=1", "model.llm.attn_implementation=eager"],
                                       ["model.dvp.layer=0"]])
def test_dvp_token_decode_logits_equal_one_full_forward(overrides):
    """Stricter than equal tokens: every decoded step's logits equal those of one full forward over the
    left-padded prompts plus the generated tokens. A decoded token that saw the slot below K (its cache
    entry there holds the placeholder's K/V) would differ."""
    model = tiny_model("dvp", *overrides).eval()
    randomise_trainable(model)
    g = torch.Generator().manual_seed(4)
    batch, feats = torch.randint(4, 512, (3, 8), generator=g), torch.randn(3, N, C, generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :5], mask[2, :2] = 0, 0
    has_image = torch.tensor([True, True, False])
    step_logits = []
    handle = model.llm.get_output_embeddings().register_forward_hook(lambda m, a, out: step_logits.append(out))
    with torch.no_grad():
        generated = model.generate(batch, mask, image_features=feats, has_image=has_image, max_new_tokens=4)
        handle.remove()
        ids = torch.cat([batch, generated], dim=1)
        labels = torch.cat([torch.full_like(batch, -100), generated], dim=1)
        full = model(ids, torch.cat([mask, torch.ones_like(generated)], dim=1), labels=labels,
                     image_features=feats, has_image=has_image).logits
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, 7 + step], atol=1e-5, rtol=1e-5)


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = tiny_model("memvp").eval()
    ids = torch.randint(4, 512, (2, 5))
    free = model.generate(ids, max_new_tokens=5)
    eos = int(free[0, 1])  # make row 0 "finish" at its second token
    out = model.generate(ids, max_new_tokens=5, eos_token_id=eos)
    assert out[0, :2].tolist() == free[0, :2].tolist() and set(out[0, 2:].tolist()) <= {eos}


def test_generate_rejects_right_padding():
    model = tiny_model("memvp").eval()
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.ones(1, 3, dtype=torch.long), mask)
