"""Running the real entry points in subprocesses and reading what they wrote."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port no process listens on now: tests that start process groups or servers take one each,
    so tests running at the same time (pytest-xdist workers) never meet at one rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    port = str(free_port())
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


def assert_zero3_gradients_equal_plain_pytorch(config: str, overrides: List[str], trainable: int,
                                               tolerance: float = 0.0, batch_check: str = "") -> None:
    """One micro-batch of the real Trainer's loader through its one-rank ZeRO-3 engine, against plain PyTorch on
    a model built from the same seed (torch's own F.linear, which ZeRO-3 replaces globally): the same loss bit
    for bit, and each of the ``trainable`` tensors' gradient within ``tolerance`` of the largest (0: equal).
    ``batch_check``: a Python statement about ``batch`` run first (what the micro-batch must hold)."""
    script = f"""
import sys; sys.argv = ["x"]
import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from memvp_ds.schema import load_config
from memvp_ds.distributed import init_distributed
from memvp_ds.engine.trainer import Trainer
from memvp_ds.model import build_model
from memvp_ds.search import skippable_layers
torch_linear = F.linear
cfg = load_config({config!r}, {overrides!r})
trainer = Trainer(cfg, init_distributed())
torch.manual_seed(cfg.train.seed)  # the engine's model was built from the same seed
plain = build_model(cfg.model, skippable_layers(cfg))
batch = trainer._to_device(next(iter(trainer._train_loader(0))))
{batch_check}
trainer.engine.train(), plain.train()
loss = trainer.engine(**batch).loss
trainer.engine.backward(loss)
zero3 = {{name: safe_get_full_grad(p).detach().clone() for name, p in trainer.model.trainable_parameters().items()}}
deepspeed_linear, F.linear = F.linear, torch_linear
params = plain.trainable_parameters()
reference = plain(**batch).loss
grads = dict(zip(params, torch.autograd.grad(reference, list(params.values()))))
F.linear = deepspeed_linear
assert torch.equal(loss.detach(), reference.detach()), (loss.item(), reference.item())
assert set(zero3) == set(grads), (sorted(zero3), sorted(grads))
for name in grads:
    error = (zero3[name] - grads[name]).abs().max().item()
    assert error <= {tolerance!r} * grads[name].abs().max().item(), (name, error)
print("EQUAL", len(grads))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert f"EQUAL {trainable}" in proc.stdout, proc.stderr[-3000:]
