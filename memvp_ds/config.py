"""Typed configuration: dataclasses are the schema, YAML files fill them, ``key=value`` overrides come last.

Every option lives in exactly one place here; the DeepSpeed JSON is derived from these values
(see ``memvp_ds.engine.deepspeed_config``) so no number is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, with the offending key and the source named in the message."""


@dataclass
class LLMConfig:
    """The frozen language model."""

    path: Optional[str] = None
    """Local Hugging Face model directory (config.json + safetensors). Exclusive with ``config``."""
    config: Optional[Dict[str, Any]] = None
    """Inline HF config (must contain ``model_type``) for a randomly initialised model: tests and demos."""
    dtype: str = "bfloat16"
    """Storage dtype of the frozen weights: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory. Off: only architectures known to transformers."""
    attn_implementation: str = "sdpa"
    """HF attention backend: sdpa, eager or flash_attention_2."""
    init_seed: int = 0
    """Seed for randomly initialised (inline-config) models, so every rank builds identical weights."""


@dataclass
class ProjectorConfig:
    """Visual projector shared by all strategies: Linear(C -> hidden) -> SiLU -> Linear(hidden -> d), x scale."""

    hidden_dim: int = 128
    output_scale: float = 0.01


@dataclass
class MemVPConfig:
    """Options of the ``memvp`` strategy (Jie et al., ICML 2024)."""

    memory_rows: int = 400
    """M: visual tokens are zero-padded to M rows; the extra rows act as learnable memory slots."""
    memory_scale: float = 0.1
    """s in ``out = h + FFN(x) + s * Dropout(SiLU(x K^T)) V``."""
    dropout: float = 0.1


@dataclass
class APTConfig:
    """Options of the ``apt`` strategy (approximated prompt tuning, Wu et al. 2023); see docs/strategies/apt.md."""

    prompts: int = 200
    """p: learnable prompt rows per layer, beside the N projected visual tokens (0: the visual tokens alone)."""
    rank: int = 4
    """r of the low-rank map W1 W2 that approximates the prompts' key projection."""


@dataclass
class DVPConfig:
    """Options of the ``dvp`` strategy (dynamic visual prompting, Huang et al. 2023); see docs/strategies/dvp.md."""

    layer: Optional[int] = None
    """K: the decoder layer whose input receives the visual prompt. Unset: taken from ``from_search``, or,
    under ``train.mode=dvp_search``, every layer is a candidate."""
    from_search: Optional[str] = None
    """Output directory of a ``train.mode=dvp_search`` run: fills ``layer`` from its search.json when unset."""
    heads: int = 16
    inner_dim: int = 512
    """Width of the cross-attention (queries from the text state, keys/values from the CLIP features)."""
    dropout: float = 0.1
    adapters: bool = False
    """DVP + adapter: bottleneck adapters after every attention and MLP output."""
    adapter_reduction: int = 64
    """Adapter hidden width = hidden_size / adapter_reduction."""


@dataclass
class SkipConfig:
    """Dynamic architecture skipping (DAS, Wu et al. 2023): decoder layers replaced by light adapters."""

    layers: List[int] = field(default_factory=list)
    """Decoder layers (0-based) that are not computed; each becomes ``h + adapter(input_layernorm(h))``."""
    from_search: Optional[str] = None
    """Output directory of a ``train.mode=das_search`` run: fills ``layers`` from its search.json when empty."""
    adapter_dim: int = 256
    """Hidden width of each skipped layer's bottleneck adapter."""


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    strategy: str = "memvp"
    """Visual prompting strategy: one of memvp_ds.model.strategies.STRATEGIES (memvp, input_prefix, apt, dvp)."""
    visual_dim: int = 1024
    """C: channel width of the pre-extracted visual features (1024 for CLIP ViT-L/14)."""
    visual_tokens: int = 256
    """N: visual tokens per image (256 for ViT-L/14 at 224 px without CLS)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    memvp: MemVPConfig = field(default_factory=MemVPConfig)
    apt: APTConfig = field(default_factory=APTConfig)
    dvp: DVPConfig = field(default_factory=DVPConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)

    def __post_init__(self) -> None:
        if (self.llm.path is None) == (self.llm.config is None):
            raise ConfigError("model.llm: set exactly one of 'path' (local HF directory) or 'config' (inline HF config)")
        if self.llm.config is not None and "model_type" not in self.llm.config:
            raise ConfigError("model.llm.config: the inline HF config needs a 'model_type' (e.g. llama, mistral, qwen2)")
        if self.llm.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.llm.dtype: '{self.llm.dtype}' is not one of float32, bfloat16, float16")
        if self.strategy == "memvp" and self.visual_tokens > self.memvp.memory_rows:
            raise ConfigError(
                f"model.visual_tokens ({self.visual_tokens}) exceeds model.memvp.memory_rows "
                f"({self.memvp.memory_rows}): every visual token needs a memory row"
            )


@dataclass
class DataConfig:
    train_shards: Optional[str] = None
    """WebDataset shards of the training split: a brace pattern, a list separated by '::', or 'pipe:' URLs."""
    val_shards: Optional[str] = None
    test_shards: Optional[str] = None
    manifest: Optional[str] = None
    """manifest.json written by data_prep; default: the one next to the training shards."""
    tokenizer: Optional[str] = None
    """Local HF tokenizer directory (default: the LLM directory)."""
    prompt_format: str = "qcm_a"
    """qcm_a (ScienceQA 'Question/Context/Options' -> 'Answer: The answer is X.') or conversation (LLaVA)."""
    max_seq_len: int = 512
    pad_to_multiple: int = 8
    shuffle_buffer: int = 1000
    num_workers: int = 2
    use_images: bool = True
    """False drops every image's features: the text-only control that shows what the images contribute."""


TRAIN_MODES = ("train", "dvp_search", "das_search")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    epochs: float = 20.0
    warmup_epochs: float = 2.0
    max_steps: Optional[int] = None
    """Overrides epochs when set (optimizer steps)."""
    micro_batch_size: int = 4
    """Per-rank batch per forward."""
    grad_accum_steps: int = 1
    blr: float = 9e-3
    """Base learning rate: lr = blr * global_batch / 256."""
    min_lr: float = 0.0
    weight_decay: float = 0.02
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 0.0
    """Gradient-norm clipping threshold (0: off, as in the official recipe)."""
    precision: str = "bf16"
    """bf16, fp16 or fp32 (frozen weights and compute; trainable master weights stay fp32)."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; its "auto" values are filled from this config."""
    gradient_checkpointing: bool = False
    save_interval: int = 500
    keep_last: int = 3
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint directory."""
    mode: str = "train"
    """train, dvp_search (find DVP's layer K) or das_search (find the layers to skip); a search run writes
    search.json to output_dir, which a training run reads through model.dvp / model.skip ``from_search``."""

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ConfigError(f"train.mode: '{self.mode}' is not one of {', '.join(TRAIN_MODES)}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision: '{self.precision}' is not one of bf16, fp16, fp32")
        for name in ("micro_batch_size", "grad_accum_steps", "save_interval", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas needs two values, got {self.adam_betas}")

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def lr(self, world_size: int) -> float:
        """The official linear scaling rule: lr = blr * global_batch / 256."""
        return self.blr * self.global_batch(world_size) / 256


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 8
    max_new_tokens: int = 16
    interval: int = 0
    """Evaluate on the val shards every N optimizer steps (0: only at the end)."""
    max_samples: Optional[int] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    peak_tflops: Optional[float] = None
    """Per-device peak for train/mfu; default: looked up from the GPU name (none on CPU, so no MFU there)."""


@dataclass
class DVPSearchConfig:
    """KAB-APP: a k-armed bandit over DVP's insertion layer (train.mode=dvp_search)."""

    arms: int = 10
    """m: arms drawn from the policy and scored after each update interval."""
    eta: float = 0.1
    """Step size of ``a[k] += eta * (r_k - mean r) * pi_k (1 - pi_k)`` with rewards r = 100 exp(-loss)."""
    interval: int = 1
    """Optimizer steps between policy updates."""


@dataclass
class DASSearchConfig:
    """Search for the layers to skip (train.mode=das_search)."""

    skip: int = 1
    """k: layers skipped by every sampled sub-network and in the final skip list."""
    subsets: int = 4
    """Distinct skip sets scored per update."""
    eta: float = 10.0
    """Step size of ``s_i += eta * (r_j - mean r) * p_i (1 - p_i)`` with rewards r = exp(-loss)."""
    turn: int = 5
    """Optimizer steps between score updates."""
    warmup_steps: int = 0
    """Steps before the first score update (the adapters learn first)."""
    ramp: bool = False
    """Grow the number of skipped layers from 1 to ``skip`` over the warm-up."""
    candidates: Optional[List[int]] = None
    """Layers that may be skipped (default: all)."""


@dataclass
class SearchConfig:
    """Architecture searches. Sub-networks are scored on held-out batches from data.val_shards."""

    heldout_batches: int = 4
    """Held-out micro-batches per rank, cycled through by the updates (loaded once, so resumes are exact)."""
    dvp: DVPSearchConfig = field(default_factory=DVPSearchConfig)
    das: DASSearchConfig = field(default_factory=DASSearchConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(llm=LLMConfig(config={"model_type": "llama"})))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


def _valid_keys(schema: Any, full_key: str) -> List[str]:
    """Keys allowed at the parent of ``full_key`` in the schema, for error messages."""
    node = schema
    for part in full_key.split(".")[:-1]:
        if not OmegaConf.is_dict(node) or part not in node:
            break
        child = node._get_node(part)
        if not OmegaConf.is_dict(child):
            break
        node = child
    return sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []


def _merge(schema: Any, layer: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(schema, layer)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        valid = ", ".join(_valid_keys(schema, key))
        raise ConfigError(f"{source}: unknown key '{key}'. Valid keys here: {valid}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid value for '{err.full_key}': {str(err.msg).splitlines()[0]}") from None


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                stored: Optional[Dict[str, Any]] = None) -> Config:
    """Read a YAML config (or a ``stored`` plain-dict config, e.g. from an export) and ``key=value``
    overrides onto the typed schema and validate it.

    Raises ConfigError naming the file or override and the key for unknown keys, wrong types and
    inconsistent values. Nothing heavy (no model, no data) is touched here.
    """
    schema = OmegaConf.structured(Config)
    # Start the inline LLM config empty so that a YAML 'llm.path' does not collide with the default config.
    schema.model.llm.config = None
    merged = schema
    if stored is not None:
        merged = _merge(merged, OmegaConf.create(stored), "stored config")
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as err:  # yaml parse errors carry line numbers; keep them
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
        merged = _merge(merged, layer, path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}'")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    _check_strategy(cfg.model.strategy)
    _resolve_searches(cfg)
    return cfg


def _check_strategy(name: str) -> None:
    from memvp_ds.model.strategies import STRATEGIES  # deferred: the registry imports torch

    if name not in STRATEGIES:
        raise ConfigError(f"model.strategy: unknown strategy '{name}'; choose one of {sorted(STRATEGIES)}")


SEARCH_RESULT = "search.json"


def read_search_result(directory: str, option: str) -> Dict[str, Any]:
    """The search.json a ``dvp_search`` / ``das_search`` run wrote to its output directory."""
    path = os.path.join(directory, SEARCH_RESULT)
    if not os.path.isfile(path):
        raise ConfigError(f"{option}: {path} not found; run train.mode=dvp_search or das_search with "
                          f"train.output_dir={directory} first")
    with open(path) as f:
        return json.load(f)


def _resolve_searches(cfg: Config) -> None:
    """Fill the searched choices from ``from_search`` and check the modes and strategies fit together."""
    model, mode = cfg.model, cfg.train.mode
    if model.dvp.from_search and model.dvp.layer is None:
        model.dvp.layer = read_search_result(model.dvp.from_search, "model.dvp.from_search")["dvp_layer"]
    if model.skip.from_search and not model.skip.layers:
        model.skip.layers = read_search_result(model.skip.from_search, "model.skip.from_search")["skip_layers"]
    if mode == "dvp_search":
        if model.strategy != "dvp" or model.dvp.layer is not None:
            raise ConfigError("train.mode=dvp_search needs model.strategy=dvp with model.dvp.layer unset")
        if model.skip.layers:
            raise ConfigError("train.mode=dvp_search: search with all layers (model.skip.layers must be empty)")
    elif mode == "das_search":
        if model.skip.layers:
            raise ConfigError("train.mode=das_search chooses the skipped layers: model.skip.layers must be empty")
        if model.strategy == "dvp" and model.dvp.layer is None:
            raise ConfigError("train.mode=das_search with model.strategy=dvp needs a fixed model.dvp.layer")
    elif model.strategy == "dvp" and model.dvp.layer is None:
        raise ConfigError("model.dvp.layer: set it or model.dvp.from_search (a train.mode=dvp_search output), "
                          "or run train.mode=dvp_search to find it")
    if model.strategy == "dvp" and model.dvp.layer in model.skip.layers:
        raise ConfigError(f"model.dvp.layer {model.dvp.layer} is in model.skip.layers: the prompt's layer must run")
    if mode != "train" and not cfg.data.val_shards and cfg.data.train_shards:
        raise ConfigError(f"train.mode={mode} scores sub-networks on held-out data: set data.val_shards")
    if len(set(model.skip.layers)) != len(model.skip.layers) or any(i < 0 for i in model.skip.layers):
        raise ConfigError(f"model.skip.layers: {model.skip.layers} must be distinct non-negative layer indices")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, for writing next to checkpoints and exports."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
