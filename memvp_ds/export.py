"""The export format: a run's trainable weights in one safetensors file, with the resolved config and the
training shards' feature recipe in its metadata.

Readers (evaluation, prediction, the demo, the server) and the writer (the training engine, which gathers
the weights first) meet here, below the engine: reading an export never imports DeepSpeed or the trainer.
A checkpoint folder (``step-N/``) holds the same file name with ``param/``-prefixed tensors beside the Adam
moments, so ``load_trainable_weights`` takes either.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file

from memvp_ds.atomic_io import write_safetensors
from memvp_ds.config import Config, config_to_dict
from memvp_ds.run_folder import TRAINABLE

CONFIG_KEY = "memvp_ds_config"
RECIPE_KEY = "feature_recipe"
PROVENANCE_KEY = "provenance"


def export_metadata(cfg: Config, feature_recipe: Optional[Dict[str, Any]] = None,
                    provenance: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """An export's safetensors metadata: the resolved config, the training shards' feature recipe and the
    run's provenance (memvp_ds/provenance.py)."""
    metadata = {CONFIG_KEY: json.dumps(config_to_dict(cfg))}
    if feature_recipe is not None:
        metadata[RECIPE_KEY] = json.dumps(feature_recipe)
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance)
    return metadata


def write_export(tensors: Dict[str, torch.Tensor], path: str, cfg: Config,
                 feature_recipe: Optional[Dict[str, Any]] = None,
                 provenance: Optional[Dict[str, Any]] = None) -> None:
    """Write gathered full-size trainable tensors with their metadata, visible only once complete and on
    disk, with the umask's permissions."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(tensors, path, export_metadata(cfg, feature_recipe, provenance))


def _unreadable(path: str, err: Exception) -> ValueError:
    """One line for a file that is not a readable safetensors export (empty, truncated, random bytes)."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    reason = "it is empty" if size == 0 else " ".join(str(err).split()) or type(err).__name__
    return ValueError(f"{path} is not a readable safetensors export ({size} bytes; {reason}): a truncated or "
                      "corrupt copy? Copy it again from the run's export/ folder")


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, ValueError):
        raise
    except Exception as err:  # safetensors raises its own error type (SafetensorError) for malformed files
        raise _unreadable(path, err) from None


def _metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported weights not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type (SafetensorError) for malformed files
        raise _unreadable(path, err) from None


def read_export_metadata(path: str, key: str = CONFIG_KEY) -> Dict[str, Any]:
    """A JSON entry of an export's metadata: the resolved config (default) or the feature recipe."""
    metadata = _metadata(path)
    if key not in metadata:
        raise ValueError(f"{path} has no '{key}' metadata (not a memvp_ds export, or one from before it was stored)")
    try:
        return json.loads(metadata[key])
    except ValueError:
        raise ValueError(f"{path}: its '{key}' metadata is not valid JSON (a corrupt export)") from None


def read_feature_recipe(path: str) -> Dict[str, Any]:
    """The feature recipe of the shards an export was trained on (images must be encoded the same way)."""
    return read_export_metadata(path, RECIPE_KEY)


def read_provenance(path: str) -> Optional[Dict[str, Any]]:
    """The provenance an export records; ``None`` for an export from before it was stored."""
    return read_export_metadata(path, PROVENANCE_KEY) if PROVENANCE_KEY in _metadata(path) else None


def load_exported(path: str, overrides: Optional[List[str]] = None):
    """Rebuild a model from an export without DeepSpeed: the stored config with ``key=value`` overrides on
    top (e.g. ``model.llm.path`` of another local copy of the base LLM)."""
    from memvp_ds.model import build_model
    from memvp_ds.schema import load_config

    cfg = load_config(overrides=overrides, stored=read_export_metadata(path))
    model = build_model(cfg.model)
    model.load_trainable(_load_tensors(path))
    return model, cfg


def load_trainable_weights(model, path: str) -> None:
    """Trainable weights from an export file or a checkpoint folder (both safetensors)."""
    if os.path.isdir(path):
        tensors = _load_tensors(os.path.join(path, TRAINABLE))
        model.load_trainable({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("param/")})
    elif os.path.isfile(path):
        model.load_trainable(_load_tensors(path))
    else:
        raise FileNotFoundError(f"--weights: {path} is neither an export file nor a checkpoint folder")
