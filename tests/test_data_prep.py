"""data_prep end to end on small data in the real formats, read back with plain webdataset."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import data_prep.extract as extract_module
from data_prep.cli import main as prep_main
from data_prep.extract import ExtractOptions, run_extract
from memvp_ds.data.shard_format import read_manifest
from data_prep.sources import JsonlQASource, LlavaSource, ScienceQASource
from data_prep.synthetic import make_synthetic_scienceqa
from data_prep.verify import merge, verify
from memvp_ds.vision.clip_features import ClipFeatureExtractor, FeatureRecipe, image_transform, load_clip_visual

TINY_VIT = os.path.join(os.path.dirname(extract_module.__file__), "..", "memvp_ds", "vision", "model_configs", "tiny-vit.json")
RECIPE = FeatureRecipe(model=os.path.abspath(TINY_VIT), pretrained="random", image_size=64)


@pytest.fixture(scope="module")
def sqa_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqa")
    make_synthetic_scienceqa(str(root), num_train=40, num_val=8, num_test=16, seed=1)
    return str(root)


def _extract(root, out, **kw):
    opts = ExtractOptions(out_dir=str(out), samples_per_shard=kw.pop("samples_per_shard", 10), batch_size=4,
                          num_workers=kw.pop("num_workers", 0), **kw)
    return run_extract(ScienceQASource(root), RECIPE, opts)


def _shas(manifest):
    return {s["name"]: s["sha256"] for s in manifest["shards"]}


def test_scienceqa_round_trip_with_plain_webdataset(sqa_root, tmp_path):
    manifest = _extract(sqa_root, tmp_path)
    problems = json.load(open(os.path.join(sqa_root, "problems.json")))
    splits = json.load(open(os.path.join(sqa_root, "pid_splits.json")))
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {s: len(splits[s]) for s in ("train", "val", "test")}
    assert manifest["recipe"]["tokens"] == 16 and manifest["recipe"]["dim"] == 32
    names = sorted(s["name"] for s in manifest["shards"])
    assert names[:2] == ["test-000000.tar", "test-000001.tar"] and "train-000003.tar" in names
    seen = {}
    for shard in manifest["shards"]:
        for sample in wds.WebDataset(str(tmp_path / shard["name"]), shardshuffle=False):
            fields = json.loads(sample["json"])
            problem = problems[fields["source_id"]]
            assert fields["split"] == shard["split"] and fields["source_id"] in splits[shard["split"]]
            assert (fields["question"], fields["choices"], fields["answer"]) == (
                problem["question"], problem["choices"], problem["answer"])
            assert fields["has_image"] == (problem["image"] is not None) == ("npy" in sample)
            if "npy" in sample:
                features = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
                assert features.shape == (16, 32) and features.dtype == np.float16
            seen[fields["source_id"]] = True
    assert len(seen) == 64
    assert verify(str(tmp_path)) == []


def test_features_match_independent_recipe_computation(sqa_root, tmp_path):
    manifest = _extract(sqa_root, tmp_path)
    shard = next(s for s in manifest["shards"] if s["with_image"])
    sample = next(s for s in wds.WebDataset(str(tmp_path / shard["name"]), shardshuffle=False) if "npy" in s)
    fields = json.loads(sample["json"])
    stored = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    # Independent path: PIL bicubic resize + manual ImageNet normalisation, open_clip's own
    # forward_intermediates for the penultimate block, then ln_post.
    path = os.path.join(sqa_root, "images", fields["split"], fields["source_id"], "image.png")
    image = Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC)
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = ((pixels - mean[:, None, None]) / std[:, None, None])[None]
    visual = load_clip_visual(RECIPE)
    depth = len(visual.transformer.resblocks)
    out = visual.forward_intermediates(pixels, indices=[depth - 2], intermediates_only=True, output_fmt="NLC")
    expected = visual.ln_post(out["image_intermediates"][0])[0]
    np.testing.assert_allclose(stored.astype(np.float32), expected.detach().numpy(), atol=2e-2, rtol=1e-2)
    # The recipe's own transform equals the manual one (tensor level, before the model).
    ours = image_transform(RECIPE)(Image.open(path).convert("RGB"))
    assert torch.allclose(ours, pixels[0], atol=1e-2)


def test_other_recipes_change_tokens():
    visual = load_clip_visual(RECIPE)
    images = torch.randn(2, 3, 64, 64)
    with_cls = ClipFeatureExtractor(visual, FeatureRecipe(**{**RECIPE.to_dict(), "keep_cls": True}))
    last = ClipFeatureExtractor(visual, FeatureRecipe(**{**RECIPE.to_dict(), "layer": "last"}))
    penultimate = ClipFeatureExtractor(visual, RECIPE)
    assert with_cls(images).shape == (2, 17, 32) and with_cls.tokens == 17
    assert not torch.allclose(last(images), penultimate(images))


def test_lavin_and_dvp_recipes_equal_open_clip_intermediates(tmp_path):
    """cls_every_4 without ln_post: the CLS token after blocks 4 and 8 of an 8-block ViT (LaVIN's visual
    tokens); last + keep_cls without ln_post: the last block's whole output (DVP-SQA's cross-attention
    input). Reference: open_clip's own forward_intermediates."""
    vit = json.loads(open(TINY_VIT).read())
    vit["vision_cfg"]["layers"] = 8
    (tmp_path / "tiny-vit-8.json").write_text(json.dumps(vit))
    recipe = FeatureRecipe(model=str(tmp_path / "tiny-vit-8.json"), pretrained="random", image_size=64, ln_post=False)
    visual = load_clip_visual(recipe)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = visual.forward_intermediates(images, indices=[3, 7], intermediates_only=True, output_fmt="NLC",
                                           output_extra_tokens=True)
        lavin = ClipFeatureExtractor(visual, FeatureRecipe(**{**recipe.to_dict(), "layer": "cls_every_4"}))
        assert lavin.tokens == 2
        torch.testing.assert_close(lavin(images), torch.cat(out["image_intermediates_prefix"], dim=1))
        dvp = ClipFeatureExtractor(visual, FeatureRecipe(**{**recipe.to_dict(), "layer": "last", "keep_cls": True}))
        last = torch.cat([out["image_intermediates_prefix"][1], out["image_intermediates"][1]], dim=1)
        torch.testing.assert_close(dvp(images), last)


def test_missing_clip_checkpoint_is_a_clear_error(tmp_path):
    recipe = FeatureRecipe(model=RECIPE.model, pretrained=str(tmp_path / "absent.bin"))
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_clip_visual(recipe)


def test_resume_after_kill_gives_identical_shards(sqa_root, tmp_path, monkeypatch):
    reference = _shas(_extract(sqa_root, tmp_path / "reference"))
    real_write, calls = extract_module.write_shard, []

    def dying_write(path, samples):
        calls.append(path)
        if len(calls) == 3:  # killed in the middle of writing the third shard
            with open(path + ".tmp", "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real_write(path, samples)

    monkeypatch.setattr(extract_module, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _extract(sqa_root, tmp_path / "resumed")
    assert len(read_manifest(str(tmp_path / "resumed")).shards) == 2
    monkeypatch.setattr(extract_module, "write_shard", real_write)
    calls.clear()
    monkeypatch.setattr(extract_module, "write_shard", lambda p, s: (calls.append(p), real_write(p, s))[1])
    resumed = _extract(sqa_root, tmp_path / "resumed")
    assert len(calls) == len(reference) - 2, "complete shards must not be rewritten"
    assert _shas(resumed) == reference
    assert verify(str(tmp_path / "resumed")) == []


def test_parts_and_merge_equal_a_single_run(sqa_root, tmp_path):
    single = _extract(sqa_root, tmp_path / "single")
    for index in range(3):
        _extract(sqa_root, tmp_path / "parts", part_index=index, part_count=3)
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "parts"))
    merged = merge(str(tmp_path / "parts"))
    assert _shas(merged) == _shas(single)
    assert merged["splits"] == single["splits"]
    assert verify(str(tmp_path / "parts")) == []


def test_merge_refuses_missing_part(sqa_root, tmp_path):
    _extract(sqa_root, tmp_path, part_index=0, part_count=2)
    with pytest.raises(ValueError, match=r"parts \[1\] of 2"):
        merge(str(tmp_path))


@pytest.mark.parametrize("policy", ["text-only", "drop"])
def test_corrupt_and_missing_images_are_counted_and_reported(sqa_root, tmp_path, policy):
    root = tmp_path / "sqa"
    shutil.copytree(sqa_root, root)
    problems = json.load(open(root / "problems.json"))
    splits = json.load(open(root / "pid_splits.json"))
    with_image = [pid for pid in splits["train"] if problems[pid]["image"]]
    corrupt, missing = with_image[0], with_image[1]
    (root / "images" / "train" / corrupt / "image.png").write_bytes(b"\x89PNG not really")
    os.remove(root / "images" / "train" / missing / "image.png")
    manifest = _extract(str(root), tmp_path / "out", on_bad_image=policy)
    errors = [json.loads(line) for line in open(tmp_path / "out" / "errors.jsonl")]
    assert sorted(e["key"] for e in errors) == sorted([corrupt, missing])
    assert all(e["reason"] and e["shard"].startswith("train-") for e in errors)
    expected_train = len(splits["train"]) - (2 if policy == "drop" else 0)
    assert manifest["splits"]["train"]["samples"] == expected_train
    assert manifest["splits"]["train"]["with_image"] == len(with_image) - 2
    assert verify(str(tmp_path / "out")) == []


def test_verify_names_a_truncated_shard_and_cli_exits_nonzero(sqa_root, tmp_path, capsys):
    manifest = _extract(sqa_root, tmp_path)
    victim = tmp_path / manifest["shards"][1]["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    problems = verify(str(tmp_path))
    assert problems and all(manifest["shards"][1]["name"] in p for p in problems)
    assert prep_main(["verify", str(tmp_path)]) == 1
    assert manifest["shards"][1]["name"] in capsys.readouterr().err


def test_llava_json_and_generic_jsonl_sources(tmp_path):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.save(tmp_path / "a.png")
    llava = [
        {"id": "x.1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "x.2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    rows = [
        {"id": "q1", "image": "a.png", "question": "Colour?", "answer": "red", "choices": ["red", "blue"], "split": "val"},
        {"id": "q2", "image": "a.png", "question": "Shape?", "answer": "square"},
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for source, out in ((LlavaSource(str(tmp_path / "llava.json"), str(tmp_path)), "llava_out"),
                        (JsonlQASource(str(tmp_path / "qa.jsonl"), str(tmp_path)), "qa_out")):
        manifest = run_extract(source, RECIPE, ExtractOptions(out_dir=str(tmp_path / out), num_workers=0))
        assert verify(str(tmp_path / out)) == []
        samples = [json.loads(s["json"]) | {"npy": "npy" in s}
                   for shard in manifest["shards"]
                   for s in wds.WebDataset(str(tmp_path / out / shard["name"]), shardshuffle=False)]
        if out == "llava_out":
            assert samples[0]["conversations"][0]["value"] == "What colour?" and samples[0]["npy"]
            assert samples[0]["source_id"] == "x.1" and not samples[1]["npy"]
        else:
            assert manifest["splits"]["val"]["samples"] == 1 and manifest["splits"]["train"]["samples"] == 1
            assert {s["answer"] for s in samples} == {"red", "square"}


def test_sharegpt_conversations_are_stored_in_llava_form_and_an_unknown_role_names_file_and_record(tmp_path, capsys):
    image = Image.new("RGB", (40, 30), (10, 10, 200))
    image.save(tmp_path / "a.png")
    records = [
        {"id": "s1", "image": "a.png", "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nColour?"},
            {"role": "assistant", "content": "Blue."}]},
        {"id": "s2", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}]},
    ]
    (tmp_path / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    manifest = run_extract(LlavaSource(str(tmp_path / "sharegpt.jsonl"), str(tmp_path)), RECIPE,
                           ExtractOptions(out_dir=str(tmp_path / "out"), num_workers=0))
    stored = [json.loads(s["json"]) for shard in manifest["shards"]
              for s in wds.WebDataset(str(tmp_path / "out" / shard["name"]), shardshuffle=False)]
    assert stored[0]["conversations"] == [{"from": "system", "value": "Be brief."},
                                          {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Blue."}]
    assert stored[1]["conversations"] == [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    records[1]["conversations"][1]["from"] = "bot"
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    args = ["extract", "--source", "llava", "--annotations", str(tmp_path / "bad.jsonl"), "--image-root",
            str(tmp_path), "--out", str(tmp_path / "bad_out"), "--clip-model", "tiny-vit", "--clip-pretrained",
            "random", "--image-size", "64", "--workers", "0"]
    assert prep_main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl:2 (id 's2')" in errors[0] and "'bot'" in errors[0], err
    assert "Traceback" not in err


def test_cli_help_explains_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prep_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("extract", "verify", "inspect", "merge", "synthetic"):
        assert command in out


def test_cli_synthetic_extract_with_worker_processes_and_inspect(tmp_path, capsys):
    assert prep_main(["synthetic", str(tmp_path / "sqa"), "--num-train", "24", "--num-val", "4", "--num-test", "4"]) == 0
    args = ["extract", "--source", "scienceqa", "--root", str(tmp_path / "sqa"), "--out", str(tmp_path / "out"),
            "--clip-model", RECIPE.model, "--clip-pretrained", "random", "--image-size", "64",
            "--workers", "2", "--batch-size", "5", "--samples-per-shard", "8"]
    assert prep_main(args) == 0
    assert "train: 24 samples" in capsys.readouterr().out
    assert prep_main(["inspect", str(tmp_path / "out")]) == 0
    assert "16 x 32 float16" in capsys.readouterr().out
    assert prep_main(["extract", "--source", "scienceqa", "--root", str(tmp_path / "nowhere"), "--out",
                      str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_scienceqa_captions_are_carried_into_the_samples(sqa_root, tmp_path, capsys):
    """captions.json (the ScienceQA repo's {"captions": {pid: text}}) -> each sample's 'caption' field, ""
    for a pid without one; without the file the field is absent."""
    root = tmp_path / "sqa"
    shutil.copytree(sqa_root, root)
    problems = json.load(open(root / "problems.json"))
    with_image = sorted(pid for pid, p in problems.items() if p["image"])
    captions = {pid: f"A drawing number {pid}." for pid in with_image[::2]}
    (root / "captions.json").write_text(json.dumps({"model": "x", "max_length": 64, "captions": captions}))
    manifest = _extract(str(root), tmp_path / "out")
    assert manifest["source"]["captions"] == str(root / "captions.json")
    seen = 0
    for shard in manifest["shards"]:
        for sample in wds.WebDataset(str(tmp_path / "out" / shard["name"]), shardshuffle=False):
            fields = json.loads(sample["json"])
            assert fields["caption"] == captions.get(fields["source_id"], "")
            seen += bool(fields["caption"])
    assert seen == len(captions)
    plain = _extract(sqa_root, tmp_path / "plain")
    sample = next(iter(wds.WebDataset(str(tmp_path / "plain" / plain["shards"][0]["name"]), shardshuffle=False)))
    assert "caption" not in json.loads(sample["json"]) and plain["source"]["captions"] is None
    assert prep_main(["extract", "--source", "scienceqa", "--root", sqa_root, "--captions", str(tmp_path / "nope.json"),
                      "--out", str(tmp_path / "x")]) == 2
    assert "nope.json" in capsys.readouterr().err
