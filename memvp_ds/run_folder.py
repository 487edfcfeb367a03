"""A run's output folder (``train.output_dir``): the one place that knows its layout.

    config.yaml                     the resolved config, written when training starts
    tb/                             TensorBoard events (training; memvp-eval adds its own scalars)
    checkpoints/                    resumable state (memvp_ds/engine/checkpoint.py owns what is inside)
    export/trainable.safetensors    the trained weights (memvp_ds/export.py owns the format)
    status.json                     how the last attempt ended: status, step, total steps (read by slurm/train.sh)
    search.json                     a search run's result, read back through ``from_search``
    eval/                           memvp-eval's predictions and metrics

Every file written here goes through a temp file and a rename, so a reader (a resuming run, a Slurm script,
another run's ``from_search``) sees the old content or the new one, never half. Loads no torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict

from memvp_ds.atomic_io import atomic_open, write_json_atomic
from memvp_ds.config import ConfigError

EXPORT_DIR = "export"
TRAINABLE = "trainable.safetensors"
"""The trainable tensors' file name: in ``export/`` and in every checkpoint folder."""
CONFIG = "config.yaml"
STATUS = "status.json"
SEARCH_RESULT = "search.json"


def check_writable(directory: str, key: str, create: bool = True) -> str:
    """The absolute ``directory`` if files can be written there; ConfigError naming ``key`` otherwise.

    ``create``: make the folder and prove it by writing a file. Without it (a dry run, which leaves no trace)
    the nearest existing folder above it must be writable."""
    path = os.path.abspath(directory)
    if create:
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                pass
        except OSError as err:
            raise ConfigError(f"{key}: cannot write to {directory}: {err.strerror or err}") from None
        return path
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write to {path}: {existing} is not writable")
    return path


@dataclass(frozen=True)
class RunFolder:
    """Paths and atomic writers of one run's output folder."""

    root: str

    def _path(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    @property
    def config(self) -> str:
        return self._path(CONFIG)

    @property
    def tensorboard(self) -> str:
        return self._path("tb")

    @property
    def checkpoints(self) -> str:
        return self._path("checkpoints")

    @property
    def export(self) -> str:
        """The export file (memvp_ds/export.py reads and writes it)."""
        return self._path(EXPORT_DIR, TRAINABLE)

    @property
    def status(self) -> str:
        return self._path(STATUS)

    @property
    def search_result(self) -> str:
        return self._path(SEARCH_RESULT)

    @property
    def eval(self) -> str:
        return self._path("eval")

    def write_config(self, yaml_text: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        with atomic_open(self.config) as f:
            f.write(yaml_text)

    def write_status(self, status: str, step: int, total_steps: int) -> None:
        write_json_atomic(self.status, {"status": status, "step": step, "total_steps": total_steps})

    def read_status(self) -> Dict[str, Any]:
        with open(self.status) as f:
            return json.load(f)

    def write_search_result(self, result: Dict[str, Any]) -> None:
        write_json_atomic(self.search_result, result)

    def read_search_result(self) -> Dict[str, Any]:
        """search.json as written (FileNotFoundError, json.JSONDecodeError as raised)."""
        with open(self.search_result) as f:
            return json.load(f)
