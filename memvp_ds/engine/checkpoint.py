"""Checkpoints: resumable training state, and the policy of a run's checkpoints (``CheckpointManager``: when
to save, what to keep, where ``latest`` points, what to resume). DeepSpeed's optimizer state is gathered and
restored by memvp_ds/engine/zero_state.py; the export format is memvp_ds/export.py.

Resumable state lives in ``<output_dir>/checkpoints/step-XXXXXXXX/`` and counts only once complete: it is
written into a hidden temporary folder, renamed, and only then does the ``latest`` pointer move to it. It
holds the trainable tensors' fp32 master weights and Adam moments gathered to full size (so a checkpoint
from N ranks resumes on M), per-rank RNG states, and a JSON with the step, data position and config —
megabytes, never the frozen LLM. Everything is safetensors or JSON: loading unpickles nothing.

Each run's checkpoints carry its run id, and pruning touches only those (a fresh run in a folder with
another run's checkpoints keeps its own). Resuming picks the checkpoint ``latest`` names, falls back to the
previous complete one if it is broken, and checks before any model is built that it fits the config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from memvp_ds.atomic_io import atomic_open, fsync_dir, write_json_atomic, write_safetensors
from memvp_ds.config import Config, ConfigError, config_to_dict
from memvp_ds.data.plan import manifest_path
from memvp_ds.distributed import DistInfo, barrier
from memvp_ds.engine.zero_state import gather_trainable, restore_trainable, rng_state
from memvp_ds.provenance import collect as collect_provenance
from memvp_ds.run_folder import TRAINABLE, RunFolder

log = logging.getLogger("memvp_ds")
LATEST = "latest"
STATE = "state.json"


def save_checkpoint(model, optimizer, dist_info: DistInfo, output_dir: str, step: int, state: Dict[str, Any],
                    keep_last: int) -> str:
    """Write ``step-<step>`` atomically on a shared file system; every rank must call this."""
    root = RunFolder(output_dir).checkpoints
    name = f"step-{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    tensors = gather_trainable(model, optimizer)
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write_safetensors(tensors, os.path.join(tmp, TRAINABLE))
    barrier()
    # Every file is on disk (written durably) before the folder is renamed into place and `latest` moves.
    write_safetensors(rng_state(), os.path.join(tmp, f"rng-rank{dist_info.rank}.safetensors"))
    barrier()
    if dist_info.is_main:
        write_json_atomic(os.path.join(tmp, STATE), {**state, "step": step, "world_size": dist_info.world_size})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        _write_latest(root, name)
        _prune(root, keep_last, state.get("run_id"), name)
    barrier()
    return final


def _write_latest(root: str, name: str) -> None:
    with atomic_open(os.path.join(root, LATEST)) as f:
        f.write(name + "\n")


def _step_dirs(root: str) -> List[str]:
    """``step-*`` checkpoint folder names in ``root``, oldest step first."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and d[5:].isdigit())


def _prune(root: str, keep_last: int, run_id: Optional[str], newest: str) -> None:
    """Delete this run's checkpoints beyond the newest ``keep_last``, never ``newest`` (the one just written).

    Only folders whose state names ``run_id`` are this run's: a fresh run in a folder that still holds
    another run's checkpoints (maybe with higher steps) must neither delete them nor be pruned by them.
    """
    ours = [d for d in _step_dirs(root) if d != newest and _run_id(os.path.join(root, d)) == run_id]
    for old in (ours + [newest])[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _run_id(path: str) -> Optional[str]:
    try:
        return read_state(path).get("run_id")
    except (OSError, ValueError):
        return None


def read_state(path: str) -> Dict[str, Any]:
    """A checkpoint's JSON state (step, data position, config YAML, run id)."""
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def checkpoint_problem(path: str) -> Optional[str]:
    """What makes the checkpoint folder ``path`` unusable (missing or unreadable state or tensors), or None."""
    from safetensors import safe_open

    try:
        state = read_state(path)
        if "step" not in state or "optimizer_steps" not in state:
            return f"{STATE} lacks the step"
    except FileNotFoundError:
        return f"no {STATE}"
    except (OSError, ValueError) as err:
        return f"{STATE} is unreadable ({err})"
    try:
        with safe_open(os.path.join(path, TRAINABLE), framework="pt") as f:
            if not list(f.keys()):
                return f"{TRAINABLE} holds no tensors"
    except FileNotFoundError:
        return f"no {TRAINABLE}"
    except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
        return f"{TRAINABLE} is unreadable ({err})"
    return None


def find_resume_checkpoint(output_dir: str, resume: str) -> Optional[str]:
    """The checkpoint to resume from, checked to be complete; None to start fresh.

    ``auto``: the one ``latest`` names; if that one is broken (a truncated file, a missing state), the newest
    complete one before it, with a warning naming what is broken. ``never``: None. Otherwise ``resume`` is a
    checkpoint folder, which must be complete.
    """
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise ConfigError(f"train.resume: '{resume}' is not auto, never or an existing checkpoint directory")
        problem = checkpoint_problem(resume)
        if problem:
            raise ConfigError(f"train.resume: {resume} is not a complete checkpoint: {problem}")
        return resume
    root = RunFolder(output_dir).checkpoints
    pointer = os.path.join(root, LATEST)
    steps = _step_dirs(root)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
    elif steps:  # a crash between the rename and the pointer update
        named = steps[-1]
    else:
        return None
    candidates = [named] + [d for d in reversed(steps) if d < named]
    for name in candidates:
        path = os.path.join(root, name)
        problem = checkpoint_problem(path) if os.path.isdir(path) else "the folder is missing"
        if problem is None:
            return path
        log.warning("checkpoint %s is broken (%s); falling back to the previous complete one", path, problem)
    raise FileNotFoundError(f"{pointer} names {named}, and neither it nor an earlier checkpoint in {root} is "
                            "complete; start fresh with train.resume=never (or another train.output_dir)")


COMPATIBILITY_IGNORED = ("model.llm.dtype", "model.llm.attn_implementation", "model.llm.trust_remote_code")
"""Model keys that may differ on resume: how the frozen LLM is stored and run does not change the trained
tensors. Nor do dropout rates (regularisation only). ``model.llm.path`` is compared by folder name, since the
folder may move between clusters, and ``from_search`` paths not at all: the choices they resolved to are."""


def check_compatible(path: str, cfg: Config) -> None:
    """Stop before any model is built if the checkpoint at ``path`` was trained with another model: strategy,
    its options, visual dims, projector, layer skipping, the LLM (inline config or folder name) or train.mode
    differ. Raises ConfigError naming the key and both values."""
    stored_yaml = read_state(path).get("config")
    if not stored_yaml:
        return  # checkpoints from before the config was stored: tensor names and shapes are still checked
    from omegaconf import OmegaConf

    stored = _flatten(OmegaConf.to_container(OmegaConf.create(stored_yaml)))
    current = _flatten(config_to_dict(cfg))
    for key in sorted(set(stored) | set(current)):
        if not _compared(key, cfg.model.strategy):
            continue
        old, new = stored.get(key), current.get(key)
        if key == "model.llm.path":
            old, new = (os.path.basename(os.path.normpath(p)) if p else p for p in (old, new))
        if old != new:
            raise ConfigError(f"train.resume: {path} was trained with {key}={old!r}, this run has {key}={new!r}; "
                              "resume with the same model options, or start fresh (train.resume=never)")


def _compared(key: str, strategy: str) -> bool:
    """Keys that fix what the checkpoint's tensors mean: the model's (the active strategy's and layer
    skipping's options, not other strategies') and train.mode."""
    parts = key.split(".")
    if key == "train.mode":
        return True
    if parts[0] != "model" or key in COMPATIBILITY_IGNORED or parts[-1] in ("from_search", "dropout"):
        return False
    return len(parts) == 2 or parts[1] in ("llm", "projector", strategy, "skip")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted keys -> values; an inline HF config (model.llm.config) stays one value, compared as a whole."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" != "model.llm.config":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def load_checkpoint(model, optimizer, dist_info: DistInfo, path: str, seed: int) -> Dict[str, Any]:
    """Restore trainable weights, Adam moments and step count, and this rank's RNG; return the JSON state."""
    state = read_state(path)
    tensors = load_file(os.path.join(path, TRAINABLE))
    params = model.trainable_parameters()
    stored = {key.split("/", 1)[1] for key in tensors if key.startswith("param/")}
    if stored != set(params):
        raise KeyError(f"{path}: trainable tensors {sorted(stored)} do not match the model's {sorted(params)}")
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions keep the full shape here
        if tuple(tensors[f"param/{name}"].shape) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensors[f'param/{name}'].shape)}, the model's "
                             f"is {shape}")
    restore_trainable(model, optimizer, tensors, dist_info, state["optimizer_steps"])
    rng_file = os.path.join(path, f"rng-rank{dist_info.rank}.safetensors")
    if state["world_size"] == dist_info.world_size and os.path.isfile(rng_file):
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another world size: dropout streams cannot be replayed; keep them distinct per rank
        torch.manual_seed(seed + 1000 * state["step"] + dist_info.rank)
    return state


class CheckpointManager:
    """One run's checkpoint policy: a checkpoint every ``train.save_interval`` steps, at the last step and on a
    stop signal, never of weights that produced a non-finite loss; the newest ``train.keep_last`` of this run
    kept; resumption from the checkpoint pre-flight found, at the data position it recorded.

    A run id marks the checkpoints this run (and its resumptions) wrote: only those are ever pruned. Every
    checkpoint carries the run's provenance (memvp_ds.provenance: code, packages, config and data hashes, seed).
    """

    def __init__(self, cfg: Config, dist_info: DistInfo, resume_from: Optional[str]):
        self.cfg, self.dist, self.resume_from = cfg, dist_info, resume_from
        self.run_id = uuid.uuid4().hex
        self.provenance = collect_provenance(cfg, manifest_path(cfg))
        if resume_from:
            resumed = read_state(resume_from)
            self.run_id = resumed.get("run_id", self.run_id)
            if "provenance" in resumed:  # the code that trained the first steps may differ from this one's
                self.provenance["started_by"] = resumed["provenance"].get("started_by", resumed["provenance"])

    def due(self, step: int, total_steps: int, stopping: bool) -> bool:
        """Whether the state after optimizer step ``step`` is saved."""
        return step % self.cfg.train.save_interval == 0 or step == total_steps or stopping

    def save(self, model, optimizer, step: int, micro_batches: int, extra: Optional[Dict[str, Any]] = None) -> None:
        """Checkpoint ``step``, whose data position is ``micro_batches`` consumed per rank (collective);
        ``extra``: more JSON state (a search's)."""
        from memvp_ds.config import to_yaml

        state = {"optimizer_steps": step, "data": {"micro_batches": micro_batches, "streams": self.streams()},
                 "config": to_yaml(self.cfg), "run_id": self.run_id, "provenance": self.provenance,
                 **(extra or {})}
        save_checkpoint(model, optimizer, self.dist, self.cfg.train.output_dir, step, state, self.cfg.train.keep_last)

    def resume(self, model, optimizer) -> Tuple[int, int, Dict[str, Any]]:
        """(optimizer step, micro-batches consumed per rank, the JSON state) to start from; 0, 0, {} fresh."""
        if not self.resume_from:
            return 0, 0, {}
        state = load_checkpoint(model, optimizer, self.dist, self.resume_from, self.cfg.train.seed)
        log.info("resumed from %s at step %d", self.resume_from, state["step"])
        return state["step"], self._resumed_position(state["data"]), state

    def streams(self) -> int:
        """Data streams: ranks x loader workers (each reads its own shard subset)."""
        return self.dist.world_size * max(self.cfg.data.num_workers, 1)

    def _resumed_position(self, data_state: Dict[str, int]) -> int:
        """Micro-batches per rank to skip. Same stream layout: exact. Another layout (world size x workers)
        cannot replay the old order; it keeps the number of samples consumed, which is what the epoch
        position means, and the new streams read their own shard subsets from there."""
        if data_state["streams"] == self.streams():
            return data_state["micro_batches"]
        log.warning("data streams changed from %d to %d: data order after resume is approximate",
                    data_state["streams"], self.streams())
        return data_state["micro_batches"] * data_state["streams"] // self.streams()

