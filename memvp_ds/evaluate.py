"""memvp-eval: score trained weights on a split: batched greedy generation, predictions JSONL, metrics
JSON + TensorBoard.

    memvp-eval --weights runs/x/export/trainable.safetensors --split test
    memvp-eval --weights trainable.safetensors --llm-path /local/llama-13b-hf data.test_shards=... eval.batch_size=16
    deepspeed --num_gpus 8 --module memvp_ds.evaluate --weights runs/x/export/trainable.safetensors \\
        --split test eval.batch_size=16

Without --config, the config stored in the export is used for the model and prompts (with --llm-path and
the key=value overrides on top: an export made on a cluster runs elsewhere), but never for what to run or
where to write: the shards come from --shards (or the user's --config), the output folder from --output (or
the user's --config), and trust_remote_code stays off unless the user's own config or an override sets it.
An export is data, like a checkpoint; a 'pipe:' URL in it must not run. Each rank holds the whole model
(inference needs no optimizer state, and a frozen 13B model fits one 80 GB GPU in bf16) and answers every
world_size-th sample; rank 0 gathers the predictions, so the metrics do not depend on the rank count.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a file (deepspeed memvp_ds/evaluate.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from memvp_ds.cli import command, llm_path_overrides, parser as cli_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("memvp-eval", __doc__)
    parser.add_argument("--config", help="YAML config, file or shipped name (default: the one stored in the export)")
    parser.add_argument("--weights", required=True, help="export .safetensors or a checkpoint folder")
    parser.add_argument("--split", choices=["test", "val", "train"], help="split to score (default: eval.split)")
    parser.add_argument("--shards", help="data_prep output folder (every shard of the split) or a shard list "
                                         "(default: data.shards / data.<split>_shards of --config)")
    parser.add_argument("--output", help="where predictions, metrics and TensorBoard go (default with --config: "
                                         "<train.output_dir>/eval)")
    parser.add_argument("--llm-path", help="another local copy of the base LLM (also the tokenizer); default: "
                        "the stored model.llm.path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, applied last")
    return parser


@command
def main(argv) -> int:
    args = build_parser().parse_args(argv)
    overrides = llm_path_overrides(args.llm_path) + args.overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from memvp_ds.config import ConfigError
    from memvp_ds.data.plan import resolve_split
    from memvp_ds.data.tokenizer import load_tokenizer, tokenizer_path
    from memvp_ds.distributed import destroy, init_distributed
    from memvp_ds.data.plan import manifest_path
    from memvp_ds.export import load_trainable_weights, read_export_metadata, read_provenance
    from memvp_ds.provenance import collect as collect_provenance, file_sha256
    from memvp_ds.evaluation.run import evaluate_split, write_results
    from memvp_ds.model import build_model
    from memvp_ds.model.llm import check_vocab_fits
    from memvp_ds.run_folder import RunFolder, check_writable
    from memvp_ds.scalar_logger import ScalarLogger
    from memvp_ds.schema import load_config

    if not os.path.exists(args.weights):
        raise FileNotFoundError(f"--weights: {args.weights} not found (an export .safetensors or a checkpoint folder)")
    if args.config:
        cfg = load_config(args.config, overrides)
    elif os.path.isfile(args.weights):
        cfg = load_config(None, overrides, stored=read_export_metadata(args.weights))
    else:
        raise ConfigError("--config is required unless --weights is an export file (which stores its config)")
    split = args.split or cfg.eval.split
    if args.shards:  # a data_prep folder (every shard of the split) or an explicit shard list
        folder = os.path.isdir(args.shards)
        cfg.data.shards = args.shards if folder else None
        setattr(cfg.data, f"{split}_shards", None if folder else args.shards)
    shards = resolve_split(cfg, split)
    if shards is None:
        raise ConfigError(f"no shards for split '{split}': pass --shards (data_prep's output folder or a shard list) "
                          f"or set data.shards in --config; shards stored in an export are never used")
    if not args.output and not args.config:
        raise ConfigError("--output is required without --config (an export's stored output_dir is never used)")
    out_dir = args.output or RunFolder(cfg.train.output_dir).eval
    tb_dir = RunFolder(cfg.train.output_dir if args.config else out_dir).tensorboard
    urls = shards.urls
    tokenizer_dir = tokenizer_path(cfg)
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model.llm.trust_remote_code)
    check_vocab_fits(len(tokenizer), tokenizer_dir, cfg.model.llm)

    dist_info = init_distributed()
    if dist_info.is_main:
        check_writable(out_dir, "--output" if args.output else "train.output_dir")
        print(f"memvp-eval: split {split}: {len(urls)} shard(s) from {'--shards' if args.shards else '--config'} "
              f"({urls[0]}{' ...' if len(urls) > 1 else ''}); tokenizer {tokenizer_dir}; "
              f"trust_remote_code={cfg.model.llm.trust_remote_code}; writing to {out_dir}", flush=True)
    device = torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg.model)
    load_trainable_weights(model, args.weights)
    model.to(device)
    records, metrics = evaluate_split(cfg, model, tokenizer, urls, dist_info.rank, dist_info.world_size, device=device)
    if dist_info.is_main:
        exported = os.path.isfile(args.weights)
        write_results(out_dir, split, records, metrics, provenance={
            "weights": os.path.abspath(args.weights),
            "weights_sha256": file_sha256(args.weights) if exported else None,
            "trained": read_provenance(args.weights) if exported else None,  # a checkpoint's is in its state.json
            "evaluated": collect_provenance(cfg, manifest_path(cfg)),
        })
        logger = ScalarLogger(tb_dir, cfg.logging.tensorboard)
        logger.log({f"eval_{split}/{k}": v for k, v in metrics.items() if k.startswith("acc/")}, 0)
        logger.close()
        for key in sorted(metrics):
            print(f"{key}: {metrics[key]:.2f}" if isinstance(metrics[key], float) else f"{key}: {metrics[key]}")
        print(f"predictions and metrics in {out_dir}")
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
