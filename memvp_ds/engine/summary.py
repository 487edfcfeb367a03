"""The two blocks a run prints on rank 0: what it is about to do, and what it did and where the results are."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from memvp_ds.run_folder import RunFolder


def trainable_counts(model) -> Dict[str, int]:
    """Trainable parameters per module (the first two name components, e.g. ``strategy.projector``); full
    sizes also when ZeRO-3 has partitioned them."""
    counts: Dict[str, int] = {}
    for name, param in model.trainable_parameters().items():
        module = ".".join(name.split(".")[:2])
        counts[module] = counts.get(module, 0) + (param.ds_numel if hasattr(param, "ds_numel") else param.numel())
    return counts


def start_summary(cfg, plan, world_size: int, model, resume_from: Optional[str]) -> str:
    counts = trainable_counts(model)
    train = cfg.train
    lines = [
        f"run: {train.mode} of {cfg.model.strategy} on {world_size} rank(s); output: {os.path.abspath(train.output_dir)}",
        f"data: {plan.train_samples} training samples, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps "
        f"in all, {plan.warmup_steps} warm-up",
        f"batch: global {train.global_batch(world_size)} = {train.micro_batch_size} micro x {train.grad_accum_steps} "
        f"accum x {world_size} ranks; lr {train.lr(world_size):.3g} (blr {train.blr:g} x global batch / 256)",
        "micro-batches: " + (f"packed into rows of up to {cfg.data.max_seq_len} text positions (data.packing)"
                             if cfg.data.packing else "one right-padded row per sample (data.packing=false)"),
        f"trainable parameters: {sum(counts.values()):,} ("
        + ", ".join(f"{module} {count:,}" for module, count in counts.items()) + ")",
    ]
    if resume_from:
        lines.append(f"resuming from {resume_from}")
    return "\n".join("  " + line for line in ["start:"] + lines)


def end_summary(cfg, status: str, step: int, total_steps: int, losses: List[float], metrics: Dict[str, float],
                exported: bool) -> str:
    run = RunFolder(os.path.abspath(cfg.train.output_dir))
    lines = [f"status: {status} at step {step}/{total_steps}"]
    if losses:
        lines.append(f"train loss: {losses[-1]:.4f} (first logged {losses[0]:.4f})")
    if metrics:
        lines.append("eval: " + ", ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in sorted(metrics.items())))
    if exported:
        lines.append(f"export: {run.export}")
    if cfg.train.mode != "train" and status == "complete":
        lines.append(f"search result: {run.search_result}")
    lines.append(f"checkpoints: {run.checkpoints}")
    if cfg.logging.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {run.tensorboard}")
    return "\n".join("  " + line for line in ["end:"] + lines)
