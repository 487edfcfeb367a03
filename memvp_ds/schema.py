"""The whole config schema of a run, and ``load_config`` for applications.

``memvp_ds.config`` holds the options every run has; each strategy, layer skipping and each search declares
its own options dataclass in its own module. This module declares them, one typed field each, under
``model.<strategy>``, ``model.skip`` and ``search.<name>`` (so ``load_config`` returns a typed config that mypy
and an IDE see through), resolves ``from_search`` choices (the one place that reads a file other than the
YAML) and runs every group's ``validate`` rules. A new strategy with options adds its line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from memvp_ds.config import (
    Config,
    ConfigError,
    ModelConfig,
    SearchConfig,
    check_choice,
    default_model,
    merge_config,
)
from memvp_ds.data.prompts import prompt_format
from memvp_ds.model.layer_skip import SkipOptions
from memvp_ds.model.lora import LoRAOptions
from memvp_ds.recipes import resolve_config_path
from memvp_ds.model.strategies import STRATEGIES
from memvp_ds.model.strategies.apt import APTOptions
from memvp_ds.model.strategies.dvp import DVPOptions
from memvp_ds.model.strategies.lavin import LavinOptions
from memvp_ds.model.strategies.memvp import MemVPOptions
from memvp_ds.search.das import DASSearchOptions
from memvp_ds.search.dvp import DVPSearchOptions
from memvp_ds.search.result import apply_search_results
from memvp_ds.vision.tower import VisionOptions

@dataclass
class RunModelConfig(ModelConfig):
    """``model``: the core options and one group per strategy with options, layer skipping, the online vision
    tower and LoRA (one line each; tests/test_config.py checks it against the strategy registry)."""

    memvp: MemVPOptions = field(default_factory=MemVPOptions)
    """MemVP: visual memory in every FFN (model/strategies/memvp.py)."""
    apt: APTOptions = field(default_factory=APTOptions)
    """APT: prompts approximated into every attention (model/strategies/apt.py)."""
    dvp: DVPOptions = field(default_factory=DVPOptions)
    """DVP: one cross-attention prompt at layer K (model/strategies/dvp.py)."""
    lavin: LavinOptions = field(default_factory=LavinOptions)
    """LaVIN: routed adapters and the modality token (model/strategies/lavin.py)."""
    skip: SkipOptions = field(default_factory=SkipOptions)
    """DAS layer skipping (model/layer_skip.py)."""
    vision: VisionOptions = field(default_factory=VisionOptions)
    """The online CLIP tower (vision/tower.py)."""
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    """LoRA on the frozen LLM through peft (model/lora.py)."""


@dataclass
class RunSearchConfig(SearchConfig):
    """``search``: one group per architecture search."""

    dvp: DVPSearchOptions = field(default_factory=DVPSearchOptions)
    """DVP's KAB-APP layer search (search/dvp.py)."""
    das: DASSearchOptions = field(default_factory=DASSearchOptions)
    """DAS's layer-skip search (search/das.py)."""


@dataclass
class RunConfig(Config):
    """The schema of a run: ``Config`` with every option group, typed (``cfg.model.memvp`` is a MemVPOptions)."""

    model: RunModelConfig = field(default_factory=lambda: default_model(RunModelConfig))
    """The frozen LLM, the strategy and the option groups."""
    search: RunSearchConfig = field(default_factory=RunSearchConfig)
    """Architecture searches (train.mode=dvp_search | das_search)."""


def option_groups(schema: type) -> List[str]:
    """The option-group fields that ``schema`` adds to its core dataclass (each has a ``validate`` rule)."""
    core = {f.name for f in fields(schema.__mro__[1])}
    return [f.name for f in fields(schema) if f.name not in core]


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                stored: Optional[Dict[str, Any]] = None) -> RunConfig:
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
    for schema, parent in ((RunModelConfig, cfg.model), (RunSearchConfig, cfg.search)):
        for name in option_groups(schema):
            getattr(parent, name).validate(cfg)
    if cfg.data.max_images > 1 and not STRATEGIES[cfg.model.strategy].multi_image:
        multi = ", ".join(name for name, cls in STRATEGIES.items() if cls.multi_image)
        raise ConfigError(f"data.max_images={cfg.data.max_images}: model.strategy={cfg.model.strategy} takes one image "
                          f"per sample; multi-image samples need {multi}")
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
