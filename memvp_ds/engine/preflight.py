"""Pre-flight: every check that runs before anything heavy (process group, model load, engine, data workers),
in one function that returns what it checked. Each failure is one line naming the option or file, instead of
a crash minutes or hours into a job.

memvp-train runs the ``launch`` stage before any process group exists (no torch needed: the DeepSpeed JSON,
the shards against their manifest); the Trainer runs the ``full`` stage on every rank with the real world
size; ``memvp-train --dry-run`` runs the ``dry_run`` stage, which leaves no trace (no output folder is
created, no checkpoint is looked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from memvp_ds.config import Config
from memvp_ds.data.plan import DataPlan, plan_data
from memvp_ds.data.prompts import prompt_format
from memvp_ds.engine.deepspeed_config import build_ds_config
from memvp_ds.run_folder import check_writable

LAUNCH, DRY_RUN, FULL = "launch", "dry_run", "full"


@dataclass
class CheckedPlan:
    """What pre-flight checked and derived; later stages fill more of it."""

    world_size: int
    ds_config: Dict[str, Any]
    """The DeepSpeed JSON with batch sizes, clipping and precision filled from the config."""
    data: DataPlan
    output_dir: Optional[str] = None
    """train.output_dir, absolute (not from the launch stage)."""
    tokenizer: Any = None
    tokenizer_dir: Optional[str] = None
    resume_from: Optional[str] = None
    """The complete checkpoint this run resumes from, checked to fit the config (full stage only)."""


def preflight(cfg: Config, world_size: int, stage: str = FULL) -> CheckedPlan:
    """Check the run ``cfg`` on ``world_size`` ranks up to ``stage`` (LAUNCH, DRY_RUN or FULL) and return the
    plan. Raises ConfigError (or FileNotFoundError) naming the problem."""
    checked = CheckedPlan(world_size, build_ds_config(cfg, world_size), plan_data(cfg, world_size))
    if stage == LAUNCH:
        return checked
    from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path

    checked.output_dir = check_writable(cfg.train.output_dir, "train.output_dir", create=stage == FULL)
    checked.tokenizer_dir = tokenizer_path(cfg)
    checked.tokenizer = load_tokenizer(checked.tokenizer_dir, cfg.model.llm.trust_remote_code)
    prompt_format(cfg.data.prompt_format).check_tokenizer(checked.tokenizer, checked.tokenizer_dir)
    if stage == DRY_RUN:
        return checked
    from memvp_ds.engine.checkpoint import check_compatible, find_resume_checkpoint
    from memvp_ds.model.llm import check_vocab_fits

    check_vocab_fits(len(checked.tokenizer), checked.tokenizer_dir, cfg.model.llm)
    checked.resume_from = find_resume_checkpoint(cfg.train.output_dir, cfg.train.resume)
    if checked.resume_from:
        check_compatible(checked.resume_from, cfg)
    return checked
