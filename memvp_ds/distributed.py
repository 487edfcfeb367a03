"""Everything about processes and ranks in one place: discovery, initialisation, collectives."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ORPHAN_GRACE_S = 300.0
"""Seconds a rank whose launcher died has to save and exit after its SIGTERM, before it ends itself."""


def exit_with_launcher(poll_s: float = 1.0, grace_s: float = ORPHAN_GRACE_S) -> None:
    """A rank started by a launcher (torchrun, deepspeed, srun: LOCAL_RANK or SLURM_PROCID is set) stops when
    the launcher dies, instead of training on as an orphan beside the run a restart would start.

    A daemon thread watches the parent pid. When it changes, the rank sends itself SIGTERM (the stop
    signal: it saves at the next step boundary and exits); if it is still alive ``grace_s`` later (blocked
    in a collective with a peer that is gone), it exits at once. A plain single process has no launcher
    to watch (its parent may be a shell the user left on purpose, under nohup).
    """
    if "LOCAL_RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logging.getLogger("memvp_ds").warning("the launcher (pid %d) is gone: stopping this rank", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job: a function of its id, so every node of the job (and each requeued
    attempt) computes the same one and two jobs sharing a first node rarely collide. The Slurm scripts leave
    the rendezvous to the ranks, so this is the only place the rule is written."""
    return 20000 + job_id % 20000


def _env_from_slurm() -> None:
    """``srun python train.py`` without torchrun: derive the torch env vars from Slurm's."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port(int(os.environ["SLURM_JOB_ID"]))))


def init_distributed() -> DistInfo:
    """Join the process group set up by deepspeed/torchrun/srun, or form a group of one.

    CUDA gets NCCL; without CUDA (CPU-only machines and the tests) DeepSpeed's CPU accelerator runs on gloo.
    """
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        _env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        # CPU ranks share the machine's cores: more threads than cores makes every rank crawl.
        # torchrun, deepspeed's launcher and srun name the ranks per node differently ("2(x3)" for Slurm).
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
        local_ranks = int(re.match(r"\d+", local).group()) if local and re.match(r"\d+", local) else 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop signal seen by one node)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.to(_collective_device())
        dist.all_reduce(values)
    return values.cpu()


def all_gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

