"""Evaluate trained weights: batched greedy generation on a split, predictions JSONL, metrics JSON + TensorBoard.

    python -m memvp_ds.evaluate --weights runs/x/export/trainable.safetensors --split test
    deepspeed --num_gpus 8 memvp_ds/evaluate.py --config configs/memvp_llama13b_sqa.yaml --weights ... \
        --split test eval.batch_size=16

Without --config, the config stored in the export is used. Each rank holds the whole model (inference
needs no optimizer state, and a frozen 13B model fits one 80 GB GPU in bf16) and answers every
world_size-th sample; rank 0 gathers the predictions, so the metrics do not depend on the rank count.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, Iterable, List, Optional

import torch

log = logging.getLogger("memvp_ds.evaluate")


def load_weights(model, path: str) -> None:
    """Trainable weights from an export file or a checkpoint folder (both safetensors)."""
    from safetensors.torch import load_file

    from memvp_ds.engine.checkpoint import TRAINABLE

    if os.path.isdir(path):
        tensors = load_file(os.path.join(path, TRAINABLE))
        model.load_trainable({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("param/")})
    elif os.path.isfile(path):
        model.load_trainable(load_file(path))
    else:
        raise FileNotFoundError(f"--weights: {path} is neither an export file nor a checkpoint folder")


@torch.no_grad()
def generate_records(model, batches: Iterable[Dict[str, Any]], tokenizer, max_new_tokens: int,
                     stop_when_done: bool = True, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> List[Dict[str, Any]]:
    """Greedy answers for every valid row of left-padded eval batches."""
    model.eval()
    device = device or next(model.parameters()).device
    records = []
    for batch in batches:
        tokens = model.generate(
            batch["input_ids"].to(device), batch["attention_mask"].to(device),
            image_features=batch["image_features"].to(device, dtype), has_image=batch["has_image"].to(device),
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, stop_when_done=stop_when_done,
        )
        for row, valid in enumerate(batch["valid"].tolist()):
            if not valid:
                continue
            prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            new = [t for t in tokens[row].tolist() if t != tokenizer.eos_token_id]
            records.append({
                "id": batch["keys"][row], "fields": batch["fields"][row],
                "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                "output": tokenizer.decode(new, skip_special_tokens=True),
            })
    return records


def task_metrics(prompt_format: str, records: List[Dict[str, Any]]) -> Dict[str, float]:
    from memvp_ds.evaluation.scienceqa import parse_answer, scienceqa_metrics
    from memvp_ds.evaluation.vqa import mean_vqa_accuracy

    if prompt_format == "qcm_a":
        for record in records:
            predicted, _ = parse_answer(record["output"], len(record["fields"]["choices"]))
            record["parsed"], record["gold"] = predicted, int(record["fields"]["answer"])
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


def evaluate_split(cfg, model, tokenizer, urls: List[str], rank: int, world_size: int,
                   stop_when_done: bool = True, device: Optional[torch.device] = None):
    """(records, metrics) for one split; metrics only on rank 0 (others get {})."""
    from memvp_ds.data.collate import SampleEncoder
    from memvp_ds.data.stream import iterate_eval_batches
    from memvp_ds.engine.distributed import all_gather_objects

    encoder = SampleEncoder(tokenizer, cfg.data.prompt_format, cfg.data.max_seq_len, cfg.model.visual_tokens,
                            cfg.model.visual_dim, with_target=False, use_images=cfg.data.use_images)
    batches = iterate_eval_batches(urls, encoder, cfg.eval.batch_size, tokenizer.pad_token_id, rank, world_size,
                                   cfg.eval.max_samples, left_pad=True)
    dtype = next(p for p in model.parameters()).dtype
    records = generate_records(model, batches, tokenizer, cfg.eval.max_new_tokens, stop_when_done, dtype, device)
    gathered = [r for part in all_gather_objects(records) for r in part]
    if rank != 0:
        return gathered, {}
    order = {}
    for record in gathered:
        order.setdefault(record["id"], record)
    records = list(order.values())
    return records, task_metrics(cfg.data.prompt_format, records)


def write_results(out_dir: str, split: str, records: List[Dict[str, Any]], metrics: Dict[str, float]) -> None:
    from memvp_ds.atomic_io import atomic_open, write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(os.path.join(out_dir, f"predictions_{split}.jsonl")) as f:
        for record in records:
            f.write(json.dumps({k: record.get(k) for k in ("id", "prompt", "output", "parsed", "gold")}) + "\n")
    write_json_atomic(os.path.join(out_dir, f"metrics_{split}.json"), metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the one stored in the export)")
    parser.add_argument("--weights", required=True, help="export .safetensors or a checkpoint folder")
    parser.add_argument("--split", default=None, help="test or val (default eval.split)")
    parser.add_argument("--output", help="where predictions and metrics go (default <train.output_dir>/eval)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from memvp_ds.config import ConfigError, load_config
    from memvp_ds.data.stream import shard_urls
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.engine.checkpoint import read_export_metadata
    from memvp_ds.engine.distributed import destroy, init_distributed
    from memvp_ds.engine.metrics import ScalarLogger
    from memvp_ds.model import build_model

    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif os.path.isfile(args.weights):
        cfg = load_config(None, args.overrides, stored=read_export_metadata(args.weights))
    else:
        raise ConfigError("--config is required unless --weights is an export file (which stores its config)")
    split = args.split or cfg.eval.split
    spec = {"test": cfg.data.test_shards, "val": cfg.data.val_shards, "train": cfg.data.train_shards}.get(split)
    if not spec:
        raise ConfigError(f"no shards configured for split '{split}' (data.{split}_shards)")
    urls = shard_urls(spec)
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.llm.path, cfg.model.llm.trust_remote_code)

    dist_info = init_distributed()
    device = torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg.model)
    load_weights(model, args.weights)
    model.to(device)
    records, metrics = evaluate_split(cfg, model, tokenizer, urls, dist_info.rank, dist_info.world_size, device=device)
    if dist_info.is_main:
        out_dir = args.output or os.path.join(cfg.train.output_dir, "eval")
        write_results(out_dir, split, records, metrics)
        logger = ScalarLogger(os.path.join(cfg.train.output_dir, "tb"), cfg.logging.tensorboard)
        logger.log({f"eval_{split}/{k}": v for k, v in metrics.items() if k.startswith("acc/")}, 0)
        logger.close()
        for key in sorted(metrics):
            print(f"{key}: {metrics[key]:.2f}" if isinstance(metrics[key], float) else f"{key}: {metrics[key]}")
        print(f"predictions and metrics in {out_dir}")
    destroy()
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
