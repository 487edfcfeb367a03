"""Deriving the DeepSpeed JSON from our config: the shipped ds_configs/*.json (memvp_ds/recipes) hold only
ZeRO settings and "auto"s."""

from __future__ import annotations

import json
from typing import Any, Dict

from memvp_ds.config import Config, ConfigError
from memvp_ds.recipes import resolve_ds_config


def _fill(ds: Dict[str, Any], key_path: str, value: Any, ours: str, source: str) -> None:
    """Set ``key_path`` (dotted) to ``value`` where it is "auto" or absent; a different value is an error."""
    *parents, leaf = key_path.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current != "auto" and current != value:
        raise ConfigError(f"{source}: '{key_path}' is {current!r} but {ours} gives {value!r}; set it to \"auto\"")
    node[leaf] = value


FP16_DYNAMIC_LOSS_SCALE = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000,
                           "hysteresis": 1, "min_loss_scale": 1}
"""DeepSpeed fp16 settings equal to the official recipe's torch.cuda.amp.GradScaler defaults: dynamic
(loss_scale 0), start at 2**16, halve on every overflow (hysteresis 1), double after 2000 clean steps."""


def build_ds_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed JSON of train.ds_config with its "auto" values filled from the config."""
    cfg.train.check_min_lr(world_size)  # a relation that needs the world size: checked with the JSON
    try:
        path = resolve_ds_config(cfg.train.ds_config)
    except FileNotFoundError as err:  # a config value, so a config error (one line naming the option)
        raise ConfigError(str(err)) from None
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err}") from None
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: remove the '{section}' section; the optimizer and schedule come from train.*")
    train = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size", path)
    _fill(ds, "gradient_accumulation_steps", train.grad_accum_steps, "train.grad_accum_steps", path)
    _fill(ds, "train_batch_size", train.global_batch(world_size), "train.micro_batch_size x grad_accum x world", path)
    _fill(ds, "gradient_clipping", train.grad_clip, "train.grad_clip", path)
    _fill(ds, "bf16.enabled", train.precision == "bf16", "train.precision", path)
    _fill(ds, "fp16.enabled", train.precision == "fp16", "train.precision", path)
    if train.precision == "fp16":
        for key, value in FP16_DYNAMIC_LOSS_SCALE.items():
            ds["fp16"].setdefault(key, value)
    _check_search_without_offloaded_zero3_optimizer(ds, cfg.train.mode, path)
    if cfg.model.llm.quantization and zero_stage(ds) == 3:
        raise ConfigError(f"{path}: ZeRO-3 partitions every weight across the ranks, which bitsandbytes' quantised "
                          f"weights cannot be (model.llm.quantization={cfg.model.llm.quantization}); use zero2")
    # A client torch optimizer (AdamW) under ZeRO: DeepSpeed calls it "untested" but partitions it fine.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _check_search_without_offloaded_zero3_optimizer(ds: Dict[str, Any], mode: str, path: str) -> None:
    """A search leaves some trainable tensors unused in every step (DVP's inactive generators, DAS adapters
    of running layers). ZeRO-3 with an offloaded optimizer applies such a tensor's last gradient again
    (DeepSpeed 0.19); without offload the trainer clears it (memvp_ds/engine/zero3_gradients.py)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if mode != "train" and zero_stage(ds) == 3 and offload not in (None, "none"):
        raise ConfigError(f"{path}: zero_optimization.offload_optimizer with train.mode={mode}: DeepSpeed's offloaded "
                          "stage-3 optimizer re-applies the last gradient of tensors a search step leaves unused; "
                          "offload parameters only (ds_configs/zero3_offload.json) or use ZeRO-2")


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
