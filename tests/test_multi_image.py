"""Multi-image samples (data.max_images): data_prep stores one feature array per image (and keeps the tags that
say where each goes), the encoder and batches keep each image in its own slot, MemVP's memory holds every
image's rows apart, and the strategies that put visual tokens in the sequence put each image's at its tag;
each checked against per-image hand computations, with a text-only, a one-image and a three-image sample in
one batch (padded, packed, and in generation)."""

import json

import numpy as np
import pytest
import torch

from memvp_ds import ConfigError, build_model
from memvp_ds.data.collate import SampleEncoder, TokenizedSample, collate, pack
from memvp_ds.data.prompts import IGNORE_INDEX, IMAGE_MARK
from memvp_ds.data.shard_format import read_manifest, read_raw_samples, read_shard
from tests.conftest import TINY_VIT, randomise_trainable, tiny_config, tiny_model

N, C, K = 16, 32, 3
MULTI = ["data.max_images=3", "model.memvp.memory_rows=56"]  # 3 x 16 image rows + 8 free memory slots


def _png(path, seed):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def _extract(root, records, name, store="features"):
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import LlavaSource
    from memvp_ds.vision.clip_features import FeatureRecipe

    (root / f"{name}.json").write_text(json.dumps(records))
    recipe = FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64)
    return run_extract(LlavaSource(str(root / f"{name}.json"), str(root)), recipe,
                       ExtractOptions(out_dir=str(root / name), samples_per_shard=10, num_workers=0, batch_size=2,
                                      store=store))


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
    _extract(root, records, "shards", store="both")  # features, and each image's pixels for the online tower
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
    assert set(raw["three"]) == {"__key__", "json", "npy", "1.npy", "2.npy", "png", "1.png", "2.png"}
    assert set(raw["one"]) == {"__key__", "json", "npy", "png"} and set(raw["text"]) == {"__key__", "json"}
    fields = json.loads(raw["three"]["json"])
    # a multi-image sample keeps its tags (where each image goes), a one-image sample's text loses its tag
    assert fields["image_count"] == 3 and fields["conversations"][0]["value"].count("<image>") == 3
    assert json.loads(raw["one"]["json"])["conversations"][0]["value"] == "What colour?"
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
    (tmp_path / "a.json").write_text(json.dumps([{"id": "x", "image": ["a.png", "b.png"],
                                                  "conversations": _turns("<image> what?", "<image> this")}]))
    with pytest.raises(AnnotationError, match="an <image> tag in an answer; images go in the human turns"):
        list(LlavaSource(str(tmp_path / "a.json"), str(tmp_path)).examples())
    from data_prep.sources import JsonlQASource

    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q", "image": ["a.png", "b.png"], "answer": "left",
                                                  "question": "Which is larger, <image> or <image>?"}) + "\n")
    with open(tmp_path / "q.jsonl", "a") as f:
        f.write(json.dumps({"id": "one", "image": "a.png", "answer": "red", "question": "<image>\nWhat colour?"}) + "\n")
    several, one = list(JsonlQASource(str(tmp_path / "q.jsonl"), str(tmp_path)).examples())
    assert several.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert several.fields["question"] == "Which is larger, <image> or <image>?"  # which image goes where
    assert one.fields["question"] == "What colour?"  # one image goes in front: its tag is not text


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


IN_TEXT = ["input_prefix", "llava_lora", "lavin", "apt"]
"""The strategies with visual positions in the sequence (prefix_positions N)."""
STRATEGY_CASES = {"memvp": ("memvp", *MULTI), **{name: (name,) for name in IN_TEXT},
                  "apt_prompt_rows": ("apt", "model.apt.visual=prompt_rows")}
"""Every strategy that takes several images per sample: MemVP and APT's prompt rows hold them as rows, the
others in the sequence at their tags."""


def _multi_image_model(case, max_images=K):
    """The tiny model of ``case``, every trainable tensor non-trivial (zero-initialised ones included)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(*STRATEGY_CASES[case], f"data.max_images={max_images}").model)
    randomise_trainable(model)
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
    model, samples = _multi_image_model("memvp"), _samples()
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


def test_config_rules():
    assert tiny_config("memvp", *MULTI).data.max_images == 3
    with pytest.raises(ConfigError, match=r"model.visual_tokens \(16\) x data.max_images \(3\) exceeds "
                                          r"model.memvp.memory_rows \(24\)"):
        tiny_config("memvp", "data.max_images=3")
    with pytest.raises(ConfigError, match="data.max_images=2: model.strategy=dvp takes one image per sample; "
                                          "multi-image samples need memvp, input_prefix, apt, lavin, llava_lora"):
        tiny_config("dvp", "data.max_images=2")


def test_the_plan_refuses_too_many_images_and_shows_where_they_go(extracted, tokenizer_dir, tmp_path):
    from memvp_ds.data.collate import build_encoder
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.engine.plan_report import _training_example, dry_run_report

    overrides = [f"data.shards={extracted / 'shards'}", f"data.tokenizer={tokenizer_dir}",
                 "data.prompt_format=conversation",
                 f"train.output_dir={tmp_path / 'run'}", "train.micro_batch_size=1"]
    plan = dry_run_report(tiny_config("memvp", *MULTI, *overrides), 1)
    assert plan["train_samples"] == 3 and "images_at" not in plan["example"]
    # an input-space strategy's plan encodes with the images' positions and shows where they start (not as text)
    cfg = tiny_config("input_prefix", f"data.max_images={K}", *overrides)
    assert dry_run_report(cfg, 1)["example"]["prompt"] == plan["example"]["prompt"]
    [shard] = [str(extracted / "shards" / s.name) for s in read_manifest(str(extracted / "shards")).shards]
    three = next(raw for raw in read_raw_samples(shard) if raw["__key__"] == "three")
    tok = load_tokenizer(tokenizer_dir)
    shown = _training_example(build_encoder(cfg, tok, visual_positions=N), three)
    alone = _training_example(build_encoder(cfg, tok), three)
    assert shown["prompt"] == alone["prompt"] and IMAGE_MARK not in shown["prompt"] and "images_at" not in alone
    placed = build_encoder(cfg, tok, visual_positions=N)(three).input_ids
    assert shown["images_at"] == [placed.index(-1 - j * N) for j in range(K)]
    with pytest.raises(ConfigError, match="samples have up to 3 images but data.max_images is 1"):
        dry_run_report(tiny_config("memvp", *overrides), 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [("memvp", [*MULTI, "model.memvp.dropout=0.0"]),
                                              ("lavin", [f"data.max_images={K}", "model.lavin.dropout=0.0"])],
                         ids=["memvp", "lavin"])
def test_zero3_engine_gradients_on_a_mixed_batch_equal_plain_pytorch_bit_for_bit(extracted, tokenizer_dir, tmp_path,
                                                                                  strategy, options):
    """A text-only, a one-image and a three-image sample in one packed micro-batch of the real Trainer's loader
    through a one-rank ZeRO-3 engine: the same loss and gradients as plain PyTorch, bit for bit (as
    tests/test_train.py checks for single-image batches). MemVP holds the images in its memory; LaVIN's tokens
    sit at the tags, where the trainer's encoder put their positions."""
    from tests.helpers import assert_zero3_gradients_equal_plain_pytorch

    overrides = [*options, f"data.shards={extracted / 'shards'}", f"data.tokenizer={tokenizer_dir}",
                 "data.prompt_format=conversation", "data.num_workers=1", "data.shuffle_buffer=1",
                 "train.micro_batch_size=3", f"train.output_dir={tmp_path / 'run'}", "train.ds_config=zero3"]
    trainable = len(tiny_model(strategy, *options).trainable_parameters())
    in_text = "" if strategy == "memvp" else f"assert int((batch['input_ids'] < 0).sum()) == 4 * {N}, batch['input_ids']"
    assert_zero3_gradients_equal_plain_pytorch(
        f"tiny_{strategy}", overrides, trainable,
        batch_check=f"assert sorted(batch['has_image'].sum(1).tolist()) == [0, 1, 3], batch['has_image']\n{in_text}")


# -- each image's tokens at its tag: input_prefix, llava_lora, lavin, apt ------------------------------------------


def _conversation(text, answer="The circle."):
    return {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}


def test_image_positions_are_the_tokens_of_the_text_before_each_tag(tokenizer_dir):
    from memvp_ds.data.prompts import bos_ids, encode_prompt
    from memvp_ds.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    head = len(bos_ids(tok))
    tagged = _conversation("The circle <image> and the square <image>\nWhich is red?")
    plain = _conversation("The circle and the square Which is red?")
    encoded = encode_prompt(tok, tagged, "conversation", 512)
    stripped = encode_prompt(tok, plain, "conversation", 512)
    assert (encoded.input_ids, encoded.labels) == (stripped.input_ids, stripped.labels)  # the tags leave no text
    expected = [head + len(tok.encode(prefix, add_special_tokens=False))
                for prefix in ("USER: The circle", "USER: The circle and the square")]
    assert encoded.image_positions == expected and stripped.image_positions == []
    # truncation drops the oldest context: a tag inside it goes where the kept context starts
    cut = encode_prompt(tok, tagged, "conversation", len(encoded.input_ids) - expected[0] + head)
    overflow = len(encoded.input_ids) - len(cut.input_ids)
    assert cut.image_positions == [head, expected[1] - overflow]
    # QA questions and evaluation prompts (no answer) keep their tags' positions too
    qa = encode_prompt(tok, {"question": "Left <image> or right <image>?", "answer": "left"}, "qa", 512, False)
    assert qa.image_positions == [head + len(tok.encode(p, add_special_tokens=False))
                                  for p in ("Question: Left", "Question: Left or right")]


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_chat_template_image_positions(style, tmp_path):
    from memvp_ds.data.prompts import encode_prompt
    from memvp_ds.data.tokenizer import load_tokenizer
    from tests.chat_tokenizers import chat_tokenizer

    tok = load_tokenizer(chat_tokenizer(str(tmp_path), style))
    encoded = encode_prompt(tok, _conversation("<image>\nWhat colour is the circle?", "It is red."),
                            "chat_template", 512)
    # the template's own rendering of the text without the tag; the image precedes the content's first token
    text = tok.apply_chat_template([{"role": "user", "content": "What colour is the circle?"},
                                    {"role": "assistant", "content": "It is red."}], tokenize=False)
    assert encoded.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    content = text.index("What colour")
    assert encoded.image_positions == [len(tok(text[:content], add_special_tokens=False)["input_ids"])]


def test_the_encoder_puts_each_images_positions_at_its_tag(extracted, tokenizer_dir):
    from memvp_ds.data.prompts import bos_ids
    from memvp_ds.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    [shard] = [str(extracted / "shards" / s.name) for s in read_manifest(str(extracted / "shards")).shards]
    raws = {raw["__key__"]: raw for raw in read_raw_samples(shard)}
    memory = SampleEncoder(tok, "conversation", 128, N, C, max_images=K)  # MemVP's: nothing in the text
    in_text = SampleEncoder(tok, "conversation", 128, N, C, max_images=K, visual_positions=N)
    assert (memory.max_positions, in_text.max_positions) == (128, 128 + K * N)
    for key in ("text", "one", "three"):
        alone, placed = memory(raws[key]), in_text(raws[key])
        text_positions = [i for i, t in enumerate(placed.input_ids) if t >= 0]
        assert [placed.input_ids[i] for i in text_positions] == alone.input_ids
        assert [placed.labels[i] for i in text_positions] == alone.labels
        markers = [i for i, t in enumerate(placed.input_ids) if t < 0]
        images = 0 if alone.features is None else len(alone.features) // N
        assert [placed.input_ids[i] for i in markers] == [-1 - r for r in range(images * N)]
        assert all(placed.labels[i] == IGNORE_INDEX for i in markers)
        if key == "one":  # stored without its tag: in front, before BOS (where one image always goes)
            assert markers == list(range(N))
    # "<image> then <image>, and <image>: which is reddest?": each block where the text before its tag ends
    placed = in_text(raws["three"])
    starts = [i for i, t in enumerate(placed.input_ids) if t < 0 and -1 - t in (0, N, 2 * N)]
    head = len(bos_ids(tok))
    assert starts == [head + len(tok.encode(prefix, add_special_tokens=False)) + j * N
                      for j, prefix in enumerate(["USER:", "USER: then", "USER: then , and"])]
    wrong = dict(raws["three"], json=raws["three"]["json"].replace(b"<image>, and", b", and"))
    with pytest.raises(ValueError, match="sample three: 3 images but 2 <image> tags in its text"):
        in_text(wrong)
    assert memory(wrong).features.shape == (K * N, C)  # MemVP reads no tags


TAGS = {0: [], 1: [0], 3: [2, 7, 7]}
"""Text positions each image precedes: the one-image sample's in front, two of the three-image one's adjacent."""


def _tagged_samples(positions_per_image):
    """A text-only, a one-image and a three-image sample with their visual positions placed by hand."""
    samples = []
    for sample in _samples():
        count = 0 if sample.features is None else len(sample.features) // N
        ids, labels = list(sample.input_ids), list(sample.labels)
        for image, position in reversed(list(enumerate(TAGS[count]))):
            ids[position:position] = [-1 - (image * N + t) for t in range(positions_per_image)]
            labels[position:position] = [IGNORE_INDEX] * positions_per_image
        samples.append(TokenizedSample(sample.key, ids, labels, sample.features, {}))
    return samples


def _visual_positions(model):
    return model.strategy.prefix_positions()


def test_each_images_tokens_are_the_projection_of_that_image_at_its_tag():
    """The inputs the strategy hands the decoder: the text's embeddings, and at image j's N positions the
    projector applied to image j alone; then the whole forward against the frozen LLM run by hand on them."""
    model = _multi_image_model("input_prefix")
    samples = _tagged_samples(N)
    batch = collate(samples, 3, (N, C), max_images=K)
    embed, projector = model.llm.get_input_embeddings(), model.strategy.projector
    with torch.no_grad():
        inputs = model.strategy(batch["input_ids"], batch["attention_mask"], batch["image_features"].float(),
                                batch["has_image"], None)
        out = _run(model, batch)
        for b, sample in enumerate(samples):
            pieces, done = [], 0
            original = _samples()[b].input_ids
            images = [] if sample.features is None else np.split(sample.features, len(sample.features) // N)
            for image, position in zip(images, TAGS[len(images)]):
                pieces += [embed(torch.tensor(original[done:position], dtype=torch.long)),
                           projector(torch.from_numpy(image).float()[None])[0]]
                done = position
            expected = torch.cat([*pieces, embed(torch.tensor(original[done:]))])
            length = len(sample.input_ids)
            torch.testing.assert_close(inputs.inputs_embeds[b, :length], expected, rtol=0, atol=0)
            hidden = model.llm.base_model(inputs_embeds=expected[None],
                                          position_ids=torch.arange(length)[None]).last_hidden_state
            torch.testing.assert_close(out.logits[b, :length], model.llm.lm_head(hidden)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_a_sample_computes_the_same_alone_padded_with_others_and_packed(case):
    model = _multi_image_model(case)
    samples = _tagged_samples(_visual_positions(model))
    with torch.no_grad():
        alone = [_run(model, collate([s], 3, (N, C), max_images=K)) for s in samples]
        padded = _run(model, collate(samples, 3, (N, C), max_images=K))
        packed_batch = pack(samples, 3, (N, C), 128, 8, _visual_positions(model), max_images=K)
        packed = _run(model, packed_batch)
    assert packed_batch["input_ids"].shape[0] == 1  # all three share one row
    for b, sample in enumerate(samples):
        rows, cols = (packed_batch["segment_ids"] == b).nonzero(as_tuple=True)
        length = len(sample.input_ids)
        torch.testing.assert_close(padded.logits[b, :length], alone[b].logits[0, :length], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed.logits[rows, cols], alone[b].logits[0, :length], rtol=1e-4, atol=1e-5)
    # the images are told apart: swapping the three-image sample's first two images changes its output. APT's
    # prompt rows are a set (each row's term is a sum over rows): there the order of the images is not seen.
    swapped = _tagged_samples(_visual_positions(model))[2]
    first, second = swapped.features[:N].copy(), swapped.features[N:2 * N].copy()
    swapped.features[:N], swapped.features[N:2 * N] = second, first
    with torch.no_grad():
        other = _run(model, collate([swapped], 3, (N, C), max_images=K))
    assert torch.allclose(other.logits, alone[2].logits, atol=1e-4) == (case == "apt_prompt_rows")


@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_one_image_in_front_computes_what_a_single_image_run_computes(case):
    """A one-image sample without a tag in a three-image batch layout: the same logits as the single-image
    path (the strategy's own prefix, checked against the official code elsewhere), for the same weights."""
    multi, single = _multi_image_model(case), _multi_image_model(case, max_images=1)
    single.load_state_dict(multi.state_dict())
    sample = _samples()[1]
    [placed] = [s for s in _tagged_samples(_visual_positions(multi)) if s.key == sample.key]
    with torch.no_grad():
        reference = _run(single, collate([sample], 3, (N, C)))
        result = _run(multi, collate([placed], 3, (N, C), max_images=K))
    offset = _visual_positions(multi)  # the single-image path returns text positions only
    torch.testing.assert_close(result.logits[0, offset:], reference.logits[0], rtol=1e-4, atol=1e-5)
    assert result.loss is not None and torch.allclose(result.loss, reference.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(STRATEGY_CASES))
def test_generation_of_a_mixed_batch_equals_each_sample_alone(case):
    model = _multi_image_model(case)
    prompts = [TokenizedSample(s.key, s.input_ids[:-4], [IGNORE_INDEX] * (len(s.input_ids) - 4), s.features, {})
               for s in _tagged_samples(_visual_positions(model))]

    def generate(batch):
        return model.generate(batch["input_ids"], batch["attention_mask"], batch["image_features"].float(),
                              batch["has_image"], max_new_tokens=5, stop_when_done=False)

    together = generate(collate(prompts, 3, (N, C), left_pad=True, max_images=K))
    for b, prompt in enumerate(prompts):
        assert together[b].tolist() == generate(collate([prompt], 3, (N, C), left_pad=True, max_images=K))[0].tolist()


def test_the_memory_plan_counts_every_images_positions():
    from memvp_ds.engine.memory_plan import micro_batch, model_shape

    for strategy, in_sequence in (("input_prefix", K * N), ("memvp", 0)):
        cfg = tiny_config(strategy, f"data.max_images={K}", "model.memvp.memory_rows=56", "train.micro_batch_size=2")
        batch = micro_batch(cfg, model_shape(cfg.model))
        assert batch.positions == 2 * (cfg.data.max_seq_len + in_sequence) and batch.visual_tokens == K * N


def test_a_batch_encoded_without_the_images_positions_is_refused():
    model = _multi_image_model("input_prefix")
    batch = collate(_samples(), 3, (N, C), max_images=K)  # MemVP's encoding: no positions in the text
    with pytest.raises(ValueError, match="a multi-image batch whose text lacks its images' positions"):
        _run(model, batch)


def test_evaluation_encodes_the_images_positions(extracted, tokenizer_dir, tmp_path):
    """evaluate_split on the data_prep shards: each record's answer is what the model generates for that
    sample encoded with its images at their tags."""
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.evaluation.run import evaluate_split

    cfg = tiny_config("input_prefix", f"data.max_images={K}", "data.prompt_format=conversation",
                      "eval.max_new_tokens=4", "eval.batch_size=2")
    model, tok = _multi_image_model("input_prefix"), load_tokenizer(tokenizer_dir)
    [shard] = [str(extracted / "shards" / s.name) for s in read_manifest(str(extracted / "shards")).shards]
    records, _ = evaluate_split(cfg, model, tok, [shard], 0, 1)
    encoder = SampleEncoder(tok, "conversation", cfg.data.max_seq_len, N, C, with_target=False, max_images=K,
                            visual_positions=N)
    for raw in read_raw_samples(shard):
        batch = collate([encoder(raw)], tok.pad_token_id, (N, C), left_pad=True, max_images=K)
        ids = model.generate(batch["input_ids"], batch["attention_mask"], batch["image_features"].float(),
                             batch["has_image"], max_new_tokens=4, eos_token_id=tok.eos_token_id)[0]
        [record] = [r for r in records if r["id"] == raw["__key__"]]
        assert record["output"] == tok.decode([t for t in ids.tolist() if t != tok.eos_token_id],
                                              skip_special_tokens=True)
        assert "\ue000" not in record["prompt"] and "<image>" not in record["prompt"]
    assert len(records) == 3


# -- the online vision tower -----------------------------------------------------------------------------------------

ONLINE = ["model.vision.online=true", f"model.vision.recipe.model={TINY_VIT}", "model.vision.recipe.pretrained=random",
          "model.vision.recipe.image_size=64"]


def test_online_tower_sees_each_image_alone(extracted, tokenizer_dir):
    """Pixels of every image (one .png member each) through the online tower: at initialisation (fc2 = 0) each
    slot's features are that image's stored ones; then a multi-image model trains on pixels as on features."""
    from memvp_ds.data.collate import build_encoder
    from memvp_ds.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    [shard] = [str(extracted / "shards" / s.name) for s in read_manifest(str(extracted / "shards")).shards]
    _, _, _, images = next(r for r in read_shard(shard, with_images=True) if r[0] == "three")
    assert images.shape == (K, 64, 64, 3)  # its three images, stacked
    for case in ("memvp", "input_prefix"):
        model = _multi_image_model(case)
        cfg = tiny_config(case, *MULTI, *ONLINE, "data.prompt_format=conversation")
        torch.manual_seed(0)  # the LLM of the feature-reading model
        online = build_model(cfg.model).eval()
        online.strategy.load_state_dict(model.strategy.state_dict())
        positions = online.strategy.prefix_positions()
        encoder = build_encoder(cfg, tok, visual_positions=positions)
        cfg.model.vision.online = False
        stored_encoder = build_encoder(cfg, tok, visual_positions=positions)
        raws = list(read_raw_samples(shard))
        pixels = collate([encoder(r) for r in raws], 3, encoder.feature_shape, max_images=K)
        stored = collate([stored_encoder(r) for r in raws], 3, (N, C), max_images=K)
        assert pixels["images"].shape == (3, K * 3, 64, 64) and torch.equal(pixels["has_image"], stored["has_image"])
        with torch.no_grad():
            features = online._visual_features(None, pixels["images"]).half()
            slots = stored["has_image"].repeat_interleave(N, dim=1)
            torch.testing.assert_close(features[slots], stored["image_features"][slots], rtol=0, atol=2e-3)
            # the whole model: on pixels as on the stored features (the same strategy weights)
            out = online(pixels["input_ids"], pixels["attention_mask"], pixels["labels"], has_image=pixels["has_image"],
                         images=pixels["images"])
            reference = model(stored["input_ids"], stored["attention_mask"], stored["labels"],
                              stored["image_features"].float(), stored["has_image"])
        torch.testing.assert_close(out.loss, reference.loss, rtol=1e-3, atol=1e-3)
