"""Running the real entry points in subprocesses and reading what they wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def train_overrides(dataset: dict, out_dir, *extra: str) -> List[str]:
    return [
        f"data.train_shards={dataset['train']}", f"data.val_shards={dataset['val']}",
        f"data.tokenizer={dataset['tokenizer']}", f"train.output_dir={out_dir}", "data.num_workers=1",
        "logging.log_interval=1", *extra,
    ]


def run_train(overrides: List[str], ranks: int = 1, config: str = "tiny_memvp", timeout: int = 300,
              check: bool = True, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """``memvp_ds/train.py`` in N ranks: ``torchrun`` (default), ``deepspeed --num_gpus N`` (the README's
    launcher; some tests use it, see tests/test_train.py) or plain ``python`` for N = 1. Each rank builds a real
    DeepSpeed engine either way; torchrun starts and ends ~4 s sooner (DeepSpeed's launcher imports DeepSpeed
    twice before the ranks start and polls them once a second)."""
    port = str(29500 + os.getpid() % 1000)
    if ranks > 1 and launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, "memvp_ds/train.py"]
    elif ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port,
               "memvp_ds/train.py"]
    else:
        cmd = [sys.executable, "memvp_ds/train.py"]
    cmd += ["--config", config, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def scalars(out_dir, tag: str) -> Dict[int, float]:
    """step -> value of a TensorBoard scalar, read back with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        raise KeyError(f"{tag} not logged; have {acc.Tags()['scalars']}")
    return {event.step: event.value for event in acc.Scalars(tag)}
