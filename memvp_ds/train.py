"""Train a visual-prompting strategy on a frozen LLM.

    deepspeed memvp_ds/train.py --config configs/memvp_llama13b_sqa.yaml train.micro_batch_size=2
    python memvp_ds/train.py --config configs/tiny_memvp.yaml data.shards=...   # one process
    memvp-train --config configs/memvp_llama13b_sqa.yaml --dry-run --world-size 8    # the plan, as JSON
    torchrun --nproc_per_node 8 memvp_ds/train.py --config ...                        # or srun, see slurm/

Config: the YAML file, then ``key=value`` overrides (dotted keys of memvp_ds.config). Resumes from the
newest complete checkpoint in train.output_dir unless train.resume=never.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and documentation, then exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check config, DeepSpeed JSON, shards, tokenizer and output folder, print the run's plan "
                             "as JSON and exit (no model, no process group)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks the dry run plans for (default: $WORLD_SIZE or 1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.blr=1e-2 model.memvp.memory_rows=320")
    return parser.parse_args(argv)


def config_reference() -> str:
    """Every option of the run schema: ``key (type, default: value)`` and its docstring, one block each."""
    import textwrap

    from memvp_ds.config import describe_fields
    from memvp_ds.schema import RunConfig

    blocks = []
    for key, type_name, default, doc in describe_fields(RunConfig):
        body = textwrap.indent(textwrap.fill(doc, 100), "    ") if doc else "    (undocumented)"
        blocks.append(f"{key} ({type_name}, default: {default!r})\n{body}")
    return "\n".join(blocks)


def print_plan(cfg, world_size=None) -> int:
    """--dry-run: the run's plan as one JSON object on stdout."""
    import json

    from memvp_ds.config import check_at_least
    from memvp_ds.engine.plan_report import dry_run_report

    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    check_at_least("--world-size", world_size, 1)
    print(json.dumps(dry_run_report(cfg, world_size), indent=2))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(config_reference())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from memvp_ds.schema import load_config

    cfg = load_config(args.config, args.overrides)  # fails fast, before any process group or model exists
    if args.dry_run:
        return print_plan(cfg, args.world_size)

    from memvp_ds.distributed import destroy, init_distributed
    from memvp_ds.engine.trainer import Trainer

    dist_info = init_distributed()
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"memvp_ds: rank {dist_info.rank}/{dist_info.world_size} on node {node}", flush=True)
    if not dist_info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    result = Trainer(cfg, dist_info).train()
    destroy()
    return 0 if result["status"] in ("complete", "preempted") else 1


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file (deepspeed memvp_ds/train.py): make the package importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
