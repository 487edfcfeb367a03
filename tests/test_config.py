import os

import pytest

from memvp_ds import ConfigError, build_model, load_config
from memvp_ds.model.strategies import STRATEGIES
from tests.conftest import CONFIGS, tiny_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.model.strategy in STRATEGIES


def test_official_recipe_values():
    cfg = load_config(str(CONFIGS / "memvp_llama13b_sqa.yaml"))
    assert cfg.model.memvp.memory_rows == 400 and cfg.model.memvp.memory_scale == 0.1
    assert cfg.train.epochs == 20 and cfg.train.warmup_epochs == 2 and cfg.train.weight_decay == 0.02
    # 8 GPUs x 4 = 32 -> 9e-3 * 32 / 256
    assert cfg.train.lr(world_size=8) == pytest.approx(9e-3 * 32 / 256)
    assert load_config(str(CONFIGS / "memvp_llama7b_sqa.yaml")).model.memvp.memory_rows == 320


def test_shipped_recipes_read_every_shard_of_the_extraction():
    """No hand-written shard ranges: each split uses every shard the manifest in data.shards lists."""
    for path in sorted(CONFIGS.glob("*_sqa.yaml")):
        cfg = load_config(str(path))
        # LaVIN runs CLIP online (shards with images) and its scripts evaluate without captions.
        lavin = cfg.model.strategy == "lavin"
        assert cfg.data.shards == ("data/sqa_shards_images" if lavin else "data/sqa_shards"), path.name
        assert (cfg.data.train_shards, cfg.data.val_shards, cfg.data.test_shards) == (None, None, None), path.name
        assert cfg.eval.use_caption != lavin and cfg.data.prompt_format == "qcm_a"


def test_fp16_gives_deepspeed_dynamic_loss_scaling_like_the_official_gradscaler(tmp_path):
    """torch.cuda.amp.GradScaler defaults: init 2**16, x0.5 on every overflow, x2 after 2000 clean steps."""
    from memvp_ds.engine.deepspeed_config import build_ds_config

    cfg = load_config(str(CONFIGS / "memvp_llama13b_sqa.yaml"), ["train.precision=fp16", "model.llm.dtype=float16"])
    ds = build_ds_config(cfg, world_size=8)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000,
                          "hysteresis": 1, "min_loss_scale": 1}
    assert ds["bf16"] == {"enabled": False} and ds["train_batch_size"] == 32
    assert build_ds_config(load_config(str(CONFIGS / "memvp_llama13b_sqa.yaml")), 8)["fp16"] == {"enabled": False}
    # DeepSpeed's own parser reads it as dynamic scaling with those values
    from deepspeed.runtime.precision_config import get_float16_config

    parsed = get_float16_config(ds)
    assert parsed.enabled and parsed.loss_scale == 0 and parsed.initial_dynamic_scale() == 2**16
    assert (parsed.loss_scale_window, parsed.hysteresis, parsed.min_loss_scale) == (2000, 1, 1)
    # a value written in the JSON wins over the default
    custom = tmp_path / "ds.json"
    custom.write_text('{"fp16": {"enabled": "auto", "initial_scale_power": 12}, "zero_optimization": {"stage": 2}}')
    ds = build_ds_config(load_config(str(CONFIGS / "memvp_llama13b_sqa.yaml"),
                                     ["train.precision=fp16", f"train.ds_config={custom}"]), 8)
    assert ds["fp16"]["initial_scale_power"] == 12 and ds["fp16"]["loss_scale_window"] == 2000


def test_a_relative_ds_config_is_found_from_any_directory(tmp_path, monkeypatch):
    from memvp_ds.recipes import resolve_ds_config
    from tests.helpers import REPO

    monkeypatch.chdir(tmp_path)
    shipped = os.path.join(REPO, "ds_configs", "zero3.json")  # a checkout: the one copy at the top
    assert resolve_ds_config("ds_configs/zero3.json") == resolve_ds_config("zero3") == shipped
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text("{}")
    assert resolve_ds_config("ds_configs/zero3.json") == "ds_configs/zero3.json"  # the working directory first


def test_overrides_apply_last():
    cfg = tiny_config("memvp", "train.blr=0.25", "model.memvp.memory_rows=32")
    assert cfg.train.blr == 0.25 and cfg.model.memvp.memory_rows == 32


def test_unknown_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        tiny_config("memvp", "train.lerning_rate=1")
    assert "train.lerning_rate" in str(err.value) and "blr" in str(err.value) and "micro_batch_size" in str(err.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  strategyy: memvp\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value) and "model.strategyy" in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as err:
        tiny_config("memvp", "train.micro_batch_size=four")
    assert "train.micro_batch_size" in str(err.value)


def test_unknown_strategy_lists_choices():
    with pytest.raises(ConfigError, match="apt.*dvp.*input_prefix.*memvp"):
        tiny_config("memvp", "model.strategy=nonsense")


def test_more_visual_tokens_than_memory_rows_is_rejected():
    with pytest.raises(ConfigError, match="memory_rows"):
        tiny_config("memvp", "model.visual_tokens=64")


def test_missing_llm_path_is_clear(tmp_path):
    cfg = load_config(str(CONFIGS / "memvp_llama7b_sqa.yaml"), [f"model.llm.path={tmp_path}/absent"])
    with pytest.raises(ConfigError, match="model.llm.path.*absent.*not a directory"):
        build_model(cfg.model)


def test_search_modes_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="train.mode.*not one of"):
        tiny_config("memvp", "train.mode=search")
    with pytest.raises(ConfigError, match="dvp_search needs model.strategy=dvp"):
        tiny_config("memvp", "train.mode=dvp_search")
    with pytest.raises(ConfigError, match="dvp_search needs.*layer unset"):
        tiny_config("dvp", "train.mode=dvp_search")
    with pytest.raises(ConfigError, match="model.dvp.layer: set it"):
        tiny_config("dvp", "model.dvp.layer=null")
    with pytest.raises(ConfigError, match="held-out.*data.val_shards"):
        tiny_config("memvp", "train.mode=das_search", "data.train_shards=x.tar")
    with pytest.raises(ConfigError, match="das_search chooses the skipped layers"):
        tiny_config("memvp", "train.mode=das_search", "model.skip.layers=[0]")


def test_from_search_fills_the_choice_and_an_explicit_value_wins(tmp_path):
    (tmp_path / "search.json").write_text('{"dvp_layer": 0, "skip_layers": [1]}')
    cfg = tiny_config("dvp", "model.dvp.layer=null", f"model.dvp.from_search={tmp_path}")
    assert cfg.model.dvp.layer == 0
    assert tiny_config("dvp", f"model.dvp.from_search={tmp_path}").model.dvp.layer == 1  # the YAML sets 1
    assert tiny_config("memvp", f"model.skip.from_search={tmp_path}").model.skip.layers == [1]


def test_every_option_is_documented_and_listed_by_help_config():
    """The docstrings are the reference: every leaf option of the run schema has one, and --help-config
    prints each key with its default."""
    import subprocess
    import sys

    from memvp_ds.config import describe_fields
    from memvp_ds.schema import RunConfig

    rows = list(describe_fields(RunConfig))
    assert len(rows) > 60
    assert [key for key, _, _, doc in rows if not doc] == []
    proc = subprocess.run([sys.executable, "memvp_ds/train.py", "--help-config"], cwd=CONFIGS.parents[2],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for key, _, default, _ in rows:
        assert f"{key} (" in proc.stdout and f"default: {default!r}" in proc.stdout, key
    assert "model.memvp.memory_rows (int, default: 400)" in proc.stdout
    assert "search.das.eta (float, default: 10.0)" in proc.stdout


def test_the_typed_schema_declares_every_registered_option_group():
    """Each strategy's options, layer skipping, the vision tower, LoRA and each search have their typed field
    (a strategy registered without its line would otherwise lose its options silently)."""
    import dataclasses
    import typing

    from memvp_ds.model.strategies import STRATEGIES
    from memvp_ds.schema import RunConfig, RunModelConfig, RunSearchConfig, option_groups

    model_types = typing.get_type_hints(RunModelConfig)
    for name, strategy in STRATEGIES.items():
        if strategy.options is not None:
            assert model_types.get(name) is strategy.options, name
    assert set(option_groups(RunModelConfig)) == {n for n, s in STRATEGIES.items() if s.options} | {
        "skip", "vision", "lora"}
    assert option_groups(RunSearchConfig) == ["dvp", "das"]
    cfg = tiny_config("memvp")
    assert isinstance(cfg, RunConfig) and type(cfg.model.memvp) is model_types["memvp"]
    assert all(hasattr(getattr(cfg.model, g), "validate") for g in option_groups(RunModelConfig))
    assert {f.name for f in dataclasses.fields(RunConfig)} >= {"model", "data", "train", "eval", "logging", "search"}
