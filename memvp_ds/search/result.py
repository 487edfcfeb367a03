"""search.json: what a search run (train.mode=dvp_search | das_search) leaves for the final training run."""

from __future__ import annotations

import json
from typing import Any, Dict

from memvp_ds.config import ConfigError
from memvp_ds.run_folder import RunFolder


def write_search_result(output_dir: str, result: Dict[str, Any]) -> None:
    RunFolder(output_dir).write_search_result(result)


def read_search_result(directory: str, option: str) -> Dict[str, Any]:
    """The search.json a search run wrote to ``directory``; ``option`` names the config key that points there."""
    folder = RunFolder(directory)
    try:
        return folder.read_search_result()
    except FileNotFoundError:
        raise ConfigError(f"{option}: {folder.search_result} not found; run train.mode=dvp_search or das_search "
                          f"with train.output_dir={directory} first") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option}: {folder.search_result} is not valid JSON ({err})") from None


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
        raise ConfigError(f"{option}: {RunFolder(directory).search_result} has no '{key}' "
                          f"(written by a search of another kind?)")
    return result[key]
