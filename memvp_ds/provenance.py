"""Where a trained model came from: code (git commit, dirty or not), package versions, the resolved config's
hash, the data manifest's hash and the seed. Stored in every export and checkpoint, written next to every
evaluation's metrics, printed by ``memvp-info``."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from importlib import metadata
from typing import Any, Dict, Optional

from memvp_ds.config import Config, config_to_dict

PACKAGES = ("memvp_ds", "torch", "transformers", "deepspeed")
# Settings that say where things are or how they are computed, not what is learned: the same run moved to
# another folder or machine keeps its config hash.
LOCATION_KEYS = ("train.output_dir", "model.llm.path", "data.shards", "data.tokenizer", "data.manifest",
                 "data.train_shards", "data.val_shards", "data.test_shards")


def config_sha256(cfg: Config) -> str:
    """Hash of the resolved config without the location settings (canonical JSON, sorted keys)."""
    tree = config_to_dict(cfg)
    for key in LOCATION_KEYS:
        *parents, name = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {})
        node.pop(name, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Optional[str]) -> Optional[str]:
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in blocks: an export with LoRA weights is hundreds of MB
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(directory: str) -> Dict[str, Any]:
    """Commit of the checkout that holds ``directory`` and whether it had uncommitted changes; ``None`` for
    an installed wheel (no checkout)."""
    def git(*args: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect(cfg: Config, manifest_file: Optional[str]) -> Dict[str, Any]:
    """The provenance record of a run about to train on ``cfg`` with the data ``manifest_file`` describes."""
    return {
        **git_state(os.path.dirname(os.path.abspath(__file__))),
        "versions": package_versions(),
        "config_sha256": config_sha256(cfg),
        "data_manifest_sha256": file_sha256(manifest_file),
        "seed": cfg.train.seed,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
