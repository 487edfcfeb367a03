"""Online CLIP with trainable adapters (model.vision.online): shards with images, the adapted tower, the
trainable set and its size at the official shapes, and (slow) ZeRO-3, resume and predict end to end."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from memvp_ds import ConfigError, build_model, load_config
from tests.conftest import TINY_VIT, prepare_dataset, tiny_config
from tests.helpers import run_train, scalars, train_overrides


def _online(weights) -> list:
    return ["model.vision.online=true", f"model.vision.recipe.model={TINY_VIT}",
            f"model.vision.recipe.pretrained={weights}", "model.vision.recipe.image_size=64"]


@pytest.fixture(scope="module")
def online_data(tmp_path_factory):
    """Tiny CLIP weights saved to a file (seeded, so reproducible) and shards with features AND images made
    with them: the online tower loads the very weights data_prep used."""
    import open_clip

    root = tmp_path_factory.mktemp("online")
    open_clip.add_model_config(TINY_VIT)
    torch.manual_seed(1234)
    clip = open_clip.create_model("tiny-vit", pretrained=None, force_quick_gelu=True)
    weights = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    data = prepare_dataset(root, num_train=48, num_val=8, num_test=8, samples_per_shard=12,
                           clip_pretrained=str(weights), store="both")
    return {**data, "weights": str(weights)}


def _encoded_batch(shard, encoder):
    """Every sample of one shard through an encoder and collate, as the stream does."""
    import webdataset as wds

    from memvp_ds.data.collate import collate

    samples = [encoder(raw) for raw in wds.tarfile_samples(iter([{"url": shard}]))]
    return collate(samples, 3, encoder.feature_shape)


def test_online_features_equal_stored_features_at_initialisation(online_data):
    """fc2 = 0: the adapted tower on the stored pixels gives the stored features (rounded to their fp16)."""
    from memvp_ds.data.collate import build_encoder
    from memvp_ds.data.tokenizer import load_tokenizer

    cfg = tiny_config("memvp", *_online(online_data["weights"]))
    tokenizer = load_tokenizer(online_data["tokenizer"])
    shard = online_data["train"].split("::")[0]
    pixels = _encoded_batch(shard, build_encoder(cfg, tokenizer))
    cfg.model.vision.online = False
    stored = _encoded_batch(shard, build_encoder(cfg, tokenizer))
    assert pixels["images"].dtype == torch.uint8 and pixels["images"].shape[1:] == (3, 64, 64)
    assert "image_features" not in pixels and torch.equal(pixels["has_image"], stored["has_image"])
    assert pixels["has_image"].any()
    model = build_model(tiny_config("memvp", *_online(online_data["weights"])).model).eval()
    with torch.no_grad():
        online = model.vision(pixels["images"]).half()
    rows = pixels["has_image"]
    assert torch.equal(online[rows], stored["image_features"][rows])


def test_only_adapters_projector_and_memory_train(online_data):
    model = build_model(tiny_config("memvp", *_online(online_data["weights"])).model)
    trainable = model.trainable_parameters()
    adapters = {n for n in trainable if n.startswith("vision.")}
    # The tiny ViT has 3 blocks; penultimate-layer features run 2 of them, and only those get adapters.
    assert adapters == {f"vision.blocks.{i}.adapter.fc{j}.weight" for i in range(2) for j in (1, 2)}
    assert set(trainable) - adapters == {f"strategy.{n}" for n in (
        "memory.memory_keys", "memory.memory_values", "projector.fc1.weight", "projector.fc1.bias",
        "projector.fc2.weight", "projector.fc2.bias")}
    clip = [p for n, p in model.vision.named_parameters() if ".adapter." not in n]
    assert clip and not any(p.requires_grad for p in clip)
    assert all(torch.count_nonzero(model.vision.blocks[i].adapter.fc2.weight) == 0 for i in range(2))
    assert trainable["vision.blocks.0.adapter.fc1.weight"].shape == (12, 32)  # width 32 -> adapter_dim 12


def test_adapted_block_matches_the_official_formula():
    """x + attn(ln_1 x), then + mlp(ln_2 .) + 0.1 * fc2(GELU_erf(fc1(ln_2 .))), computed by hand."""
    from memvp_ds.vision.clip_features import FeatureRecipe
    from memvp_ds.vision.tower import VisionOptions, build_vision_tower

    tower = build_vision_tower(VisionOptions(online=True, recipe=FeatureRecipe(model=TINY_VIT, pretrained="random",
                                                                               image_size=64))).eval()
    adapted = tower.blocks[0]
    torch.manual_seed(0)
    torch.nn.init.normal_(adapted.adapter.fc2.weight, std=0.5)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        block = adapted.block
        h = x + block.attention(block.ln_1(x))
        z = block.ln_2(h) @ adapted.adapter.fc1.weight.T
        gelu = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        expected = block(x) + 0.1 * gelu @ adapted.adapter.fc2.weight.T
        torch.testing.assert_close(adapted(x), expected, rtol=1e-6, atol=1e-6)
        tanh_gelu = torch.nn.functional.gelu(z, approximate="tanh") @ adapted.adapter.fc2.weight.T
        assert not torch.allclose(adapted(x), block(x) + 0.1 * tanh_gelu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,expected", [("7b", 3_846_272), ("13b", 5_452_928)])
def test_trainable_count_matches_the_official_one_at_llama_shapes(size, expected):
    """Official (memvp_official.md 4.3): 3,879,040 (7B) / 5,487,744 (13B) printed, which include the unused
    modality embedding (2 x d) and the adapter of CLIP block 23, which never runs (2 x 12 x 1024). Built on
    the meta device: nothing is allocated."""
    d, layers, heads, ffn, rows = {"7b": (4096, 32, 32, 11008, 320), "13b": (5120, 40, 40, 13824, 400)}[size]
    llm = {"model_type": "llama", "hidden_size": d, "intermediate_size": ffn, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": 32000}
    cfg = load_config(None, [f"model.llm.config={json.dumps(llm)}", f"model.memvp.memory_rows={rows}",
                             "model.vision.online=true", "model.vision.recipe.pretrained=random"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert all(p.is_meta for p in model.parameters())
    counts = {n: p.numel() for n, p in model.trainable_parameters().items()}
    official_printed = {"7b": 3_879_040, "13b": 5_487_744}[size]
    assert sum(counts.values()) == expected == official_printed - 2 * d - 2 * 12 * 1024
    assert sum(v for n, v in counts.items() if n.startswith("vision.")) == 23 * 2 * 12 * 1024


def test_plan_rejects_shards_that_do_not_carry_what_the_model_reads(online_data, dataset, tmp_path):
    from memvp_ds.data.plan import plan_data

    def plan(data, *overrides):
        return plan_data(tiny_config("memvp", f"data.train_shards={data['train']}", *overrides), 1)

    plan(online_data, *_online(online_data["weights"]))  # both stored: either mode plans
    plan(online_data)
    with pytest.raises(ConfigError, match="features only"):
        plan(dataset, *_online(online_data["weights"]))
    with pytest.raises(ConfigError, match="image_size=64 but model.vision.recipe.image_size is 224"):
        plan(online_data, *_online(online_data["weights"])[:-1])
    manifest = json.loads((online_data["root"] / "shards" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "store": "images"}))
    with pytest.raises(ConfigError, match="images only"):
        plan(online_data, f"data.manifest={tmp_path / 'manifest.json'}")


def test_images_only_shards_verify_and_catch_a_missing_image(online_data, tmp_path):
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.shards import write_shard
    from data_prep.sources import ScienceQASource
    from data_prep.verify import inspect, verify
    from memvp_ds.data.shard_format import read_shard
    from memvp_ds.vision.clip_features import FeatureRecipe, image_pixels, load_image

    recipe = FeatureRecipe(model=TINY_VIT, pretrained=online_data["weights"], image_size=64)
    manifest = run_extract(ScienceQASource(str(online_data["root"] / "sqa"), ["test"]), recipe,
                           ExtractOptions(out_dir=str(tmp_path), samples_per_shard=4, num_workers=0, store="images"))
    assert manifest["store"] == "images" and verify(str(tmp_path)) == []
    assert "store: images" in inspect(str(tmp_path))
    shard = str(tmp_path / manifest["shards"][0]["name"])
    samples = list(read_shard(shard, with_images=True))
    key, fields, features, image = next(s for s in samples if s[1]["has_image"])
    assert features is None and image.dtype == np.uint8 and image.shape == (64, 64, 3)
    source = online_data["root"] / "sqa" / "images" / "test" / fields["source_id"] / "image.png"
    assert np.array_equal(image, image_pixels(load_image(str(source)), recipe).permute(1, 2, 0).numpy())
    write_shard(shard, [(k, f, None, None) for k, f, _, _ in samples])  # images lost, has_image kept
    assert any("lacks a .png member" in problem for problem in verify(str(tmp_path)))


def test_dry_run_of_an_online_recipe_on_image_only_shards_encodes_the_first_sample_as_training_does(
        online_data, tmp_path):
    """--dry-run encodes the first training sample with the training run's encoder: from its stored image
    (shards without features) when the vision tower runs online."""
    from data_prep.extract import ExtractOptions, run_extract
    from data_prep.sources import ScienceQASource
    from memvp_ds.data.collate import build_encoder
    from memvp_ds.data.shard_format import read_raw_samples
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.engine.plan_report import dry_run_report
    from memvp_ds.vision.clip_features import FeatureRecipe

    recipe = FeatureRecipe(model=TINY_VIT, pretrained=online_data["weights"], image_size=64)
    manifest = run_extract(ScienceQASource(str(online_data["root"] / "sqa")), recipe,
                           ExtractOptions(out_dir=str(tmp_path / "shards"), samples_per_shard=12, num_workers=0,
                                          store="images"))
    first = next(read_raw_samples(str(tmp_path / "shards" / "train-000000.tar")))
    assert manifest["store"] == "images" and json.loads(first["json"])["has_image"] and "npy" not in first
    cfg = tiny_config("memvp", *_online(online_data["weights"]), f"data.shards={tmp_path / 'shards'}",
                      f"data.tokenizer={online_data['tokenizer']}", f"train.output_dir={tmp_path / 'run'}")
    report = dry_run_report(cfg, 1)
    sample = build_encoder(cfg, load_tokenizer(online_data["tokenizer"]))(first)
    assert sample.features.shape == (3, 64, 64)  # the stored image, as the online tower reads it
    assert report["example"]["key"] == first["__key__"]
    assert report["example"]["prompt_tokens"] + report["example"]["target_tokens"] == len(sample.input_ids)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_online_training_zero3_two_ranks_matches_one_process_resumes_exactly_and_predicts(online_data, tmp_path):
    """One small end-to-end check on the tiny CLIP + tiny LLM, dropout off so rank counts compare:
    2-rank ZeRO-3 (frozen CLIP partitioned like the LLM) == 1 process; the CLIP adapters train under both;
    resuming the single run from its mid checkpoint ends on the same weights; memvp-predict's answer is the
    model's generation with the exported (trained) adapters inside its CLIP."""
    steps = 6
    common = (*_online(online_data["weights"]), f"train.max_steps={steps}", "train.save_interval=3",
              "model.memvp.dropout=0.0", "model.vision.adapter_dropout=0.0", "data.shuffle_buffer=16")
    run_train(train_overrides(online_data, tmp_path / "zero3", *common, "train.ds_config=ds_configs/zero3.json"),
              ranks=2)
    # The 2-rank run also evaluates at its end (ZeRO-3 generation through the tower); the others need not.
    single = (*common, "data.num_workers=2", "train.grad_accum_steps=2", "data.val_shards=null")
    run_train(train_overrides(online_data, tmp_path / "single", *single))
    losses = {name: [v for _, v in sorted(scalars(tmp_path / name, "train/loss").items())] for name in ("zero3", "single")}
    assert len(losses["zero3"]) == steps
    assert losses["zero3"][:3] == pytest.approx(losses["single"][:3], rel=1e-4, abs=1e-4)
    assert losses["zero3"] == pytest.approx(losses["single"], rel=1e-2)
    assert list(scalars(tmp_path / "zero3", "eval/acc/overall")) == [steps]  # ZeRO-3 generation ran the tower
    final = {name: load_file(tmp_path / name / "export" / "trainable.safetensors") for name in ("zero3", "single")}
    adapters = [k for k in final["single"] if k.startswith("vision.") and k.endswith("fc2.weight")]
    assert len(adapters) == 2 and set(final["zero3"]) == set(final["single"])
    # Compared at the step-3 checkpoint, where the losses agree to 1e-4 too: the frozen CLIP blocks keep
    # ZeRO-3's per-module hooks (they hold the trainable adapters), whose autograd wrappers add gradients in
    # another order; this tiny run's Adam grows those last-bit differences step by step (see
    # memvp_ds/engine/zero3_leaves.py, which removes them for the LLM's frozen blocks).
    mid = {name: load_file(tmp_path / name / "checkpoints" / "step-00000003" / "trainable.safetensors")
           for name in ("zero3", "single")}
    for key in adapters:  # gradients reached the adapters through the frozen (partitioned) CLIP
        assert torch.count_nonzero(final["single"][key]) > 0 and torch.count_nonzero(final["zero3"][key]) > 0
        torch.testing.assert_close(mid["zero3"][f"param/{key}"], mid["single"][f"param/{key}"], rtol=2e-2, atol=1e-4)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "single" / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    (resumed / "checkpoints" / "latest").write_text("step-00000003\n")
    run_train(train_overrides(online_data, resumed, *single))
    assert sorted(scalars(resumed, "train/loss")) == [4, 5, 6]
    again = load_file(resumed / "export" / "trainable.safetensors")
    assert set(again) == set(final["single"])
    for key, value in final["single"].items():
        assert torch.equal(again[key], value), key

    from memvp_ds.data.prompts import build_segments, encode_segments
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.export import load_exported
    from memvp_ds.predict import answer, image_pixels_for

    export = str(tmp_path / "single" / "export" / "trainable.safetensors")
    model, cfg = load_exported(export)
    model.eval()
    assert torch.equal(model.vision.blocks[0].adapter.fc2.weight, final["single"]["vision.blocks.0.adapter.fc2.weight"])
    problems = json.loads((online_data["root"] / "sqa" / "problems.json").read_text())
    qid, problem = next((q, p) for q, p in problems.items() if p["image"] and p["split"] == "test")
    image = str(online_data["root"] / "sqa" / "images" / "test" / qid / "image.png")
    pixels = image_pixels_for(dataclasses.asdict(cfg.model.vision.recipe), image)
    with torch.no_grad():
        adapted = model.vision(pixels)
        for block in model.vision.blocks:
            block.adapter.fc2.weight.zero_()
        assert not torch.allclose(adapted, model.vision(pixels)), "trained adapters change the features"
    model, _ = load_exported(export)
    tokenizer = load_tokenizer(online_data["tokenizer"])
    fields = {"question": problem["question"], "choices": problem["choices"], "hint": "", "answer": 0}
    ids = torch.tensor([encode_segments(tokenizer, build_segments(fields, "qcm_a", with_target=False), 128).input_ids])
    tokens = model.eval().generate(ids, images=pixels, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode([t for t in tokens[0].tolist() if t != tokenizer.eos_token_id], skip_special_tokens=True)
    assert answer(export, image, problem["question"], problem["choices"]) == expected
