"""The whole config schema of a run, and ``load_config`` for applications.

``memvp_ds.config`` holds the options every run has; each strategy, layer skipping and each search declares
its own options dataclass in its own module. This module adds them under ``model.<strategy>``,
``model.skip`` and ``search.<name>``, resolves ``from_search`` choices (the one place that reads a file other
than the YAML) and runs every group's ``validate`` rules. A new strategy therefore needs no line here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from memvp_ds.config import (
    Config,
    ConfigError,
    ModelConfig,
    SearchConfig,
    check_choice,
    default_model,
    extend_schema,
    merge_config,
)
from memvp_ds.data.prompts import prompt_format
from memvp_ds.model.layer_skip import SkipOptions
from memvp_ds.recipes import resolve_config_path
from memvp_ds.model.strategies import STRATEGIES
from memvp_ds.search.das import DASSearchOptions
from memvp_ds.search.dvp import DVPSearchOptions
from memvp_ds.search.result import apply_search_results
from memvp_ds.vision.tower import VisionOptions

MODEL_GROUPS = {**{name: cls.options for name, cls in STRATEGIES.items() if cls.options}, "skip": SkipOptions,
                "vision": VisionOptions}
"""Option groups under ``model.``: one per strategy that has options, layer skipping and the online vision tower."""
SEARCH_GROUPS = {"dvp": DVPSearchOptions, "das": DASSearchOptions}
"""Option groups under ``search.``."""

RunModelConfig = extend_schema(ModelConfig, MODEL_GROUPS)
RunSearchConfig = extend_schema(SearchConfig, SEARCH_GROUPS)
RunConfig = extend_schema(Config, {"model": RunModelConfig, "search": RunSearchConfig},
                          defaults={"model": lambda: default_model(RunModelConfig)})
"""The schema of a run: ``Config`` with every registered option group."""


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                stored: Optional[Dict[str, Any]] = None) -> Any:
    """Read a YAML config (a file or a shipped recipe name such as ``tiny_memvp``; on top of a ``stored``
    plain-dict config, e.g. an export's) and ``key=value`` overrides onto the run schema, fill
    ``from_search`` choices and check every rule.

    Raises ConfigError naming the file or override and the key (FileNotFoundError for a missing config
    file). No model or data is touched.
    """
    cfg = merge_config(RunConfig, resolve_config_path(path) if path else None, overrides, stored)
    check_choice("model.strategy", cfg.model.strategy, sorted(STRATEGIES))
    prompt_format(cfg.data.prompt_format)  # a registered one (data/prompts.py)
    apply_search_results(cfg)
    for groups, parent in ((MODEL_GROUPS, cfg.model), (SEARCH_GROUPS, cfg.search)):
        for name in groups:
            getattr(parent, name).validate(cfg)
    if cfg.data.max_images > 1 and not STRATEGIES[cfg.model.strategy].multi_image:
        multi = ", ".join(name for name, cls in STRATEGIES.items() if cls.multi_image)
        raise ConfigError(f"data.max_images={cfg.data.max_images}: model.strategy={cfg.model.strategy} takes one image "
                          f"per sample; multi-image samples need {multi}")
    if cfg.data.max_images > 1 and cfg.model.vision.online:
        raise ConfigError(f"data.max_images={cfg.data.max_images}: the online vision tower (model.vision.online) takes "
                          "one image per sample; use stored features")
    return cfg


def config_reference() -> str:
    """Every option of the run schema: ``key (type, default: value)`` and its docstring, one block each
    (memvp-train --help-config)."""
    import textwrap

    from memvp_ds.config import describe_fields

    blocks = []
    for key, type_name, default, doc in describe_fields(RunConfig):
        body = textwrap.indent(textwrap.fill(doc, 100), "    ") if doc else "    (undocumented)"
        blocks.append(f"{key} ({type_name}, default: {default!r})\n{body}")
    return "\n".join(blocks)


__all__ = ["ConfigError", "RunConfig", "config_reference", "load_config"]
