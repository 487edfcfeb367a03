"""The training loop: DeepSpeed engine around the model, streamed batches, schedule, checkpoints, logs."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from memvp_ds.config import Config, to_yaml
from memvp_ds.data.collate import SampleEncoder, build_encoder
from memvp_ds.data.prompts import IGNORE_INDEX
from memvp_ds.data.stream import ErrorBudget, LoaderOptions, build_train_loader, close_loader, iterate_eval_batches
from memvp_ds.engine.checkpoint import CheckpointManager
from memvp_ds.engine.deepspeed_config import zero_stage
from memvp_ds.engine.preflight import preflight
from memvp_ds.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier
from memvp_ds.engine.metrics import (
    MatmulFlopCounter,
    attention_flops_per_position,
    max_memory_gb,
    peak_flops,
    resident_memory_gb,
)
from memvp_ds.engine.search_run import build_search_run
from memvp_ds.engine.summary import end_summary, start_summary
from memvp_ds.engine.zero3_gradients import clear_gradient_partitions
from memvp_ds.engine.zero3_leaves import mark_frozen_blocks_as_zero3_leaves
from memvp_ds.engine.zero_state import export_trainable
from memvp_ds.evaluation.run import evaluate_split
from memvp_ds.progress import progress
from memvp_ds.run_folder import RunFolder
from memvp_ds.scalar_logger import ScalarLogger
from memvp_ds.schedule import lr_at
from memvp_ds.model import build_model
from memvp_ds.search import build_search, skippable_layers
from memvp_ds.stop_signals import STOP, StopRequested, outcome

log = logging.getLogger("memvp_ds")
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "image_features", "images", "has_image", "segment_ids")
"""Batch entries the model takes; a batch carries either image_features or images (online vision tower)."""


def _param_groups(model, weight_decay: float):
    """Weight decay on matrices and memory tensors, none on biases."""
    params = model.trainable_parameters()
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _without_padding_labels(batches: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """Eval batches with the loss removed from the filler rows that keep ranks in step (``valid`` False)."""
    for raw in batches:
        raw["labels"][~raw["valid"]] = IGNORE_INDEX
        yield raw


@dataclass
class _Window:
    """What the micro-batches since the last log line added up to on this rank."""

    loss: float = 0.0
    tokens: int = 0
    samples: int = 0
    positions: int = 0
    matmul_flops: float = 0.0
    skipped: int = 0
    steps: int = 0
    start: float = field(default_factory=time.time)

    def add_micro_batch(self, loss: float, raw: Dict[str, Any], prefix_positions: int) -> None:
        """``prefix_positions``: what the strategy puts in front of every padded row inside the model (a packed
        row, or a multi-image sample's text, already holds them), computed in every layer like text. Tokens are
        text tokens (negative ids mark visual positions in the text)."""
        self.loss += loss
        self.tokens += int((raw["attention_mask"].bool() & (raw["input_ids"] >= 0)).sum())
        rows, length = raw["input_ids"].shape
        in_sequence = "segment_ids" in raw or raw["has_image"].dim() == 2
        self.positions += rows * (length + (0 if in_sequence else prefix_positions))
        self.samples += len(raw["keys"])  # a packed batch has fewer rows than samples
        self.skipped += raw["skipped_samples"]


class _StopWhileWaiting(Exception):
    """A stop signal arrived while the main process waited for a batch."""


class _StopFlag:
    """SIGUSR1 (Slurm's pre-kill warning), SIGTERM or SIGINT (Ctrl-C): save at the next step boundary and exit
    cleanly (memvp_ds.stop_signals keeps the record, from the entry point's first line).

    Slurm signals the whole process group; loader workers ignore these signals (stream.ignore_stop_signals),
    so the main process decides. A single process waiting for data is interrupted at once (it saves the last
    completed step); with several ranks the signal waits for the step boundary, where every rank agrees on it
    collectively: one rank leaving a wait alone would meet the others in mismatched collectives.
    """

    def __init__(self, interrupt_waits: bool):
        self._interrupt_waits = interrupt_waits
        STOP.install()  # already in place under memvp-train; a Trainer used directly gets it here

    @property
    def raised(self) -> Optional[str]:
        return STOP.raised

    def next_batch(self, batches: Iterator[Dict[str, Any]]) -> Dict[str, Any]:
        if not self._interrupt_waits:
            return next(batches)
        try:
            with STOP.immediate():
                return next(batches)
        except StopRequested as stop:
            raise _StopWhileWaiting(stop.signal_name) from None


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.out = cfg.train.output_dir
        self.run = RunFolder(self.out)
        # Pre-flight first: configs, DeepSpeed JSON, shards, manifest, output folder, tokenizer, checkpoint.
        # Then the heavy parts.
        checked = preflight(cfg, dist_info.world_size)
        self.ds_config, self.plan, self.tokenizer = checked.ds_config, checked.data, checked.tokenizer
        self.resume_from = checked.resume_from
        self.checkpoints = CheckpointManager(cfg, dist_info, self.resume_from)
        self.engine = self._build_engine()
        self.model = self.engine.module
        self.search = build_search_run(
            build_search(cfg, self.model, self.plan.total_steps), dist_info=dist_info, run=self.run,
            seed=cfg.train.seed, max_batches=cfg.search.heldout_batches, loss_of=self._heldout_loss,
            heldout_batches=lambda: self._eval_batches(cfg.train.micro_batch_size, None))
        # What loading cost each rank: ZeRO-3 should hold a fraction of the frozen model, ZeRO-2 all of it.
        self.load_memory_gb = {"load_peak_gb": max_memory_gb(), "after_load_gb": resident_memory_gb()}

    def _build_engine(self):
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical strategy init on every rank
        self._hf_ds_config = None
        if zero_stage(self.ds_config) == 3 and cfg.model.llm.path is not None:
            # Kept alive on purpose: transformers then loads the checkpoint partitioned (zero.Init) instead
            # of materialising all of it on every rank. Randomly initialised inline models (tests, demos)
            # are built whole so that their weights do not depend on the ZeRO stage; initialize partitions them.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = build_model(cfg.model, skippable_layers(cfg))
        if cfg.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if zero_stage(self.ds_config) == 3:
            leaves = mark_frozen_blocks_as_zero3_leaves(model)
            log.info("ZeRO-3 gathers %d frozen decoder blocks whole (leaf modules)", leaves)
        optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr(self.dist.world_size),
            betas=tuple(cfg.train.adam_betas), **({"fused": True} if torch.cuda.is_available() else {}),
        )
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        torch.manual_seed(cfg.train.seed + self.dist.rank)  # dropout masks differ per rank
        return engine

    # -- data -----------------------------------------------------------------------------------------
    def _encoder(self, with_target: bool = True) -> SampleEncoder:
        return build_encoder(self.cfg, self.tokenizer, with_target, visual_positions=self.model.strategy.prefix_positions())

    def _train_loader(self, skip_micro_batches: int):
        options = LoaderOptions.of(self.cfg, self.tokenizer.pad_token_id, self.dist.rank, self.dist.world_size,
                                   self.plan.shard_samples, self.model.strategy.prefix_positions())
        return build_train_loader(self.plan.train_urls, self._encoder(), options, skip_micro_batches)

    def _eval_batches(self, batch_size: int, max_samples: Optional[int]) -> Iterator[Dict[str, Any]]:
        """This rank's share of the val split, right-padded; the filler rows that keep ranks in step carry no
        loss."""
        return _without_padding_labels(iterate_eval_batches(
            self.plan.val_urls, self._encoder(), batch_size, self.tokenizer.pad_token_id, self.dist.rank,
            self.dist.world_size, max_samples, left_pad=False, budget=ErrorBudget.of(self.cfg.data)))

    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        device = self.engine.device
        moved = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
        if "image_features" in moved:  # pixels stay uint8: the vision tower normalises them in fp32
            moved["image_features"] = moved["image_features"].to(self._compute_dtype())
        return moved

    def _compute_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.cfg.train.precision]

    # -- loop -----------------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        """Run to the planned step (or to a stop signal, after saving); one finish path for every outcome."""
        step, micro_batches, state = self.checkpoints.resume(self.model, self.engine.optimizer)
        if state:
            self.search.load_state_dict(state)
        if self.dist.is_main:
            self.run.write_config(to_yaml(self.cfg))
        # purge_step drops events that a crashed run logged past the checkpoint it resumes from.
        logger = ScalarLogger(self.run.tensorboard, self.cfg.logging.tensorboard and self.dist.is_main,
                              purge_step=step + 1 if step else None)
        if self.dist.is_main:
            log.info("\n%s", start_summary(self.cfg, self.plan, self.dist.world_size, self.model, self.resume_from))
        metrics: Dict[str, float] = {}
        try:
            per_rank = all_gather_objects(self.load_memory_gb)
            logger.log({f"mem/rank{r}_{key}": gb for r, row in enumerate(per_rank) for key, gb in row.items()}, step)
            status, step, losses = self._loop(step, micro_batches, logger)
            if status == "complete":
                metrics = self._finish(step, logger)
            self._write_status(status, step)
        finally:
            logger.close()
        if self.dist.is_main:
            exported = status == "complete" and self.cfg.train.mode == "train"
            log.info("\n%s", end_summary(self.cfg, status, step, self.plan.total_steps, losses, metrics, exported))
        return {"status": status, "step": step, "losses": losses}

    def train_step(self, step: int, lr: float, batches: Iterator[Dict[str, Any]], stop: "_StopFlag",
                   window: "_Window", flop_counter: Optional[MatmulFlopCounter]) -> Tuple[bool, Optional[float]]:
        """Optimizer step ``step`` + 1 over ``train.grad_accum_steps`` micro-batches: whether every loss was
        finite, and the gradient norm. Raises _StopWhileWaiting (single process) if stopped mid-step.
        ``flop_counter`` (when MFU is logged) counts the matmul work of each forward into the window."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.search.before_step(step)
        finite, accum = True, self.cfg.train.grad_accum_steps
        for _ in range(accum):
            raw = stop.next_batch(batches)
            with flop_counter.counting() if flop_counter else contextlib.nullcontext():
                loss = self.engine(**self._to_device(raw)).loss
            window.matmul_flops += flop_counter.take() if flop_counter else 0.0
            self.engine.backward(loss)
            self.engine.step()
            finite = finite and math.isfinite(loss.item())
            window.add_micro_batch(loss.item() / accum, raw, self.model.strategy.prefix_positions())
        grad_norm = self.engine.get_global_grad_norm()
        clear_gradient_partitions(self.engine.optimizer)
        return finite, grad_norm

    def _loop(self, step: int, micro_batches: int, logger: ScalarLogger) -> Tuple[str, int, List[float]]:
        """Optimizer steps until the plan's last one ("complete"), a stop signal ("preempted"; "interrupted"
        for Ctrl-C) or too many non-finite losses in a row ("diverged")."""
        cfg, plan = self.cfg, self.plan
        stop = _StopFlag(interrupt_waits=self.dist.world_size == 1)
        batches = iter(self._train_loader(micro_batches))
        nonfinite = 0  # optimizer steps in a row whose loss was not finite
        base_lr, peak = cfg.train.lr(self.dist.world_size), peak_flops(cfg.logging.peak_tflops)
        window = _Window()
        flop_counter = MatmulFlopCounter(self.model) if peak else None
        losses: List[float] = []
        bar = progress(total=plan.total_steps, initial=step, enabled=self.dist.is_main, desc="train", unit="steps")
        self.engine.train()
        try:
            while step < plan.total_steps:
                lr = lr_at(step, base_lr, plan.warmup_steps, plan.total_steps, cfg.train.min_lr)
                try:
                    finite, grad_norm = self.train_step(step, lr, batches, stop, window, flop_counter)
                except _StopWhileWaiting:  # only a single process gets here (see _StopFlag)
                    self._save(step, micro_batches)
                    log.warning("stop signal (%s) while waiting for data: step %d saved, exiting to resume later",
                                stop.raised, step)
                    return outcome(stop.raised)[0], step, losses
                step, micro_batches = step + 1, micro_batches + cfg.train.grad_accum_steps
                window.steps += 1
                logger.log(self.search.after_step(step), step)
                if step % cfg.logging.log_interval == 0 or step == plan.total_steps:
                    losses.append(self._log_window(logger, window, step, lr, grad_norm, peak))
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
                    window = _Window()
                bar.update(1)
                # One collective for both: a stop signal on any rank, a non-finite loss on any rank.
                flags = all_reduce_sum(torch.tensor([stop.raised is not None, not finite], dtype=torch.float64))
                stopping, unhealthy = bool(flags[0] > 0), bool(flags[1] > 0)
                nonfinite = nonfinite + 1 if unhealthy else 0
                if self.checkpoints.due(step, plan.total_steps, stopping):
                    if unhealthy:  # weights that produced a non-finite loss must not become `latest`
                        log.warning("step %d: non-finite loss; checkpoint not written, latest stays the last healthy one",
                                    step)
                    else:
                        self._save(step, micro_batches)
                if nonfinite >= cfg.train.max_nonfinite_steps:
                    log.error("%d optimizer steps in a row (up to step %d) had a non-finite loss: stopping "
                              "(train.max_nonfinite_steps). Lower the learning rate or check the data; the last "
                              "healthy checkpoint is the one `latest` names", nonfinite, step)
                    return "diverged", step, losses
                if stopping:
                    log.warning("stop signal (%s) at step %d: checkpoint saved, exiting to resume later",
                                stop.raised, step)
                    return outcome(stop.raised)[0], step, losses
                if cfg.eval.interval and step % cfg.eval.interval == 0 and plan.val_urls:
                    logger.log(self.evaluate_loss(), step)
            return "complete", step, losses
        finally:
            close_loader(batches)
            bar.close()

    def _finish(self, step: int, logger: ScalarLogger) -> Dict[str, float]:
        """After the last step: a search writes search.json; a training run evaluates and exports. Returns
        the final evaluation metrics (none for a search or without val shards)."""
        if self.search.finish(step):
            return {}
        metrics = self.evaluate_loss() if self.plan.val_urls else {}
        logger.log(metrics, step)
        export_trainable(self.model, self.dist, self.cfg, self.run.export, feature_recipe=self.plan.feature_recipe,
                         provenance=self.checkpoints.provenance)
        return metrics

    def _log_window(self, logger, window: "_Window", step, lr, grad_norm, peak) -> float:
        """Average the window over ranks, log it, and return the mean loss (all ranks get the same)."""
        totals = all_reduce_sum(torch.tensor(
            [window.loss, window.tokens, window.samples, window.positions, window.skipped, window.matmul_flops],
            dtype=torch.float64))
        elapsed = max(time.time() - window.start, 1e-9)
        loss = totals[0].item() / self.dist.world_size / max(window.steps, 1)
        memory = all_gather_objects(max_memory_gb())
        scalars = {
            "train/loss": loss, "train/lr": lr,
            "train/tokens_per_s": totals[1].item() / elapsed, "train/samples_per_s": totals[2].item() / elapsed,
            "mem/max_allocated_gb": max(memory), "data/skipped_samples": totals[4].item(),
            **{f"mem/rank{rank}_max_allocated_gb": gb for rank, gb in enumerate(memory)},
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        if peak:
            # Attention context per position: the row length when padded, about a sample's length when packed.
            context = int(window.positions / max(window.samples, 1))
            flops = totals[5].item() + attention_flops_per_position(self.model, context) * totals[3].item()
            scalars["train/mfu"] = flops / elapsed / (peak * self.dist.world_size)
        logger.log(scalars, step)
        log.info("step %d: %s", step, ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in scalars.items()))
        return loss

    def _save(self, step: int, micro_batches: int) -> None:
        self.checkpoints.save(self.model, self.engine.optimizer, step, micro_batches, self.search.state_dict())

    def _write_status(self, status: str, step: int) -> None:
        if self.dist.is_main:
            self.run.write_status(status, step, self.plan.total_steps)
        barrier()

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _heldout_loss(self, batches: Iterable[Dict[str, Any]], dropout: bool) -> float:
        """``_token_weighted_loss`` without gradient, dropout on (training mode) or off: a search's reward."""
        if dropout:
            return self._token_weighted_loss(batches)
        self.engine.eval()
        loss = self._token_weighted_loss(batches)
        self.engine.train()
        return loss

    def _token_weighted_loss(self, batches: Iterable[Dict[str, Any]]) -> float:
        """Mean loss per answer token over ``batches`` on every rank: the same on any number of ranks, and
        a padding batch (no labels) counts for nothing."""
        total = torch.zeros(2, dtype=torch.float64)
        for raw in batches:
            loss = self.engine(**self._to_device(raw)).loss.float().item()
            tokens = int((raw["labels"][:, 1:] >= 0).sum())
            total += torch.tensor([loss * tokens, tokens], dtype=torch.float64)
        total = all_reduce_sum(total)
        return (total[0] / total[1].clamp(min=1)).item()

    @torch.no_grad()
    def evaluate_loss(self) -> Dict[str, float]:
        """Validation loss (token-weighted, identical on any number of ranks) and answer accuracy."""
        self.engine.eval()
        batches = self._eval_batches(self.cfg.eval.batch_size, self.cfg.eval.max_samples)
        metrics = {"eval/loss": self._token_weighted_loss(batches)}
        # Answer accuracy by greedy generation. Under ZeRO-3 every rank must make the same number of forward
        # calls (parameters are gathered collectively), so no rank may stop decoding early there.
        _, task = evaluate_split(self.cfg, self.model, self.tokenizer, self.plan.val_urls, self.dist.rank,
                                 self.dist.world_size, stop_when_done=zero_stage(self.ds_config) != 3,
                                 device=self.engine.device)
        metrics.update({f"eval/{k}": v for k, v in task.items() if k.startswith("acc/")})
        self.engine.train()
        return metrics
