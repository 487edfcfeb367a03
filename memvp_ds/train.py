"""memvp-train: train a visual-prompting strategy on a frozen LLM.

    memvp-train --config tiny_memvp data.shards=... data.tokenizer=...              # one process
    memvp-train --config memvp_llama13b_sqa --dry-run --world-size 8 --gpu-memory 80GiB  # the plan, as JSON
    deepspeed --num_gpus 8 --module memvp_ds.train --config memvp_llama13b_sqa \\
        model.llm.path=/ckpt/llama-13b-hf train.micro_batch_size=2
    torchrun --nproc_per_node 8 -m memvp_ds.train --config ...                     # or srun: slurm/train.sh

Config: a YAML file or a shipped recipe name, then ``key=value`` overrides (every key: --help-config).
Resumes from the newest complete checkpoint in train.output_dir unless train.resume=never.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a file (deepspeed memvp_ds/train.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memvp_ds.stop_signals import STOP  # noqa: E402  (after the path fix above)
from memvp_ds.cli import command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from memvp_ds.cli import parser as cli_parser
    from memvp_ds.recipes import shipped

    parser = cli_parser("memvp-train", __doc__)
    parser.add_argument("--config", help="YAML config: a file or a shipped recipe name "
                        f"({', '.join(shipped('configs'))}); default: none, the overrides alone")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and documentation, then exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check config, DeepSpeed JSON, shards, tokenizer and output folder, print the run's plan "
                             "as JSON and exit (no model, no process group)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks the dry run plans for (default: $WORLD_SIZE or 1)")
    parser.add_argument("--gpu-memory", default=None,
                        help="memory of one GPU (e.g. 80GiB, 141GB): the dry run's memory estimate says whether the "
                             "run fits (default: none, the estimate alone)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.blr=1e-2 model.memvp.memory_rows=320")
    return parser


@command
def main(argv) -> int:
    STOP.install()  # first: a stop signal during start-up ends the run cleanly, never by default action
    try:
        return _main(argv)
    finally:
        STOP.restore()


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.gpu_memory and not args.dry_run:
        from memvp_ds.config import ConfigError

        raise ConfigError("--gpu-memory is for --dry-run's memory estimate; add --dry-run")
    from memvp_ds.schema import config_reference, load_config

    if args.help_config:
        STOP.release()
        print(config_reference())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)  # fails fast, before any process group or model exists
    if args.print_config or args.dry_run:
        STOP.release()  # these only read: Ctrl-C stops them at once
    if args.print_config:
        from memvp_ds.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        from memvp_ds.engine.memory_plan import parse_memory_size
        from memvp_ds.engine.plan_report import dry_run_json

        gpu_memory = parse_memory_size(args.gpu_memory) if args.gpu_memory else None
        print(dry_run_json(cfg, args.world_size, gpu_memory))
        return 0
    from memvp_ds.engine.preflight import LAUNCH, preflight

    # The checks that need no process group come first, with the launcher's world size: a wrong DeepSpeed JSON
    # or shard set is reported before any rank starts one (the Trainer runs them all with the real one).
    slurm_ranks = os.environ.get("SLURM_NTASKS") if "SLURM_PROCID" in os.environ else None  # as init_distributed
    preflight(cfg, int(os.environ.get("WORLD_SIZE") or slurm_ranks or 1), LAUNCH)
    from memvp_ds.engine.guarded_run import run_training

    return run_training(cfg)  # the run folder's lock, then the process group, the Trainer and its status


if __name__ == "__main__":
    sys.exit(main())
