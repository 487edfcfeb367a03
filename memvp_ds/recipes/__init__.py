"""The shipped recipes: run configs (``configs/*.yaml``) and DeepSpeed ZeRO settings (``ds_configs/*.json``).

They are package data, so an installed wheel has them too: ``--config tiny_memvp`` and
``train.ds_config=zero3`` work from any directory. The ZeRO settings live at the top of the repository
(``ds_configs/``); the wheel carries them here, in ``memvp_ds/recipes/ds_configs/`` (setup.py). A leaf
module: it imports nothing from memvp_ds.
"""

from __future__ import annotations

import os
from typing import List

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
_KINDS = {"configs": ".yaml", "ds_configs": ".json"}


def recipe_dir(kind: str) -> str:
    """The folder of the shipped files of ``kind``: inside the package (a wheel; configs always), else the
    repository's top level (a checkout, for ds_configs)."""
    inside = os.path.join(RECIPES_DIR, kind)
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(os.path.dirname(RECIPES_DIR)), kind)


def shipped(kind: str) -> List[str]:
    """Names of the shipped files of ``kind`` ("configs" or "ds_configs"), without extension."""
    suffix = _KINDS[kind]
    return sorted(name[: -len(suffix)] for name in os.listdir(recipe_dir(kind)) if name.endswith(suffix))


def _resolve(kind: str, name_or_path: str, what: str) -> str:
    """An existing file as given, else the shipped file that ``name_or_path`` names: ``tiny_memvp``,
    ``tiny_memvp.yaml`` or the former repository path ``configs/tiny_memvp.yaml``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    suffix = _KINDS[kind]
    parent, base = os.path.split(name_or_path)
    name = base[: -len(suffix)] if base.endswith(suffix) else base
    if parent in ("", kind) and name in shipped(kind):
        return os.path.join(recipe_dir(kind), name + suffix)
    raise FileNotFoundError(f"{what} not found: {name_or_path} (neither a file nor a shipped name: "
                            f"{', '.join(shipped(kind))})")


def resolve_config_path(name_or_path: str) -> str:
    """The YAML file of a run config given as a path or a shipped recipe name (``memvp_llama13b_sqa``)."""
    return _resolve("configs", name_or_path, "config file")


def resolve_ds_config(name_or_path: str) -> str:
    """The DeepSpeed JSON given as a path or a shipped name (``zero2``, ``zero3``, ``zero3_offload``)."""
    return _resolve("ds_configs", name_or_path, "train.ds_config: DeepSpeed config")
