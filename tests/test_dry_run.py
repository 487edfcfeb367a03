"""memvp-train --dry-run over a full-size ScienceQA shard layout: the official 13B recipe's plan, the shards
each split reads, the first training sample as the loss sees it, and the checks that fail before any model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memvp_ds import ConfigError, load_config
from tests.conftest import CONFIGS, TINY_VIT
from tests.helpers import REPO

# Worked examples 1 and 2 of the official-code spec: the first training and the first test problem.
FISH = {"question": "Select the fish below.", "hint": "Fish live underwater. They have fins, not limbs.",
        "choices": ["tiger shark", "red-eyed tree frog"], "answer": 0}
FISH_PROMPT = ("Question: Select the fish below.\nContext: Fish live underwater. They have fins, not limbs.\n"
               "Options: (A) tiger shark (B) red-eyed tree frog\nResponse:")
STATES = {"question": "Which of these states is farthest north?", "hint": "",
          "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0, "image": "image.png"}
STATES_CAPTION = "An aerial view of a map of the united states."
STATES_EVAL_PROMPT = ("Question: Which of these states is farthest north?\nContext: An aerial view of a map of the "
                      "united states.\nOptions: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\n"
                      "Response:The answer is")
INLINE_LLM = "model.llm.config={model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}"


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """The shard layout of a full ScienceQA extraction: 12,726 / 4,241 / 4,241 samples, 1,000 per shard.

    The problems come from the synthetic generator and go through data_prep's ScienceQA source (captions.json
    included) and shard writer with data_prep's shard plan. The features are random 16 x 32 arrays (the tiny
    CLIP's shape) written directly: extracting 21k images with the tiny CLIP takes over a minute on CPU.
    """
    from data_prep.extract import plan_shards
    from data_prep.shards import write_shard
    from data_prep.sources import ScienceQASource
    from data_prep.synthetic import make_synthetic_scienceqa
    from memvp_ds.data.shard_format import MANIFEST, split_counts
    from memvp_ds.vision.clip_features import FeatureRecipe

    root = tmp_path_factory.mktemp("full_size")
    sqa, shards = root / "sqa", root / "shards"
    make_synthetic_scienceqa(str(sqa), 12726, 4241, 4241, seed=0, text_only_fraction=0.95)
    problems = json.loads((sqa / "problems.json").read_text())
    splits = json.loads((sqa / "pid_splits.json").read_text())
    problems[splits["train"][0]].update(FISH, image=None)
    problems[splits["test"][0]].update(STATES)
    (sqa / "problems.json").write_text(json.dumps(problems))
    captions = {pid: f"A picture number {pid}." for pid, p in problems.items() if p["image"]}
    captions[splits["test"][0]] = STATES_CAPTION
    (sqa / "captions.json").write_text(json.dumps({"model": "test", "captions": captions}))

    rng = np.random.default_rng(0)
    shards.mkdir()
    entries = []
    for plan in plan_shards(list(ScienceQASource(str(sqa)).examples()), 1000):
        samples = []
        for example in plan.examples:
            features = rng.standard_normal((16, 32)).astype(np.float16) if example.image else None
            samples.append((example.key, {**example.fields, "has_image": features is not None}, features))
        entries.append({**write_shard(str(shards / plan.name), samples), "split": plan.split, "errors": []})
    recipe = FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64)
    manifest = {"recipe": {**recipe.to_dict(), "tokens": 16, "dim": 32}, "complete": True, "shards": entries,
                "splits": split_counts(entries), "samples_per_shard": 1000}
    (shards / MANIFEST).write_text(json.dumps(manifest))
    return {"shards": str(shards), "manifest": manifest, "root": root}


def _overrides(full_size, tokenizer_dir, out_dir, *extra):
    return [f"data.shards={full_size['shards']}", "model.visual_tokens=16", "model.visual_dim=32",
            "model.llm.path=null", INLINE_LLM, f"data.tokenizer={tokenizer_dir}", f"train.output_dir={out_dir}", *extra]


def test_layout_is_a_full_size_extraction(full_size):
    splits = full_size["manifest"]["splits"]
    assert {s: (c["samples"], c["shards"]) for s, c in splits.items()} == {
        "train": (12726, 13), "val": (4241, 5), "test": (4241, 5)}


def test_dry_run_of_the_13b_recipe_from_another_directory(full_size, tokenizer_dir, tmp_path):
    """The issue's acceptance run: 8 ranks x 4 = 32 per step over 12,726 samples."""
    config = str(CONFIGS / "memvp_llama13b_sqa.yaml")
    cmd = [sys.executable, str(REPO / "memvp_ds" / "train.py"), "--config", config,
           *_overrides(full_size, tokenizer_dir, tmp_path / "run"), "--dry-run", "--world-size", "8",
           "--gpu-memory", "80GiB"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    print(json.dumps(plan, indent=2))
    assert plan["world_size"] == 8 and plan["global_batch"] == 32
    assert plan["train_samples"] == 12726
    assert plan["steps_per_epoch"] == 397 and plan["total_steps"] == 7940 and plan["warmup_steps"] == 794
    assert plan["lr"] == pytest.approx(1.125e-3, rel=1e-12)
    assert plan["shards"] == {
        "train": {"source": "manifest", "shards": "13/13", "samples": "12726/12726"},
        "val": {"source": "manifest", "shards": "5/5", "samples": "4241/4241"},
        "test": {"source": "manifest", "shards": "5/5", "samples": "4241/4241"},
    }
    assert plan["example"]["prompt"] == FISH_PROMPT
    assert plan["example"]["target"] == "The answer is A."
    assert plan["example"]["starts_with_bos"] and plan["example"]["ends_with_eos"]
    assert plan["eval"] == {"split": "test", "answer_tokens": 1, "use_caption": True,
                            "example_prompt": STATES_EVAL_PROMPT}
    # the recipe names the shipped zero2: found from any directory
    assert plan["ds_config"]["path"] == str(REPO / "ds_configs" / "zero2.json")
    assert plan["ds_config"]["zero_stage"] == 2
    assert plan["memory"]["zero"]["stage"] == 2 and plan["memory"]["verdict"].startswith("fits: ")
    assert not (tmp_path / "run").exists(), "a dry run creates nothing"


def _plan(full_size, tokenizer_dir, tmp_path, *extra, world_size=8):
    from memvp_ds.engine.plan_report import dry_run_report

    cfg = load_config(str(CONFIGS / "memvp_llama13b_sqa.yaml"), _overrides(full_size, tokenizer_dir, tmp_path / "o", *extra))
    return dry_run_report(cfg, world_size)


@pytest.mark.parametrize("size,world_size,accum", [("7b", 2, 4), ("13b", 8, 1)])
def test_dry_run_plans_the_official_lavin_runs(full_size, tokenizer_dir, tmp_path, size, world_size, accum):
    """LaVIN's finetuning_sqa_{7b,13b}.sh: 2 GPUs x 4 x 4 accumulation / 8 GPUs x 4 = 32 per step, blr 9e-3,
    20 epochs, 2 warm-up, wd 0.02; offline here (the shards hold features, not the images online CLIP reads)."""
    from memvp_ds.engine.plan_report import dry_run_report

    cfg = load_config(str(CONFIGS / f"lavin_llama{size}_sqa.yaml"),
                      _overrides(full_size, tokenizer_dir, tmp_path / "o", "model.vision.online=false"))
    plan = dry_run_report(cfg, world_size)
    assert cfg.model.strategy == "lavin" and plan["grad_accum_steps"] == accum and plan["global_batch"] == 32
    assert plan["steps_per_epoch"] == 397 and plan["total_steps"] == 7940 and plan["warmup_steps"] == 794
    assert plan["lr"] == pytest.approx(9e-3 * 32 / 256, rel=1e-12)
    assert plan["eval"]["use_caption"] is False


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_llava_lora_recipes_plan_the_memvp_schedule_with_llavas_lr(full_size, tokenizer_dir, tmp_path, size):
    """The baseline runs on MemVP's data, batch and epochs; its lr is LLaVA's LoRA 2e-4 at global batch 128
    by the linear scaling rule."""
    from memvp_ds.engine.plan_report import dry_run_report

    cfg = load_config(str(CONFIGS / f"llava_lora_llama{size}_sqa.yaml"),
                      _overrides(full_size, tokenizer_dir, tmp_path / "o"))
    plan = dry_run_report(cfg, 8)
    assert cfg.model.strategy == "llava_lora" and cfg.model.lora.rank == 128 and cfg.model.lora.alpha == 256
    assert plan["global_batch"] == 32 and plan["total_steps"] == 7940 and plan["warmup_steps"] == 794
    assert plan["lr"] == pytest.approx(2e-4 * 32 / 128, rel=1e-12)
    assert plan["example"]["prompt"] == FISH_PROMPT


def test_an_explicit_subset_is_reported_as_such(full_size, tokenizer_dir, tmp_path):
    subset = os.path.join(full_size["shards"], "train-{000000..000003}.tar")
    plan = _plan(full_size, tokenizer_dir, tmp_path, f"data.train_shards={subset}", "eval.use_caption=false")
    assert plan["shards"]["train"] == {"source": "explicit", "shards": "4/13", "samples": "4000/12726"}
    assert plan["train_samples"] == 4000 and plan["steps_per_epoch"] == 4000 // 32
    assert plan["shards"]["val"]["source"] == "manifest"
    assert "Context: N/A" in plan["eval"]["example_prompt"] and plan["eval"]["use_caption"] is False


def test_dry_run_checks_fail_with_the_name_of_the_problem(full_size, tokenizer_dir, tmp_path):
    other = os.path.join(full_size["shards"], "val-000000.tar")
    with pytest.raises(ConfigError, match="data.train_shards.*val-000000.tar is not a train shard"):
        _plan(full_size, tokenizer_dir, tmp_path, f"data.train_shards={other}")
    with pytest.raises(ConfigError, match="manifest.*not found"):
        _plan(full_size, tokenizer_dir, tmp_path, f"data.shards={tmp_path}")
    with pytest.raises(ConfigError, match="shards hold 16 x 32.*visual_tokens"):
        _plan(full_size, tokenizer_dir, tmp_path, "model.visual_tokens=256")
    with pytest.raises(ConfigError, match="train.ds_config.*absent.json"):
        _plan(full_size, tokenizer_dir, tmp_path, "train.ds_config=absent.json")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        _plan(full_size, tokenizer_dir, tmp_path, f"data.tokenizer={tmp_path}/none")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # (root may write anywhere)
        with pytest.raises(ConfigError, match="train.output_dir.*not writable"):
            _plan(full_size, tokenizer_dir, tmp_path, f"train.output_dir={locked}/run")


def test_a_truncated_shard_is_caught_by_its_size(full_size, tokenizer_dir, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(full_size["shards"], copy)
    victim = copy / "train-000007.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="train-000007.tar.*bytes, the manifest lists"):
        _plan(full_size, tokenizer_dir, tmp_path, f"data.shards={copy}")
