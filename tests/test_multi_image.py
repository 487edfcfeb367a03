"""Multi-image samples (data.max_images, MemVP): data_prep stores one feature array per image, the encoder and
batches keep each image in its own slot, and MemVP's memory holds every image's rows apart; each checked
against per-image hand computations, with a text-only, a one-image and a three-image sample in one batch
(padded, packed, and in generation)."""

import json
import sys

import numpy as np
import pytest
import torch

from memvp_ds import ConfigError
from memvp_ds.data.collate import SampleEncoder, TokenizedSample, collate, pack
from memvp_ds.data.prompts import IGNORE_INDEX
from memvp_ds.data.shard_format import read_manifest, read_raw_samples, read_shard
from tests.conftest import TINY_VIT, tiny_config, tiny_model

N, C, K = 16, 32, 3
MULTI = ["data.max_images=3", "model.memvp.memory_rows=56"]  # 3 x 16 image rows + 8 free memory slots


def _png(path, seed):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def _extract(root, records, name):
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import LlavaSource
    from memvp_ds.vision.clip_features import FeatureRecipe

    (root / f"{name}.json").write_text(json.dumps(records))
    recipe = FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64)
    return run_extract(LlavaSource(str(root / f"{name}.json"), str(root)), recipe,
                       ExtractOptions(out_dir=str(root / name), samples_per_shard=10, num_workers=0, batch_size=2))


def _turns(question, answer="Red."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A text-only, a one-image and a three-image conversation through data_prep, and the same four images
    extracted alone as single-image samples (the per-image reference)."""
    root = tmp_path_factory.mktemp("multi")
    names = [_png(root / f"{i}.png", i) for i in range(4)]
    records = [{"id": "text", "conversations": _turns("What is red?")},
               {"id": "one", "image": names[0], "conversations": _turns("<image>\nWhat colour?")},
               {"id": "three", "image": names[1:], "conversations": _turns(
                   "<image> then <image>, and <image>: which is reddest?", "The second.")}]
    _extract(root, records, "shards")
    singles = [{"id": f"single{i}", "image": name, "conversations": _turns("<image>\nWhat colour?")}
               for i, name in enumerate(names)]
    _extract(root, singles, "singles")
    return root


def test_data_prep_stores_one_feature_array_per_image(extracted):
    from data_prep.verify import verify

    manifest = read_manifest(str(extracted / "shards"))
    assert manifest.max_images == 3 and verify(str(extracted / "shards")) == []
    [shard] = [str(extracted / "shards" / s.name) for s in manifest.shards]
    raw = {sample["__key__"]: sample for sample in read_raw_samples(shard)}
    assert set(raw["three"]) == {"__key__", "json", "npy", "1.npy", "2.npy"}
    assert set(raw["one"]) == {"__key__", "json", "npy"} and set(raw["text"]) == {"__key__", "json"}
    fields = json.loads(raw["three"]["json"])
    assert fields["image_count"] == 3 and "<image>" not in fields["conversations"][0]["value"]
    [single_shard] = [str(extracted / "singles" / s.name) for s in read_manifest(str(extracted / "singles")).shards]
    alone = {key: features for key, _, features in read_shard(single_shard)}
    stored = {key: features for key, _, features in read_shard(shard)}
    # each image's features are the ones it gets extracted alone (image 0 in the one-image sample, 1-3 in order)
    np.testing.assert_allclose(stored["one"], alone["single0"], atol=2e-3)
    expected = np.concatenate([alone[f"single{i}"] for i in (1, 2, 3)])
    np.testing.assert_allclose(stored["three"], expected, atol=2e-3)


def test_image_tags_must_match_the_images(tmp_path):
    from data_prep.sources import LlavaSource
    from data_prep.sources.records import AnnotationError

    (tmp_path / "a.json").write_text(json.dumps([{"id": "x", "image": ["a.png", "b.png"],
                                                  "conversations": _turns("<image> what?")}]))
    with pytest.raises(AnnotationError, match="'image' lists 2 images but the text has 1 <image> tags"):
        list(LlavaSource(str(tmp_path / "a.json"), str(tmp_path)).examples())
    from data_prep.sources import JsonlQASource

    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q", "image": ["a.png", "b.png"], "answer": "left",
                                                  "question": "Which is larger, <image> or <image>?"}) + "\n")
    [example] = list(JsonlQASource(str(tmp_path / "q.jsonl"), str(tmp_path)).examples())
    assert example.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert example.fields["question"] == "Which is larger, or ?"


def test_encoder_and_batches_keep_each_image_in_its_slot(extracted, tokenizer_dir):
    from memvp_ds.data.tokenizer import load_tokenizer

    [shard] = [str(extracted / "shards" / s.name) for s in read_manifest(str(extracted / "shards")).shards]
    encoder = SampleEncoder(load_tokenizer(tokenizer_dir), "conversation", 128, N, C, max_images=K)
    samples = {raw["__key__"]: encoder(raw) for raw in read_raw_samples(shard)}
    stored = {key: features for key, _, features in read_shard(shard)}
    assert samples["three"].features.shape == (K * N, C) and samples["text"].features is None
    ordered = [samples[key] for key in ("text", "one", "three")]
    for batch in (collate(ordered, 0, (N, C), max_images=K), pack(ordered, 0, (N, C), 128, max_images=K)):
        assert batch["image_features"].shape == (3, K * N, C)
        assert batch["has_image"].tolist() == [[False] * 3, [True, False, False], [True] * 3]
        assert not batch["image_features"][0].any() and not batch["image_features"][1, N:].any()
        np.testing.assert_array_equal(batch["image_features"][1, :N].numpy(), stored["one"])
        np.testing.assert_array_equal(batch["image_features"][2].numpy(), stored["three"])
    with pytest.raises(ValueError, match="3 images, data.max_images is 2"):
        SampleEncoder(load_tokenizer(tokenizer_dir), "conversation", 128, N, C, max_images=2)(
            next(raw for raw in read_raw_samples(shard) if raw["__key__"] == "three"))


def _model():
    model = tiny_model("memvp", "model.memvp.dropout=0.0", *MULTI)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every trainable tensor non-trivial (P2 starts at zero)
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _samples(images=(0, 1, 3)):
    g = np.random.default_rng(0)
    samples = []
    for index, count in enumerate(images):
        ids = [int(t) for t in g.integers(4, 512, 12 + 5 * index)]
        labels = [IGNORE_INDEX] * 6 + ids[6:]
        features = g.standard_normal((count * N, C)).astype(np.float16) if count else None
        samples.append(TokenizedSample(str(index), ids, labels, features, {}))
    return samples


def _run(model, batch):
    extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["image_features"].float(),
                 batch["has_image"], **extra)


def test_memory_holds_each_images_rows_apart():
    """K = Z + P1 with Z the projector applied to each image alone, stacked in order, zero for empty slots."""
    model, samples = _model(), _samples()
    batch = collate(samples, 3, (N, C), max_images=K)
    with torch.no_grad():
        _run(model, batch)
        keys = model.strategy._keys
        projector, p1 = model.strategy.projector, model.strategy.memory.memory_keys[0]
        rows = p1.shape[0]
        for b, sample in enumerate(samples):
            images = [] if sample.features is None else np.split(sample.features, len(sample.features) // N)
            z = torch.zeros(rows, p1.shape[1])
            for i, image in enumerate(images):  # one image at a time, into its own N rows
                z[i * N:(i + 1) * N] = projector(torch.from_numpy(image).float()[None])[0]
            torch.testing.assert_close(keys[b], z + p1, rtol=0, atol=1e-6)


def test_a_sample_computes_the_same_alone_padded_with_others_and_packed():
    model, samples = _model(), _samples()
    with torch.no_grad():
        alone = [_run(model, collate([s], 3, (N, C), max_images=K)) for s in samples]
        padded = _run(model, collate(samples, 3, (N, C), max_images=K))
        packed_batch = pack(samples, 3, (N, C), 128, max_images=K)
        packed = _run(model, packed_batch)
    assert packed_batch["input_ids"].shape[0] == 1  # all three share one row
    for b, sample in enumerate(samples):
        rows, cols = (packed_batch["segment_ids"] == b).nonzero(as_tuple=True)
        length = len(sample.input_ids)
        torch.testing.assert_close(padded.logits[b, :length], alone[b].logits[0, :length], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed.logits[rows, cols], alone[b].logits[0, :length], rtol=1e-4, atol=1e-5)
    # the images are told apart: swapping the three-image sample's first two images changes its output
    swapped = _samples()
    first, second = swapped[2].features[:N].copy(), swapped[2].features[N:2 * N].copy()
    swapped[2].features[:N], swapped[2].features[N:2 * N] = second, first
    with torch.no_grad():
        other = _run(model, collate([swapped[2]], 3, (N, C), max_images=K))
    assert not torch.allclose(other.logits, alone[2].logits, atol=1e-4)


def test_generation_of_a_mixed_batch_equals_each_sample_alone():
    model, samples = _model(), _samples()
    prompts = [TokenizedSample(s.key, s.input_ids[:6], [IGNORE_INDEX] * 6, s.features, {}) for s in samples]

    def generate(batch):
        return model.generate(batch["input_ids"], batch["attention_mask"], batch["image_features"].float(),
                              batch["has_image"], max_new_tokens=5, stop_when_done=False)

    together = generate(collate(prompts, 3, (N, C), left_pad=True, max_images=K))
    for b, prompt in enumerate(prompts):
        assert together[b].tolist() == generate(collate([prompt], 3, (N, C), left_pad=True, max_images=K))[0].tolist()


def test_config_rules():
    assert tiny_config("memvp", *MULTI).data.max_images == 3
    with pytest.raises(ConfigError, match=r"model.visual_tokens \(16\) x data.max_images \(3\) exceeds "
                                          r"model.memvp.memory_rows \(24\)"):
        tiny_config("memvp", "data.max_images=3")
    with pytest.raises(ConfigError, match="data.max_images=2: model.strategy=input_prefix takes one image per "
                                          "sample; multi-image samples need memvp"):
        tiny_config("input_prefix", "data.max_images=2")


def test_the_plan_refuses_shards_with_more_images_than_allowed(extracted, tokenizer_dir, tmp_path):
    from memvp_ds.engine.plan_report import dry_run_report

    overrides = [f"data.shards={extracted / 'shards'}", f"data.tokenizer={tokenizer_dir}",
                 "data.prompt_format=conversation",
                 f"train.output_dir={tmp_path / 'run'}", "train.micro_batch_size=1"]
    plan = dry_run_report(tiny_config("memvp", *MULTI, *overrides), 1)
    assert plan["train_samples"] == 3
    with pytest.raises(ConfigError, match="samples have up to 3 images but data.max_images is 1"):
        dry_run_report(tiny_config("memvp", *overrides), 1)


@pytest.mark.slow
def test_zero3_engine_gradients_on_a_mixed_batch_equal_plain_pytorch_bit_for_bit(extracted, tokenizer_dir, tmp_path):
    """A text-only, a one-image and a three-image sample in one packed micro-batch through a one-rank ZeRO-3
    engine (the real Trainer): the same loss and gradients as plain PyTorch, bit for bit (as
    tests/test_train.py checks for single-image batches)."""
    import subprocess

    from tests.helpers import REPO

    overrides = [*MULTI, "model.memvp.dropout=0.0", f"data.shards={extracted / 'shards'}",
                 f"data.tokenizer={tokenizer_dir}", "data.prompt_format=conversation", "data.num_workers=1",
                 "data.shuffle_buffer=1", "train.micro_batch_size=3", f"train.output_dir={tmp_path / 'run'}",
                 "train.ds_config=zero3"]
    script = f"""
import sys; sys.argv = ["x"]
import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from memvp_ds.schema import load_config
from memvp_ds.distributed import init_distributed
from memvp_ds.engine.trainer import Trainer
from memvp_ds.model import build_model
torch_linear = F.linear
cfg = load_config("tiny_memvp", {overrides!r})
trainer = Trainer(cfg, init_distributed())
torch.manual_seed(cfg.train.seed)  # the engine's model was built from the same seed
plain = build_model(cfg.model)
batch = trainer._to_device(next(iter(trainer._train_loader(0))))
assert sorted(batch["has_image"].sum(1).tolist()) == [0, 1, 3], batch["has_image"]
trainer.engine.train(), plain.train()
loss = trainer.engine(**batch).loss
trainer.engine.backward(loss)
zero3 = {{name: safe_get_full_grad(p).detach().clone() for name, p in trainer.model.trainable_parameters().items()}}
deepspeed_linear, F.linear = F.linear, torch_linear
params = plain.trainable_parameters()
reference = plain(**batch).loss
grads = dict(zip(params, torch.autograd.grad(reference, list(params.values()))))
F.linear = deepspeed_linear
assert torch.equal(loss.detach(), reference.detach()), (loss.item(), reference.item())
for name in grads:
    assert torch.equal(zero3[name], grads[name]), (name, (zero3[name] - grads[name]).abs().max().item())
print("EQUAL", len(grads))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "EQUAL 6" in proc.stdout, proc.stderr[-3000:]
