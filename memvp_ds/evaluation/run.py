"""Evaluating a model on a split: generation on every rank, gathering, task metrics, result files."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from memvp_ds.atomic_io import atomic_open, write_json_atomic
from memvp_ds.data.collate import SampleEncoder, build_encoder
from memvp_ds.data.prompts import prompt_format
from memvp_ds.data.stream import ErrorBudget, iterate_eval_batches
from memvp_ds.distributed import all_gather_objects
from memvp_ds.evaluation.generate import generate_records


def task_metrics(prompt_format_name: str, records: List[Dict[str, Any]]) -> Dict[str, float]:
    """The format's scores of generated answers (data/prompts.py: PromptFormat.metrics)."""
    return prompt_format(prompt_format_name).metrics(records)


def answer_tokens(cfg) -> int:
    """New tokens per answer: ONE for ScienceQA (the official protocol reads the token after 'The answer
    is'), eval.max_new_tokens for the free-form formats."""
    return prompt_format(cfg.data.prompt_format).answer_tokens(cfg.eval)


def eval_encoder(cfg, tokenizer, visual_positions: int = 0) -> SampleEncoder:
    """Evaluation prompts: no target; the ScienceQA context carries the caption when eval.use_caption.
    ``visual_positions``: the strategy's ``prefix_positions`` (several images per sample go in the text)."""
    return build_encoder(cfg, tokenizer, with_target=False, use_caption=cfg.eval.use_caption,
                         visual_positions=visual_positions)


def evaluate_split(cfg, model, tokenizer, urls: List[str], rank: int, world_size: int,
                   stop_when_done: bool = True, device: Optional[torch.device] = None):
    """(records, metrics) for one split; metrics only on rank 0 (others get {})."""
    encoder = eval_encoder(cfg, tokenizer, model.strategy.prefix_positions())
    batches = iterate_eval_batches(urls, encoder, cfg.eval.batch_size, tokenizer.pad_token_id, rank, world_size,
                                   cfg.eval.max_samples, left_pad=True, budget=ErrorBudget.of(cfg.data))
    dtype = next(p for p in model.parameters()).dtype
    records = generate_records(model, batches, tokenizer, answer_tokens(cfg), stop_when_done, dtype, device,
                               show_progress=rank == 0)
    gathered = [r for part in all_gather_objects(records) for r in part]
    if rank != 0:
        return gathered, {}
    order = {}
    for record in gathered:
        order.setdefault(record["id"], record)
    records = list(order.values())
    form = prompt_format(cfg.data.prompt_format)
    return records, {**form.metrics(records), **form.protocol(cfg.eval, records)}


def predictions_path(out_dir: str, split: str) -> str:
    """The predictions JSONL that ``write_results`` writes for ``split``."""
    return os.path.join(out_dir, f"predictions_{split}.jsonl")


def write_results(out_dir: str, split: str, records: List[Dict[str, Any]], metrics: Dict[str, float],
                  provenance: Optional[Dict[str, Any]] = None) -> None:
    """Predictions JSONL and metrics JSON; with ``provenance`` (what was scored, on what, by which code) beside
    them as provenance_<split>.json."""
    os.makedirs(out_dir, exist_ok=True)
    if provenance is not None:
        write_json_atomic(os.path.join(out_dir, f"provenance_{split}.json"), provenance)
    with atomic_open(predictions_path(out_dir, split)) as f:
        for record in records:
            f.write(json.dumps({k: record.get(k) for k in ("id", "prompt", "output", "parsed", "gold")}) + "\n")
    write_json_atomic(os.path.join(out_dir, f"metrics_{split}.json"), metrics)
