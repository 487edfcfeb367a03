"""search.json: what a search run (train.mode=dvp_search | das_search) leaves for the final training run."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from memvp_ds.atomic_io import write_json_atomic
from memvp_ds.config import ConfigError

SEARCH_RESULT = "search.json"


def write_search_result(output_dir: str, result: Dict[str, Any]) -> None:
    write_json_atomic(os.path.join(output_dir, SEARCH_RESULT), result)


def read_search_result(directory: str, option: str) -> Dict[str, Any]:
    """The search.json a search run wrote to ``directory``; ``option`` names the config key that points there."""
    path = os.path.join(directory, SEARCH_RESULT)
    if not os.path.isfile(path):
        raise ConfigError(f"{option}: {path} not found; run train.mode=dvp_search or das_search with "
                          f"train.output_dir={directory} first")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option}: {path} is not valid JSON ({err})") from None


def apply_search_results(cfg) -> None:
    """Fill ``model.dvp.layer`` / ``model.skip.layers`` from their ``from_search`` folders where unset."""
    model = cfg.model
    if model.dvp.from_search and model.dvp.layer is None:
        model.dvp.layer = _choice(model.dvp.from_search, "model.dvp.from_search", "dvp_layer")
    if model.skip.from_search and not model.skip.layers:
        model.skip.layers = _choice(model.skip.from_search, "model.skip.from_search", "skip_layers")


def _choice(directory: str, option: str, key: str):
    result = read_search_result(directory, option)
    if key not in result:
        raise ConfigError(f"{option}: {os.path.join(directory, SEARCH_RESULT)} has no '{key}' "
                          f"(written by a search of another kind?)")
    return result[key]
