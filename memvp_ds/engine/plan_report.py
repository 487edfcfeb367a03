"""The plan of a run before it starts (memvp-train --dry-run): every check that needs no model weights, and
what the run will do, as one JSON-able dict. Loads no model and starts no process group."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from memvp_ds.config import Config
from memvp_ds.data.collate import SampleEncoder, build_encoder
from memvp_ds.data.prompts import IGNORE_INDEX, prompt_format
from memvp_ds.data.shard_format import read_raw_samples
from memvp_ds.engine.deepspeed_config import zero_stage
from memvp_ds.engine.memory_plan import memory_plan, model_shape
from memvp_ds.engine.preflight import DRY_RUN, preflight
from memvp_ds.evaluation.run import eval_encoder
from memvp_ds.recipes import resolve_ds_config


def dry_run_json(cfg: Config, world_size: Optional[int] = None, gpu_memory: Optional[int] = None) -> str:
    """--dry-run's output: the plan as one JSON object, for ``world_size`` ranks (default: $WORLD_SIZE or 1);
    with ``gpu_memory`` (bytes per GPU) the memory estimate says whether the run fits."""
    import json

    from memvp_ds.config import check_at_least

    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    check_at_least("--world-size", world_size, 1)
    return json.dumps(dry_run_report(cfg, world_size, gpu_memory), indent=2)


def _decode(tokenizer, ids: List[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _first_sample(urls: List[str]) -> Optional[Dict[str, Any]]:
    """The first sample of the first local shard (None for remote URLs, which a dry run does not read)."""
    if not urls or not os.path.isfile(urls[0]):
        return None
    return next(read_raw_samples(urls[0]), None)


def _training_example(encoder: SampleEncoder, raw: Dict[str, Any]) -> Dict[str, Any]:
    """A training sample split as the loss sees it: prompt = tokens without loss, target = tokens with loss;
    with several images per sample in the text, ``images_at``: where each image's positions start."""
    sample = encoder(raw)
    tokenizer = encoder.tokenizer
    text = [(t, label) for t, label in zip(sample.input_ids, sample.labels) if t >= 0]
    prompt = [t for t, label in text if label == IGNORE_INDEX]
    target = [t for t, label in text if label != IGNORE_INDEX]
    example = {"key": sample.key, "prompt": _decode(tokenizer, prompt), "target": _decode(tokenizer, target),
               "prompt_tokens": len(prompt), "target_tokens": len(target),
               "starts_with_bos": tokenizer.bos_token_id is not None and text[0][0] == tokenizer.bos_token_id,
               "ends_with_eos": sample.input_ids[-1] == tokenizer.eos_token_id}
    if encoder.positions_per_image:
        example["images_at"] = [i for i, t in enumerate(sample.input_ids)
                                if t < 0 and (-1 - t) % encoder.positions_per_image == 0]
    return example


def dry_run_report(cfg: Config, world_size: int, gpu_memory: Optional[int] = None) -> Dict[str, Any]:
    """Check the config, the DeepSpeed JSON, the shards against the manifest, the tokenizer and the output
    folder, and describe the run: its size and schedule, the shards each split reads, the first training
    sample as the model will see it and the GPU memory a rank needs (engine/memory_plan.py; whether it fits
    in ``gpu_memory`` bytes). Raises ConfigError (or FileNotFoundError) naming the problem."""
    checked = preflight(cfg, world_size, DRY_RUN)
    ds, plan, tokenizer, data = checked.ds_config, checked.data, checked.tokenizer, cfg.data
    shape = model_shape(cfg.model)  # on the meta device: no weights are read
    # The training run's encoder: features, or images for an online tower; images' positions in the text.
    train_encoder = build_encoder(cfg, tokenizer, visual_positions=shape.prefix_positions)
    first = _first_sample(plan.train_urls)
    report: Dict[str, Any] = {
        "world_size": world_size,
        "global_batch": cfg.train.global_batch(world_size),
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "train_samples": plan.train_samples,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps,
        "lr": cfg.train.lr(world_size),
        "min_lr": cfg.train.min_lr,
        "precision": cfg.train.precision,
        "ds_config": {"path": os.path.abspath(resolve_ds_config(cfg.train.ds_config)), "zero_stage": zero_stage(ds),
                      "bf16": ds.get("bf16"), "fp16": ds.get("fp16")},
        "shards": {split: shards.coverage() for split, shards in plan.splits.items()},
        "feature_recipe": {k: plan.feature_recipe.get(k) for k in ("model", "tokens", "dim", "dtype")},
        "tokenizer": {"path": checked.tokenizer_dir, "bos": tokenizer.bos_token, "eos": tokenizer.eos_token},
        "prompt_format": data.prompt_format,
        "output_dir": checked.output_dir,
        "example": _training_example(train_encoder, first) if first is not None else None,
    }
    evaluation: Dict[str, Any] = {"split": cfg.eval.split, **prompt_format(data.prompt_format).settings(cfg.eval)}
    eval_split = plan.splits.get(cfg.eval.split)
    eval_first = _first_sample(eval_split.urls) if eval_split else None
    if eval_first is not None:
        prompt_ids = eval_encoder(cfg, tokenizer, shape.prefix_positions)(eval_first).input_ids
        evaluation["example_prompt"] = _decode(tokenizer, [t for t in prompt_ids if t >= 0])
    report["eval"] = evaluation
    report["memory"] = memory_plan(cfg, ds, world_size, gpu_memory, shape)
    return report
