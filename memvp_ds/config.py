"""Typed configuration: dataclasses are the schema, YAML files fill them, ``key=value`` overrides come last.

This module is the bottom layer: it imports nothing from the rest of memvp_ds and touches no file but the
YAML it is given. It holds the options every run has (LLM, data, training, evaluation, logging); each
strategy, layer skipping and each search declares its own options dataclass in its own file, and
``memvp_ds.schema`` adds them under ``model.<name>`` / ``search.<name>``. The DeepSpeed JSON is derived from
these values (``memvp_ds.engine.deepspeed_config``) so no number is written twice.

The docstring under each field is its reference documentation: ``memvp-train --help-config`` prints them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, with the offending key and the source named in the message."""


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}")


def check_at_least(key: str, value: Optional[float], minimum: float) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def check_above(key: str, value: Optional[float], bound: float) -> None:
    if value is not None and not value > bound:
        raise ConfigError(f"{key} must be > {bound}, got {value}")


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError naming the key of the first NaN or infinite number in the dataclass tree ``cfg``
    (NaN passes every range check, since it compares false with everything)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, key + ".")
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{key} must be a finite number, got {value}")


LLM_DTYPES = ("float32", "bfloat16", "float16")
PROJECTOR_ACTIVATIONS = ("silu", "gelu")
QUANTIZATIONS = ("8bit", "4bit")
ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
PRECISIONS = ("bf16", "fp16", "fp32")
TRAIN_MODES = ("train", "dvp_search", "das_search")
EVAL_SPLITS = ("train", "val", "test")


@dataclass
class LLMConfig:
    """The frozen language model."""

    path: Optional[str] = None
    """Local Hugging Face model directory (config.json + safetensors), or a GGUF file (``*.gguf``, llama.cpp's
    format: its tensors are dequantised to ``dtype`` on loading; needs the ``gguf`` package). Exclusive with
    ``config``."""
    gguf_file: Optional[str] = None
    """Name of a GGUF file inside the directory ``path`` (transformers' ``gguf_file``); null: ``path`` is an HF
    directory or itself a ``.gguf`` file."""
    config: Optional[Dict[str, Any]] = None
    """Inline HF config (must contain ``model_type``) for a randomly initialised model: tests and demos."""
    dtype: str = "bfloat16"
    """Storage dtype of the frozen weights: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory. Off: only architectures known to transformers."""
    attn_implementation: str = "sdpa"
    """HF attention backend: sdpa, eager, flash_attention_2, flash_attention_3 or flex_attention."""
    init_seed: int = 0
    """Seed for randomly initialised (inline-config) models, so every rank builds identical weights."""
    quantization: Optional[str] = None
    """8bit or 4bit: the frozen decoder blocks' linear layers are quantised by bitsandbytes as the weights
    load (LLM.int8, or NF4 computing in model.llm.dtype), for a GPU with too little memory for the 16-bit
    weights (docs/real_weights.md). Needs model.llm.path, a CUDA device and the bitsandbytes package; ZeRO-3
    cannot partition quantised weights, so it is refused there. Unset: the weights in model.llm.dtype."""

    def __post_init__(self) -> None:
        check_choice("model.llm.dtype", self.dtype, LLM_DTYPES)
        if self.quantization is not None:
            check_choice("model.llm.quantization", self.quantization, QUANTIZATIONS)
        check_choice("model.llm.attn_implementation", self.attn_implementation, ATTENTION_BACKENDS)
        if self.gguf_file is not None and self.path is None:
            raise ConfigError("model.llm.gguf_file: needs model.llm.path, the directory that holds the file")


@dataclass
class ProjectorConfig:
    """Visual projector shared by all strategies: Linear(C -> hidden) -> activation -> Linear(hidden -> d), x scale."""

    hidden_dim: int = 128
    """Width of the projector's hidden layer (official: 128)."""
    output_scale: float = 0.01
    """Factor on the projector's output (official: 0.01, so the visual term starts small)."""
    activation: str = "silu"
    """silu (MemVP's projector) or gelu (LLaVA-1.5's mlp2x_gelu, with hidden_dim = d and output_scale 1)."""

    def __post_init__(self) -> None:
        check_choice("model.projector.activation", self.activation, PROJECTOR_ACTIVATIONS)
        check_at_least("model.projector.hidden_dim", self.hidden_dim, 1)


@dataclass
class ModelConfig:
    """The frozen LLM, the visual features it receives and the strategy that feeds them in. Each strategy's
    own options (``model.memvp``, ``model.apt``, ...) and layer skipping (``model.skip``) are declared in
    their modules and added by ``memvp_ds.schema``."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    """The frozen language model."""
    strategy: str = "memvp"
    """Visual prompting strategy: one of memvp_ds.model.strategies.STRATEGIES (memvp, input_prefix, apt, dvp,
    lavin, llava_lora)."""
    visual_dim: int = 1024
    """C: channel width of the pre-extracted visual features (1024 for CLIP ViT-L/14)."""
    visual_tokens: int = 256
    """N: visual tokens per image (256 for ViT-L/14 at 224 px without CLS)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The visual projector shared by all strategies."""

    def __post_init__(self) -> None:
        if (self.llm.path is None) == (self.llm.config is None):
            raise ConfigError("model.llm: set exactly one of 'path' (local HF directory) or 'config' (inline HF config)")
        if self.llm.quantization and self.llm.path is None:
            raise ConfigError("model.llm.quantization: quantises weights as they load from model.llm.path; an inline "
                              "config (model.llm.config) has none")
        if self.llm.config is not None and "model_type" not in self.llm.config:
            raise ConfigError("model.llm.config: the inline HF config needs a 'model_type' (e.g. llama, mistral, qwen2)")
        check_at_least("model.visual_dim", self.visual_dim, 1)
        check_at_least("model.visual_tokens", self.visual_tokens, 1)


@dataclass
class DataConfig:
    """Where the shards are and how samples become token sequences."""

    shards: Optional[str] = None
    """data_prep's output folder (it holds manifest.json): each split uses every shard the manifest lists
    for it. ``train_shards``/``val_shards``/``test_shards`` replace a split's list by an explicit one."""
    train_shards: Optional[str] = None
    """Explicit shards of the training split instead of the manifest's list (a subset, or shards elsewhere):
    a brace pattern, a list separated by '::', or 'pipe:' URLs. The run plan reports the coverage."""
    val_shards: Optional[str] = None
    """Explicit shards of the validation split (periodic evaluation, held-out batches of the searches)."""
    test_shards: Optional[str] = None
    """Explicit shards of the test split (memvp-eval --split test)."""
    manifest: Optional[str] = None
    """manifest.json written by data_prep; default: the one in ``shards``, else next to the training shards."""
    tokenizer: Optional[str] = None
    """Local HF tokenizer directory (default: the LLM directory)."""
    prompt_format: str = "qcm_a"
    """qcm_a (ScienceQA 'Question/Context/Options' -> 'The answer is X.'), qa (question -> short answer, VQA
    scoring), conversation (LLaVA turns as 'USER: ... ASSISTANT: ...') or chat_template (LLaVA turns rendered
    by the tokenizer's own chat template, loss on the assistant turns: for instruct models)."""
    max_seq_len: int = 512
    """Longest token sequence; longer samples lose their oldest context tokens, never the answer."""
    max_images: int = 1
    """Most images one sample may have (``<image>`` up to this many times in a conversation or question; data_prep
    stores one feature array per image and the manifest's max_images must not exceed this). Above 1, MemVP's
    memory holds the N rows of each of a sample's images, kept apart (model.memvp.memory_rows must be at least
    max_images x model.visual_tokens); APT with visual=prompt_rows takes them all as prompt rows; the strategies
    that put visual tokens in the sequence (input_prefix, llava_lora, lavin, apt) put each image's N tokens at
    its <image> tag (a sample without tags: all in front, in order), on top of data.max_seq_len text tokens.
    DVP refuses it (its one token summarises one image). The online vision tower runs each image alone."""
    pad_to_multiple: int = 8
    """Batches are padded to a multiple of this length (tensor-core friendly shapes)."""
    shuffle_buffer: int = 1000
    """Samples held by each stream's seeded shuffle buffer."""
    num_workers: int = 2
    """DataLoader worker processes per rank (each a stream of its own shards)."""
    use_images: bool = True
    """False drops every image's features: the text-only control that shows what the images contribute."""
    max_bad_in_row: int = 50
    """Unusable samples in a row (unreadable, malformed for data.prompt_format, non-finite features) after which
    a data stream stops the run with one error naming the shard, the sample key and the cause. Isolated bad
    samples are skipped and counted (data/skipped_samples). 0: never stop (not recommended)."""
    max_bad_fraction: float = 0.5
    """A stream also stops when more than this share of the samples it read were unusable, checked once it has
    read 10 x max_bad_in_row samples."""
    packing: bool = True
    """Sequence packing of training batches: each micro-batch's ``train.micro_batch_size`` samples are
    concatenated into as few rows of ``max_seq_len`` positions as fit (plus the positions a strategy puts in
    front of each image sample's text: N visual tokens for input_prefix and APT, DVP's token slot), with
    attention, positions and visual terms kept per sample, so every sample's loss equals the padded batch's
    and steps, epochs and the schedule still count samples. Exact for every strategy. Evaluation, the
    searches' held-out batches and generation (KV-cache decoding of left-padded prompts) always use padded
    batches."""

    def __post_init__(self) -> None:
        for key in ("max_seq_len", "pad_to_multiple", "shuffle_buffer", "max_images"):
            check_at_least(f"data.{key}", getattr(self, key), 1)
        check_at_least("data.num_workers", self.num_workers, 0)
        check_at_least("data.max_bad_in_row", self.max_bad_in_row, 0)
        if not 0.0 < self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in (0, 1], got {self.max_bad_fraction}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, checkpoints."""

    output_dir: str = "runs/default"
    """Checkpoints, export, TensorBoard, config.yaml and status.json go here."""
    seed: int = 0
    """Seed of the strategy's initialisation, the data order and dropout."""
    epochs: float = 20.0
    """Training length in passes over the training split (counted in optimizer steps from the manifest)."""
    warmup_epochs: float = 2.0
    """Linear learning-rate warm-up, in epochs; cosine decay to ``min_lr`` after it."""
    max_steps: Optional[int] = None
    """Overrides epochs when set (optimizer steps)."""
    micro_batch_size: int = 4
    """Per-rank batch per forward."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    blr: float = 9e-3
    """Base learning rate: lr = blr * global_batch / 256."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.02
    """AdamW weight decay on matrices and memory tensors (none on biases)."""
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    grad_clip: float = 0.0
    """Gradient-norm clipping threshold (0: off, as in the official recipe)."""
    precision: str = "bf16"
    """bf16, fp16 or fp32 (frozen weights and compute; trainable master weights stay fp32). fp16 is the
    paper's precision (with model.llm.dtype=float16): DeepSpeed fp16 with dynamic loss scaling set like the
    official GradScaler (start 2**16, halve on overflow, double after 2000 clean steps) unless the
    DeepSpeed JSON's fp16 section says otherwise."""
    ds_config: str = "zero2"
    """DeepSpeed JSON: a file, or a shipped name (zero2, zero3, zero3_offload); its "auto" values are
    filled from this config."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block in backward (non-reentrant): less activation memory, ~1/3 more compute."""
    save_interval: int = 500
    """Optimizer steps between resumable checkpoints (one is also written at the end and on a stop signal)."""
    keep_last: int = 3
    """Newest resumable checkpoints of this run kept; its older ones are deleted (another run's never are)."""
    resume: str = "auto"
    """auto (the checkpoint ``latest`` names in output_dir, falling back to the previous complete one if it is
    broken; none: start fresh), never (start fresh), or a checkpoint directory. Checked before the model is
    built, as is the checkpoint's compatibility with this config."""
    max_nonfinite_steps: int = 10
    """Optimizer steps in a row with a non-finite loss after which the run stops (status "diverged") instead
    of training on; checkpoints are not written during such a streak, so ``latest`` stays a healthy one."""
    mode: str = "train"
    """train, dvp_search (find DVP's layer K) or das_search (find the layers to skip); a search run writes
    search.json to output_dir, which a training run reads through model.dvp / model.skip ``from_search``."""

    def __post_init__(self) -> None:
        check_choice("train.mode", self.mode, TRAIN_MODES)
        check_choice("train.precision", self.precision, PRECISIONS)
        for name in ("micro_batch_size", "grad_accum_steps", "save_interval", "keep_last", "max_nonfinite_steps"):
            check_at_least(f"train.{name}", getattr(self, name), 1)
        check_at_least("train.max_steps", self.max_steps, 1)
        check_above("train.epochs", self.epochs, 0)  # zero epochs would "complete" untrained and export
        check_above("train.blr", self.blr, 0)
        for name in ("warmup_epochs", "min_lr", "weight_decay", "grad_clip"):
            check_at_least(f"train.{name}", getattr(self, name), 0)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas needs two values, got {self.adam_betas}")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ConfigError(f"train.adam_betas must lie in [0, 1), got {self.adam_betas}")

    def check_min_lr(self, world_size: int) -> None:
        """min_lr is where the cosine decay ends, so it may not exceed the peak lr of this world size."""
        if self.min_lr > self.lr(world_size):
            raise ConfigError(f"train.min_lr={self.min_lr} is above the learning rate it decays from, "
                              f"{self.lr(world_size):.4g} (train.blr * global batch {self.global_batch(world_size)} "
                              "/ 256): lower train.min_lr or raise train.blr")

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def lr(self, world_size: int) -> float:
        """The official linear scaling rule: lr = blr * global_batch / 256."""
        return self.blr * self.global_batch(world_size) / 256


@dataclass
class EvalConfig:
    """Answer generation and scoring (memvp-eval, and periodic evaluation during training)."""

    split: str = "test"
    """Split memvp-eval scores by default: test, val or train."""
    batch_size: int = 8
    """Prompts per generation batch and rank."""
    max_new_tokens: int = 16
    """Greedy decoding length for free-form formats (qa, conversation). ScienceQA (qcm_a) always follows
    the official protocol: the prompt ends in 'The answer is', ONE token is generated, and its first
    capital letter is the answer (none, or a letter beyond the choices, is a parse failure: wrong)."""
    use_caption: bool = True
    """ScienceQA (qcm_a): the evaluation context is the hint + ' ' + the image caption (the 'caption' field
    data_prep takes from captions.json), as the official evaluation does; training never uses captions.
    False: the hint alone, as in training. The metrics report which was used."""
    interval: int = 0
    """Evaluate on the val shards every N optimizer steps (0: only at the end)."""
    max_samples: Optional[int] = None
    """Score only the first N samples of the split (quick checks)."""

    def __post_init__(self) -> None:
        check_choice("eval.split", self.split, EVAL_SPLITS)
        check_at_least("eval.batch_size", self.batch_size, 1)
        check_at_least("eval.max_new_tokens", self.max_new_tokens, 1)
        check_at_least("eval.max_samples", self.max_samples, 1)
        check_at_least("eval.interval", self.interval, 0)


@dataclass
class LoggingConfig:
    """Console and TensorBoard output."""

    log_interval: int = 10
    """Optimizer steps between logged (rank-averaged) metrics."""
    tensorboard: bool = True
    """Write TensorBoard event files to <output_dir>/tb."""
    peak_tflops: Optional[float] = None
    """Per-device peak for train/mfu; default: looked up from the GPU name (none on CPU, so no MFU there)."""

    def __post_init__(self) -> None:
        check_at_least("logging.log_interval", self.log_interval, 1)
        check_above("logging.peak_tflops", self.peak_tflops, 0)


@dataclass
class SearchConfig:
    """Architecture searches (train.mode=dvp_search | das_search). Each search's own options
    (``search.dvp``, ``search.das``) are declared in its module and added by ``memvp_ds.schema``."""

    heldout_batches: Optional[int] = None
    """Held-out micro-batches per rank that the policy updates rotate over: each update scores all its
    candidates on one batch, the next update on another (every pass in a new order drawn from the seed), as
    the official searches draw a fresh validation batch per update. Unset: the rank's whole share of
    data.val_shards (held in memory for the run); n: its first n micro-batches."""

    def __post_init__(self) -> None:
        if self.heldout_batches is not None:
            check_at_least("search.heldout_batches", self.heldout_batches, 1)


def default_model(model_cls: Type) -> Any:
    """A model config with an empty inline LLaMA config: the schema's placeholder until YAML fills it."""
    return model_cls(llm=LLMConfig(config={"model_type": "llama"}))


@dataclass
class Config:
    """One run: the model, its data, training, evaluation, logging and searches."""

    model: ModelConfig = field(default_factory=lambda: default_model(ModelConfig))
    """The frozen LLM and the strategy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and prompts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Architecture searches."""

    def __post_init__(self) -> None:
        explicit_only = self.data.train_shards and not self.data.shards
        if self.train.mode != "train" and explicit_only and not self.data.val_shards:
            raise ConfigError(f"train.mode={self.train.mode} scores sub-networks on held-out data: set data.val_shards")


STORED_CONFIG_IGNORED = ("data.shards", "data.train_shards", "data.val_shards", "data.test_shards", "data.manifest",
                         "train.output_dir", "train.resume", "model.llm.trust_remote_code")
"""Keys never taken from a stored config (an export's or a checkpoint's): a stored config is data, so it
chooses no command ('pipe:' shard URLs), no output location and no remote code. The user's own YAML or
``key=value`` overrides set them; otherwise they keep their defaults (no shards, trust_remote_code off)."""


def _without_ignored_keys(stored: Dict[str, Any]) -> Dict[str, Any]:
    kept = copy.deepcopy(stored)
    for key in STORED_CONFIG_IGNORED:
        *parents, leaf = key.split(".")
        node = kept
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return kept


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


def merge_config(schema_cls: Type, path: Optional[str] = None, overrides: Optional[List[str]] = None,
                 stored: Optional[Dict[str, Any]] = None) -> Any:
    """Fill the dataclass ``schema_cls`` from a ``stored`` plain-dict config (e.g. an export's, less the keys
    of STORED_CONFIG_IGNORED), then a YAML file, then ``key=value`` overrides, and build it (each
    dataclass's ``__post_init__`` checks its values).

    Raises ConfigError naming the file or override and the key for unknown keys, wrong types and invalid
    values. Nothing but the YAML file is read.
    """
    schema = OmegaConf.structured(schema_cls)
    # Start the inline LLM config empty so that a YAML 'llm.path' does not collide with the default config.
    schema.model.llm.config = None
    merged = schema
    if stored is not None:
        merged = _merge(merged, OmegaConf.create(_without_ignored_keys(stored)), "stored config")
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
        check_finite(cfg)
        return cfg
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, for writing next to checkpoints and exports."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_docs(cls: Type) -> Dict[str, str]:
    """The docstring written under each field of the dataclass ``cls`` (and its bases), by field name."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "types":
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # a class made at run time has no source
            continue
        body = ast.parse(source).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def describe_fields(cls: Type, prefix: str = "") -> Iterator[Tuple[str, str, Any, str]]:
    """(dotted key, type, default, docstring) for every leaf option of the dataclass ``cls``, depth first."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            yield from describe_fields(type(default), key + ".")
            continue
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        yield key, type_name, default, docs.get(f.name, "")

