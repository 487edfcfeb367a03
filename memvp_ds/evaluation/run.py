"""Evaluating a model on a split: generation on every rank, gathering, task metrics, result files."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch

from memvp_ds.atomic_io import atomic_open, write_json_atomic
from memvp_ds.data.collate import SampleEncoder, build_encoder
from memvp_ds.data.stream import ErrorBudget, iterate_eval_batches
from memvp_ds.distributed import all_gather_objects
from memvp_ds.evaluation.generate import generate_records

log = logging.getLogger("memvp_ds.evaluation")


def task_metrics(prompt_format: str, records: List[Dict[str, Any]]) -> Dict[str, float]:
    from memvp_ds.evaluation.scienceqa import scienceqa_metrics
    from memvp_ds.evaluation.vqa import mean_vqa_accuracy

    if prompt_format == "qcm_a":
        return scienceqa_metrics(records)
    if prompt_format == "qa":
        pairs = []
        for record in records:
            answers = record["fields"]["answer"]
            answers = answers if isinstance(answers, list) else [answers]
            record["output"] = record["output"].removeprefix("Answer:").strip()
            record["gold"] = answers
            pairs.append((record["output"], answers))
        return {"acc/vqa": mean_vqa_accuracy(pairs), "count/overall": len(records)}
    if prompt_format == "conversation":
        from memvp_ds.evaluation.captioning import caption_metrics

        for record in records:  # the reference is the last answer, the one the prompt stops before
            turns = [t["value"] for t in record["fields"]["conversations"] if t["from"] == "gpt"]
            record["gold"] = turns[-1:]
        pairs = [(r["output"], r["gold"]) for r in records if r["gold"]]
        try:
            return {**caption_metrics(pairs), "count/overall": len(records)}
        except ImportError as err:
            log.warning("%s; reporting predictions only", err)
    return {"count/overall": len(records)}


def answer_tokens(cfg) -> int:
    """New tokens per answer: ONE for ScienceQA (the official protocol reads the token after 'The answer
    is'), eval.max_new_tokens for the free-form formats."""
    return 1 if cfg.data.prompt_format == "qcm_a" else cfg.eval.max_new_tokens


def eval_encoder(cfg, tokenizer) -> SampleEncoder:
    """Evaluation prompts: no target; the ScienceQA context carries the caption when eval.use_caption."""
    return build_encoder(cfg, tokenizer, with_target=False, use_caption=cfg.eval.use_caption)


def _protocol(cfg, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """How the answers were obtained, reported with the metrics."""
    if cfg.data.prompt_format != "qcm_a":
        return {"answer_tokens": answer_tokens(cfg)}
    captioned = sum(bool(r["fields"].get("caption")) for r in records) if cfg.eval.use_caption else 0
    if cfg.eval.use_caption and not captioned:
        log.warning("eval.use_caption is on but no sample has a caption (data_prep found no captions.json?)")
    return {"answer_tokens": 1, "use_caption": cfg.eval.use_caption, "count/captioned": captioned}


def evaluate_split(cfg, model, tokenizer, urls: List[str], rank: int, world_size: int,
                   stop_when_done: bool = True, device: Optional[torch.device] = None):
    """(records, metrics) for one split; metrics only on rank 0 (others get {})."""
    batches = iterate_eval_batches(urls, eval_encoder(cfg, tokenizer), cfg.eval.batch_size, tokenizer.pad_token_id,
                                   rank, world_size, cfg.eval.max_samples, left_pad=True,
                                   budget=ErrorBudget.of(cfg.data))
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
    return records, {**task_metrics(cfg.data.prompt_format, records), **_protocol(cfg, records)}


def predictions_path(out_dir: str, split: str) -> str:
    """The predictions JSONL that ``write_results`` writes for ``split``."""
    return os.path.join(out_dir, f"predictions_{split}.jsonl")


def write_results(out_dir: str, split: str, records: List[Dict[str, Any]], metrics: Dict[str, float]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(predictions_path(out_dir, split)) as f:
        for record in records:
            f.write(json.dumps({k: record.get(k) for k in ("id", "prompt", "output", "parsed", "gold")}) + "\n")
    write_json_atomic(os.path.join(out_dir, f"metrics_{split}.json"), metrics)
