"""The shipped recipes for newer backbones plan with --dry-run at their real shapes: the LLM's published
config given inline (the model is built on the meta device, no weights exist here), real 256 x 1024 CLIP
feature shards written by data_prep's writer, and the memory plan for 8 ranks. The parameter counts are the
published ones, so the shapes are the real models'."""

import json

import numpy as np
import pytest

from memvp_ds import load_config
from memvp_ds.engine.memory_plan import parse_memory_size
from tests.chat_tokenizers import chat_tokenizer
from tests.conftest import CONFIGS, TINY_VIT

LLAMA3_8B = ("{model_type: llama, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, "
             "num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256, rope_theta: 500000.0, "
             "max_position_embeddings: 8192}")
QWEN25_7B = ("{model_type: qwen2, hidden_size: 3584, intermediate_size: 18944, num_hidden_layers: 28, "
             "num_attention_heads: 28, num_key_value_heads: 4, vocab_size: 152064, rope_theta: 1000000.0, "
             "max_position_embeddings: 32768, tie_word_embeddings: false}")
LLAMA2_13B = ("{model_type: llama, hidden_size: 5120, intermediate_size: 13824, num_hidden_layers: 40, "
              "num_attention_heads: 40, vocab_size: 32000}")
# recipe: (inline config, published parameter count, memory rows)
RECIPES = {
    "memvp_llama3_8b_sqa": (LLAMA3_8B, 8_030_261_248, 320),
    "memvp_qwen25_7b_sqa": (QWEN25_7B, 7_615_616_512, 280),
    "memvp_llama2_13b_sqa": (LLAMA2_13B, 13_015_864_320, 400),
    "memvp_llama3_8b_instruct": (LLAMA3_8B, 8_030_261_248, 320),
}
TRAIN, VAL, TEST = 32, 4, 4


def _write_split_shards(root, examples, with_image):
    """One shard per split through data_prep's writer, 256 x 1024 fp16 features for image samples."""
    from data_prep.extract import plan_shards
    from data_prep.shards import write_shard
    from memvp_ds.data.shard_format import MANIFEST, split_counts
    from memvp_ds.vision.clip_features import FeatureRecipe

    rng = np.random.default_rng(0)
    root.mkdir()
    entries = []
    for plan in plan_shards(examples, 1000):
        samples = []
        for example in plan.examples:
            features = rng.standard_normal((256, 1024)).astype(np.float16) if with_image(example) else None
            samples.append((example.key, {**example.fields, "has_image": features is not None}, features))
        entries.append({**write_shard(str(root / plan.name), samples), "split": plan.split, "errors": []})
    recipe = FeatureRecipe(model=TINY_VIT, pretrained="random", image_size=64)
    manifest = {"recipe": {**recipe.to_dict(), "tokens": 256, "dim": 1024}, "complete": True, "shards": entries,
                "splits": split_counts(entries), "samples_per_shard": 1000}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="module")
def sqa_shards(tmp_path_factory):
    from data_prep.sources import ScienceQASource
    from data_prep.synthetic import make_synthetic_scienceqa

    root = tmp_path_factory.mktemp("sqa")
    make_synthetic_scienceqa(str(root / "sqa"), TRAIN, VAL, TEST, seed=0, text_only_fraction=0.75)
    examples = list(ScienceQASource(str(root / "sqa")).examples())
    return _write_split_shards(root / "shards", examples, lambda example: example.image is not None)


@pytest.fixture(scope="module")
def conversation_shards(tmp_path_factory):
    from data_prep.sources import LlavaSource

    root = tmp_path_factory.mktemp("llava")
    examples = []
    for split, count in (("train", TRAIN), ("val", VAL)):
        records = [{"id": f"{split}{i}", "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
            {"from": "gpt", "value": f"A circle number {i}."},
            {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red."}]} for i in range(count)]
        (root / f"{split}.json").write_text(json.dumps(records))
        examples += list(LlavaSource(str(root / f"{split}.json"), str(root), split).examples())
    return _write_split_shards(root / "shards", examples, lambda example: True)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_plans_at_its_real_shapes(recipe, sqa_shards, conversation_shards, tokenizer_dir, tmp_path):
    from memvp_ds.engine.plan_report import dry_run_report

    inline, params, rows = RECIPES[recipe]
    instruct = "instruct" in recipe
    shards = conversation_shards if instruct else sqa_shards
    tokenizer = chat_tokenizer(str(tmp_path / "tokenizer"), "llama3") if instruct else tokenizer_dir
    cfg = load_config(str(CONFIGS / f"{recipe}.yaml"), [
        "model.llm.path=null", f"model.llm.config={inline}", f"data.shards={shards}", f"data.tokenizer={tokenizer}",
        f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.model.memvp.memory_rows == rows and cfg.train.precision == "bf16"
    plan = dry_run_report(cfg, 8, parse_memory_size("80GiB"))
    print(json.dumps(plan["memory"], indent=2))
    assert plan["global_batch"] == 32 and plan["train_samples"] == TRAIN
    assert plan["example"]["target_tokens"] > 0
    if instruct:  # rendered by the Llama-3 template: its BOS first, the answer's <|eot_id|> (the EOS) last
        assert plan["prompt_format"] == "chat_template" and plan["example"]["prompt"].startswith("user\n\n")
        assert plan["example"]["starts_with_bos"] and plan["example"]["ends_with_eos"]
    memory = plan["memory"]
    assert memory["parameters"]["frozen"] == params
    assert memory["per_rank_bytes"]["frozen_weights"] == 2 * params  # bf16, replicated under ZeRO-2
    assert memory["positions_per_micro_batch"] == 4 * cfg.data.max_seq_len
    assert memory["verdict"].startswith("fits: ")
    assert memory["total_gib"]["with_checkpointing"] < memory["total_gib"]["without_checkpointing"]
    assert not (tmp_path / "run").exists()
