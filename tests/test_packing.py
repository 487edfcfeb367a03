"""Sequence packing: the packed layout, every strategy's packed forward against the padded one, isolation of
the samples sharing a row, the config rule and the packed training loader."""

import numpy as np
import pytest
import torch

from memvp_ds.data.collate import TokenizedSample, collate, pack, pack_rows
from memvp_ds.data.prompts import IGNORE_INDEX
from memvp_ds.model.strategies import STRATEGIES
from tests.conftest import randomise_trainable, tiny_config, tiny_model

N, C, PAD = 16, 32, 3
# Sample 0 is the longest, so packing puts it first in its row, in front of samples it could leak into.
SHAPES = [(40, True), (9, False), (14, True), (30, True), (5, True), (21, False)]
# Every strategy and variant: the tiny models have 2 layers, so DVP's slot at layer 1 is hidden in layer 0.
STRATEGY_CASES = [("memvp", []), ("input_prefix", []), ("memvp", ["model.skip.layers=[0]"]),
                  ("apt", []), ("apt", ["model.apt.visual=prompt_rows"]),
                  ("dvp", []), ("dvp", ["model.dvp.insert=residual"]), ("lavin", []),
                  ("dvp", ["model.dvp.base=lavin"]), ("llava_lora", []),
                  ("memvp", ["model.lora.enabled=true", "model.lora.rank=4"])]
CASE_IDS = ["memvp", "input_prefix", "memvp_skip", "apt", "apt_rows", "dvp", "dvp_residual", "lavin", "dvp_lavin",
            "llava_lora", "memvp_lora"]
DVP_TOKEN = ("dvp", "dvp_lavin")


def _samples(seed=0, shapes=SHAPES):
    g = np.random.default_rng(seed)
    samples = []
    for index, (length, image) in enumerate(shapes):
        ids = [int(t) for t in g.integers(4, 512, length)]
        prompt = length // 2
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        features = g.standard_normal((N, C)).astype(np.float16) if image else None
        samples.append(TokenizedSample(str(index), ids, labels, features, {}))
    return samples


def _model(strategy, overrides, attn="sdpa"):
    model = tiny_model(strategy, "model.memvp.dropout=0.0", "model.dvp.dropout=0.0", "model.lavin.dropout=0.0",
                       "model.lora.dropout=0.0",
                       f"model.llm.attn_implementation={attn}", *overrides)
    randomise_trainable(model)
    return model


def _run(model, batch):
    extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["image_features"].float(),
                 batch["has_image"], **extra)


def _text_logits(out, batch, samples):
    """Each sample's logits at its text tokens, from a padded or a packed batch."""
    if "segment_ids" not in batch:
        return [out.logits[b, : len(s.input_ids)] for b, s in enumerate(samples)]
    logits = []
    for b, sample in enumerate(samples):
        rows, cols = (batch["segment_ids"] == b).nonzero(as_tuple=True)
        logits.append(out.logits[rows, cols][-len(sample.input_ids):])
    return logits


def _sample_losses(logits, samples):
    return torch.stack([torch.nn.functional.cross_entropy(l[:-1], torch.tensor(s.labels[1:]), ignore_index=IGNORE_INDEX)
                        for l, s in zip(logits, samples)])


# -- the layout ------------------------------------------------------------------------------------------------
def test_pack_rows_first_fit_longest_first():
    assert pack_rows([5, 9, 3, 7], capacity=12) == [[1, 2], [3, 0]]
    assert pack_rows([12, 12], capacity=12) == [[0], [1]]
    with pytest.raises(ValueError, match="13 positions does not fit a packed row of 12"):
        pack_rows([13], capacity=12)


def test_pack_lays_out_samples_with_reserved_visual_positions():
    samples = _samples()
    batch = pack(samples, PAD, (N, C), max_seq_len=64, pad_to_multiple=8, visual_positions=N)
    seg, ids, labels, mask = batch["segment_ids"], batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert seg.shape[1] % 8 == 0 and seg.shape[1] <= 64 + N
    assert seg.shape[0] < len(samples), "nothing was packed"
    assert sorted(set(seg[seg >= 0].tolist())) == list(range(len(samples)))
    for b, sample in enumerate(samples):
        rows, cols = (seg == b).nonzero(as_tuple=True)
        assert len(set(rows.tolist())) == 1 and (cols.diff() == 1).all(), "one contiguous span of one row"
        reserved = N if sample.features is not None else 0
        assert len(cols) == len(sample.input_ids) + reserved
        text = cols[reserved:]
        assert ids[rows[0], text].tolist() == sample.input_ids and labels[rows[0], text].tolist() == sample.labels
        assert (ids[rows[0], cols[:reserved]] == PAD).all() and (labels[rows[0], cols[:reserved]] == IGNORE_INDEX).all()
        assert mask[rows[0], cols].tolist() == [0] * reserved + [1] * len(sample.input_ids)
    assert (ids[seg < 0] == PAD).all() and (labels[seg < 0] == IGNORE_INDEX).all() and (mask[seg < 0] == 0).all()
    assert batch["has_image"].tolist() == [s.features is not None for s in samples]
    assert batch["keys"] == [s.key for s in samples]


# -- packed equals padded ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,overrides", STRATEGY_CASES, ids=CASE_IDS)
def test_packed_losses_logits_and_gradients_equal_padded(strategy, overrides):
    model = _model(strategy, overrides).train()
    samples = _samples()
    padded = collate(samples, PAD, (N, C))
    packed = pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=model.strategy.prefix_positions())
    assert packed["input_ids"].shape[0] < len(samples)
    results = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        out = _run(model, batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.trainable_parameters().items()}
        results.append((out.loss.detach(), _text_logits(out, batch, samples), grads))
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results
    for a, b in zip(logits_a, logits_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_sample_losses(logits_b, samples), _sample_losses(logits_a, samples), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("strategy", ["memvp", "input_prefix", "dvp"])
def test_packed_equals_padded_with_eager_attention(strategy):
    """The eager backend takes transformers' additive mask built from the same position-id resets (and DVP's
    hook hides its slots in that additive mask)."""
    model = _model(strategy, [], attn="eager").eval()
    samples = _samples()
    padded = collate(samples, PAD, (N, C))
    packed = pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=model.strategy.prefix_positions())
    with torch.no_grad():
        a, b = _run(model, padded), _run(model, packed)
    for x, y in zip(_text_logits(a, padded, samples), _text_logits(b, packed, samples)):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=0)


def test_first_token_of_a_sample_gets_no_loss_from_the_sample_before():
    """A sample whose very first token carries a label: unpadded, nothing predicts it; packed behind another
    sample, the other sample's last position must not be trained to predict it."""
    model = _model("memvp", []).eval()
    samples = _samples(shapes=[(20, True), (12, False)])
    samples[1].labels = list(samples[1].input_ids)
    padded, packed = collate(samples, PAD, (N, C)), pack(samples, PAD, (N, C), max_seq_len=64)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        torch.testing.assert_close(_run(model, packed).loss, _run(model, padded).loss, atol=1e-6, rtol=0)


# -- isolation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,overrides", STRATEGY_CASES, ids=CASE_IDS)
def test_changing_one_sample_leaves_the_others_in_its_row_bit_identical(strategy, overrides):
    model = _model(strategy, overrides).eval()
    samples = _samples()
    slots = model.strategy.prefix_positions()
    batch = pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=slots)
    row = int((batch["segment_ids"] == 0).nonzero()[0, 0])
    neighbours = sorted(set(batch["segment_ids"][row].tolist()) - {-1, 0})
    assert neighbours and int((batch["segment_ids"][row] == 0).nonzero()[0]) == 0, "sample 0 leads a shared row"
    changed = _samples()
    changed[0].input_ids = [(t * 7 + 1) % 500 + 4 for t in changed[0].input_ids]
    changed[0].features = (changed[0].features * -2).astype(np.float16)
    other = pack(changed, PAD, (N, C), max_seq_len=64, visual_positions=slots)
    assert torch.equal(other["segment_ids"], batch["segment_ids"])
    with torch.no_grad():
        before, after = _run(model, batch).logits, _run(model, other).logits
    own = batch["segment_ids"] == 0
    assert not torch.allclose(before[own], after[own]), "the change must matter to its own sample"
    for b in neighbours:
        at = batch["segment_ids"] == b
        assert torch.equal(before[at], after[at]), f"sample {b} saw sample 0"


# -- LM head ----------------------------------------------------------------------------------------------------
def test_lm_head_runs_only_at_labelled_positions_and_logits_stay_available():
    model = _model("memvp", []).eval()
    samples = _samples()
    batch = pack(samples, PAD, (N, C), max_seq_len=64)
    seen = []
    model.llm.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        out = _run(model, batch)
        assert seen == [sum(sum(label >= 0 for label in s.labels[1:]) for s in samples)]
        assert out.logits.shape == (*batch["input_ids"].shape, 512)  # on demand, at every position
        no_labels = model(batch["input_ids"], batch["attention_mask"], None, batch["image_features"].float(),
                          batch["has_image"], segment_ids=batch["segment_ids"])
    assert no_labels.loss is None and torch.equal(no_labels.logits, out.logits)


# -- config and loader ---------------------------------------------------------------------------------------------
def test_packing_is_on_by_default_for_every_strategy_and_can_be_turned_off():
    for strategy in STRATEGIES:
        assert tiny_config(strategy).data.packing is True
    assert tiny_config("memvp", "data.packing=false").data.packing is False


def test_dvp_slots_reserved_in_a_packed_row_hide_below_k_and_carry_the_prompt_from_k():
    """DVP's token in a packed row: below K no position reads a slot (each sample's layer-0 output at its text
    equals that of its text run alone, without a slot), and from K on each image sample's text reads its own
    slot, which holds its prompt, while text-only samples read nothing of it."""
    model = _model("dvp", []).eval()
    samples = _samples()
    batch = pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=1)
    slots = (batch["segment_ids"] >= 0) & (batch["attention_mask"] == 0)
    assert int(slots.sum()) == sum(s.features is not None for s in samples)
    outputs = {}
    for layer in range(2):
        model.llm.model.layers[layer].register_forward_hook(
            lambda m, a, out, layer=layer: outputs.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        _run(model, batch)
        first = {k: v.clone() for k, v in outputs.items()}
        for b, sample in enumerate(samples):
            model(torch.tensor([sample.input_ids]))
            rows, cols = (batch["segment_ids"] == b).nonzero(as_tuple=True)
            torch.testing.assert_close(first[0][rows, cols][-len(sample.input_ids):], outputs[0][0],
                                       atol=1e-5, rtol=1e-5, msg=f"sample {b} read a slot below K")
        _run(model, dict(batch, image_features=batch["image_features"] * -3))
    text = (batch["segment_ids"] >= 0) & ~slots
    image_text = text & batch["has_image"][batch["segment_ids"].clamp(min=0)]
    changed = (first[1] - outputs[1]).abs().amax(-1) > 1e-6
    assert changed[image_text].all(), "from K every text position of an image sample reads its prompt"
    assert not changed[text & ~image_text].any(), "a text-only sample read another sample's slot"


def test_packed_loader_yields_the_same_samples_as_the_padded_one(dataset):
    """Packing changes the layout, never which samples a micro-batch holds: steps and epochs count samples."""
    from memvp_ds.data.collate import SampleEncoder
    from memvp_ds.data.shard_format import shard_urls
    from memvp_ds.data.stream import LoaderOptions, build_train_loader
    from memvp_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(dataset["tokenizer"])
    encoder = SampleEncoder(tokenizer, "qcm_a", 128, N, C)
    loaders = [build_train_loader(shard_urls(dataset["train"]), encoder,
                                  LoaderOptions(8, tokenizer.pad_token_id, 8, 0, 0, 1, 0, 64, {}, packing=packing,
                                                visual_positions=N)) for packing in (False, True)]
    rows = 0
    for _, padded, packed in zip(range(6), *(iter(loader) for loader in loaders)):
        assert packed["keys"] == padded["keys"] and len(packed["keys"]) == 8
        assert torch.equal(packed["has_image"], padded["has_image"])
        assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
        rows += packed["input_ids"].shape[0]
    assert rows < 6 * 8, "samples were packed into fewer rows"


def test_trainer_counts_the_positions_a_strategy_computes_for_mfu():
    """MFU counts processed positions: a padded row also computes the strategy's prefix (input_prefix's N
    visual tokens) inside the model; a packed row already holds the reserved positions."""
    from memvp_ds.engine.trainer import _Window

    samples = _samples()
    padded = dict(collate(samples, PAD, (N, C)), skipped_samples=0)
    packed = dict(pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=N), skipped_samples=0)
    window = _Window()
    window.add_micro_batch(1.0, padded, prefix_positions=N)
    rows, length = padded["input_ids"].shape
    assert window.positions == rows * (length + N)
    window.add_micro_batch(1.0, packed, prefix_positions=N)
    assert window.positions == rows * (length + N) + packed["input_ids"].numel()
    text = sum(len(s.input_ids) for s in samples)
    assert (window.samples, window.tokens) == (2 * len(samples), 2 * text)


@pytest.mark.parametrize("strategy,overrides", [c for c, i in zip(STRATEGY_CASES, CASE_IDS) if i not in DVP_TOKEN],
                         ids=[i for i in CASE_IDS if i not in DVP_TOKEN])  # DVP's token refuses flash attention
def test_rows_flattened_as_flash_attention_runs_them_equal_padded(strategy, overrides, monkeypatch):
    """flash attention runs packed rows flattened into one (1, R*L) sequence; on CPU sdpa takes the same
    flattened layout (position-id resets within one row), so every strategy's packed path is checked in it."""
    from memvp_ds.model import vlm

    model = _model(strategy, overrides).eval()
    samples = _samples()
    padded = collate(samples, PAD, (N, C))
    packed = pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=model.strategy.prefix_positions())
    assert packed["input_ids"].shape[0] > 1
    monkeypatch.setattr(vlm, "_is_flash_attention", lambda llm: True)
    with torch.no_grad():
        a, b = _run(model, padded), _run(model, packed)
    for x, y in zip(_text_logits(a, padded, samples), _text_logits(b, packed, samples)):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=0)
