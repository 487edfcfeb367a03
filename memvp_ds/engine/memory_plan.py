"""Will it fit: the GPU memory one rank needs for a run, estimated from the config alone (memvp-train --dry-run).

Model states. DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``) assume every parameter trains in 16-bit mixed precision: 16-bit
weights, gradients, fp32 master weights and two fp32 Adam moments (18 bytes a parameter beside the 16-bit
weights). Here almost every parameter is frozen: a frozen weight is only its 16-bit copy, with no gradient,
master copy or optimizer state. So the estimators are run on the trainable parameters alone, and the frozen
weights are added by hand: replicated under ZeRO-0/1/2, partitioned under ZeRO-3 plus the largest unit ZeRO-3
gathers at a time (the frozen decoder blocks are leaf modules, gathered whole: engine/zero3_leaves.py), which
DeepSpeed's stage-3 estimator counts as 4 bytes a parameter of the largest layer (two 16-bit copies: the one
running and the one prefetched). The split of the estimators' sums into weights, gradients and optimizer
states is theirs (their comments); the report shows our sum beside the estimator's and they agree.

Activations: what autograd keeps for backward in one micro-batch, counted per decoder block for the LLaMA
pre-norm block (tests/test_memory_plan.py checks the count against the tensors autograd really saves). The
frozen linear layers keep no input (their weight needs no gradient, so autograd stores only the weight). For
MemVP the first block keeps only its memory term: nothing before it depends on a trainable tensor.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

GIB = 2**30
FIT_FRACTION = 0.9
"""A run "fits" when the estimate is at most this share of the GPU's memory: the estimate leaves out the CUDA
context (0.5-1 GiB), the allocator's fragmentation and the communication buckets."""
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|TiB|TB|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "mib": 2**20, "mb": 10**6, "gib": GIB, "gb": 10**9, "tib": 2**40, "tb": 10**12}


def parse_memory_size(text: str, option: str = "--gpu-memory") -> int:
    """'80GiB', '141GB', '81920MiB' or a number of bytes -> bytes; ConfigError naming ``option`` otherwise."""
    from memvp_ds.config import ConfigError

    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{option}: '{text}' is not a memory size (e.g. 80GiB, 141GB, 81920MiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


@dataclass
class ModelShape:
    """What the estimate needs to know about the model, read from a copy built on the meta device."""

    frozen_params: int
    trainable_params: int
    largest_gathered_unit: int
    """Parameters of the largest unit ZeRO-3 gathers at once: a frozen decoder block (a leaf module), the
    embedding or the LM head, or the largest trainable module."""
    largest_trainable_module: int
    quantizable_params: int
    """Weights of the decoder blocks' linear layers: what model.llm.quantization stores in 8 or 4 bits."""
    layers: int
    """Decoder blocks that run (the skipped ones of model.skip excluded)."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    memory_rows: int
    """M of MemVP (0 for the other strategies)."""
    prefix_positions: int
    """Positions an input-space strategy puts in the sequence per image (in front of a one-image sample's
    text, at each tag of a multi-image one)."""


def model_shape(model_cfg) -> ModelShape:
    """Build the run's model on the meta device (no weights are read, no memory is used) and measure it."""
    import torch

    from memvp_ds.model import build_model
    from memvp_ds.model.llm import build_meta_llm, decoder_layers

    # An online CLIP tower's random initialisation has the shapes and reads no checkpoint file.
    vision = model_cfg.vision
    vision = dataclasses.replace(vision, recipe=dataclasses.replace(vision.recipe, pretrained="random"))
    with torch.device("meta"):
        model = build_model(dataclasses.replace(model_cfg, vision=vision), llm=build_meta_llm(model_cfg.llm))
    hf = model.llm.config
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    blocks = [sum(p.numel() for p in block.parameters()) for block in decoder_layers(model.llm)]
    modules = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    trainable_modules = [sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
                         for m in model.modules()]
    linear = [m.weight.numel() for block in decoder_layers(model.llm) for m in block.modules()
              if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    memory = getattr(model.strategy, "memory", None)
    heads = hf.num_attention_heads
    return ModelShape(
        frozen_params=sum(p.numel() for p in params) - trainable, trainable_params=trainable,
        largest_gathered_unit=max(blocks + modules), largest_trainable_module=max(trainable_modules),
        quantizable_params=sum(linear),
        layers=model.computed_layers, hidden=hf.hidden_size, intermediate=hf.intermediate_size, heads=heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, vocab=hf.vocab_size,
        memory_rows=memory.memory_keys.shape[1] if memory is not None else 0,
        prefix_positions=model.strategy.prefix_positions())


@dataclass
class ZeroSetup:
    """The ZeRO settings that change what one rank holds."""

    stage: int
    world_size: int
    offload_optimizer: bool
    offload_param: bool

    @classmethod
    def from_ds_config(cls, ds: Dict[str, Any], world_size: int) -> "ZeroSetup":
        zero = ds.get("zero_optimization", {})
        offloaded = lambda key: zero.get(key, {}).get("device", "none") not in (None, "none")  # noqa: E731
        return cls(int(zero.get("stage", 0)), world_size, offloaded("offload_optimizer"), offloaded("offload_param"))


QUANTIZED_BYTES_16THS = {"8bit": 16, "4bit": 9}
"""Sixteenths of a byte per quantised weight: LLM.int8 1 byte (its per-row scales are negligible); NF4 half a byte
plus an fp32 scale per block of 64 (4/64 byte)."""


def model_states(shape: ModelShape, zero: ZeroSetup, weight_bytes: int, quantization: Optional[str] = None
                 ) -> Dict[str, int]:
    """Bytes per rank of weights, gradients and optimizer states (see the module docstring).

    Mixed precision (``weight_bytes`` 2), as DeepSpeed's estimators count a trainable parameter: 16-bit weight
    2 bytes, gradients 16-bit 2 + fp32 4 (stage 3: fp32 4 only), fp32 master weight 4 + Adam moments 8. fp32
    training (``weight_bytes`` 4) has no master copy: weight 4, gradient 4, moments 8. Partitioned over the
    ranks: the optimizer states from stage 1, the gradients from stage 2, every weight at stage 3. With
    ``quantization`` (8bit, 4bit) the decoder blocks' linear weights take its bytes instead (never ZeRO-3).
    """
    n, t = zero.world_size, shape.trainable_params
    mixed = weight_bytes == 2
    states_split = n if zero.stage >= 1 else 1
    grads_split = n if zero.stage >= 2 else 1
    weights_split = n if zero.stage >= 3 else 1
    grad_bytes = (4 if zero.stage >= 3 else 6) if mixed else 4
    quantized = shape.quantizable_params if quantization else 0
    frozen = ((shape.frozen_params - quantized) * weight_bytes
              + quantized * QUANTIZED_BYTES_16THS.get(quantization, 0) // 16)
    states = {
        "frozen_weights": 0 if zero.offload_param else frozen // weights_split,
        "trainable_weights": 0 if zero.offload_param else t * weight_bytes // weights_split,
        "gradients": 0 if zero.offload_optimizer else t * grad_bytes // grads_split,
        "optimizer_states": 0 if zero.offload_optimizer else t * (12 if mixed else 8) // states_split,
        "zero3_gathered": 2 * weight_bytes * shape.largest_gathered_unit if zero.stage >= 3 else 0,
    }
    return states


def _deepspeed_estimators():
    """DeepSpeed's stage-2 and stage-3 estimators. Importing DeepSpeed logs its accelerator choice through a
    handler that takes sys.stdout at import time; --dry-run's stdout must stay one JSON object, so the import
    runs with stdout pointed at stderr (DeepSpeed's later log lines in this process go there too)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def deepspeed_estimate(shape: ModelShape, zero: ZeroSetup, weight_bytes: int) -> Optional[int]:
    """DeepSpeed's own GPU estimate for the trainable parameters (where one exists: 16-bit mixed precision,
    ZeRO-2, or ZeRO-3 without parameter offload), or None."""
    if weight_bytes != 2 or zero.stage not in (2, 3) or zero.offload_param:
        return None
    zero2, zero3 = _deepspeed_estimators()
    if zero.stage == 2:
        return zero2(shape.trainable_params, num_gpus_per_node=zero.world_size, cpu_offload=zero.offload_optimizer)[1]
    return zero3(shape.trainable_params, shape.largest_trainable_module, num_gpus_per_node=zero.world_size,
                 cpu_offload=zero.offload_optimizer, cpu_offload_params=False)[1]


def block_activations(shape: ModelShape, positions: int, b: int) -> int:
    """Bytes one LLaMA pre-norm decoder block keeps for backward over ``positions`` positions (activations of
    ``b`` bytes). Each RMSNorm keeps its input upcast to fp32 and the fp32 1/rms per position; attention keeps
    q, k, v after RoPE (k and v at the key/value heads), its output and the fp32 log-sum-exp per head (the
    flash / memory-efficient kernels; the eager one adds the heads x T x T probabilities); the gated FFN keeps
    its gate and up projections and the activated gate."""
    d, f, e = shape.hidden, shape.intermediate, shape.head_dim
    norms = 2 * (4 * d + 4)
    attention = b * (2 * shape.heads + 2 * shape.kv_heads) * e + 4 * shape.heads
    return positions * (norms + attention + 3 * b * f)


def memory_term_activations(shape: ModelShape, positions: int, b: int) -> int:
    """Bytes MemVP's memory term keeps per block: the FFN input x (for K's gradient), the scores x K^T, the
    dropout mask (CUDA keeps it as bool, 1 byte, so this is b - 1 bytes an element high there) and the
    dropped-out scores (for V's gradient)."""
    return positions * b * (shape.hidden + 3 * shape.memory_rows)


@dataclass
class MicroBatch:
    """The shape of one training micro-batch at its largest."""

    samples: int
    text_positions: int
    """samples x data.max_seq_len: every one may carry a label (the upper bound of the loss's size)."""
    positions: int
    """Positions the decoder runs: text plus the positions an input-space strategy puts in the sequence for
    each image. Packed or padded, a micro-batch holds at most ``samples`` rows of them."""
    visual_tokens: int
    """Visual feature rows per sample (N per image slot)."""
    visual_dim: int
    projector_hidden: int


def saved_activations(shape: ModelShape, batch: MicroBatch, b: int, checkpointing: bool) -> int:
    """Bytes autograd keeps from one micro-batch's forward for its backward (activations of ``b`` bytes).

    Outside the blocks: RoPE's cos and sin, the projector's input and hidden activations, the final RMSNorm,
    the loss's fp32 log-probabilities over the vocabulary at every labelled position and, for MemVP, K and V
    (kept by the strategy for the whole step). With gradient checkpointing a block keeps only its input."""
    p = batch.positions
    memvp = shape.memory_rows > 0
    term = memory_term_activations(shape, p, b) if memvp else 0
    block = block_activations(shape, p, b) + term
    outside = (2 * p * shape.head_dim * b
               + batch.samples * batch.visual_tokens * (batch.visual_dim + 2 * batch.projector_hidden) * b
               + p * (4 * shape.hidden + 4)
               + batch.text_positions * 4 * shape.vocab
               + (2 * batch.samples * shape.memory_rows * shape.hidden * b if memvp else 0))
    if checkpointing:
        return shape.layers * p * shape.hidden * b + outside
    if memvp:  # the first block's attention and FFN depend on nothing trainable
        return (shape.layers - 1) * block + term + outside
    return shape.layers * block + outside


def peak_activations(shape: ModelShape, batch: MicroBatch, b: int, checkpointing: bool) -> int:
    """``saved_activations`` plus, with checkpointing, the one block that backward recomputes at a time."""
    recomputed = block_activations(shape, batch.positions, b) + (
        memory_term_activations(shape, batch.positions, b) if shape.memory_rows else 0)
    return saved_activations(shape, batch, b, checkpointing) + (recomputed if checkpointing else 0)


PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def micro_batch(cfg, shape: ModelShape) -> MicroBatch:
    samples, length = cfg.train.micro_batch_size, cfg.data.max_seq_len
    visual_tokens = cfg.model.visual_tokens * cfg.data.max_images  # every image slot is projected
    # Several images per sample: each image's positions in the text (data/collate.py: SampleEncoder).
    in_sequence = shape.prefix_positions * cfg.data.max_images
    return MicroBatch(samples, samples * length, samples * (length + in_sequence), visual_tokens,
                      cfg.model.visual_dim, cfg.model.projector.hidden_dim)


def memory_plan(cfg, ds: Dict[str, Any], world_size: int, gpu_memory: Optional[int] = None,
                shape: Optional[ModelShape] = None) -> Dict[str, Any]:
    """The per-rank estimate for the run ``cfg`` with DeepSpeed JSON ``ds`` on ``world_size`` ranks, as a
    JSON-able dict (bytes and GiB per component, totals with and without gradient checkpointing, and, with
    ``gpu_memory`` bytes, whether the run's setting fits)."""
    shape = shape or model_shape(cfg.model)
    zero = ZeroSetup.from_ds_config(ds, world_size)
    b = PRECISION_BYTES[cfg.train.precision]
    batch = micro_batch(cfg, shape)
    states = model_states(shape, zero, b, cfg.model.llm.quantization)
    acts = {ckpt: peak_activations(shape, batch, b, ckpt) for ckpt in (False, True)}
    on = cfg.train.gradient_checkpointing
    totals = {ckpt: sum(states.values()) + acts[ckpt] for ckpt in (False, True)}
    gib = lambda x: round(x / GIB, 2)  # noqa: E731
    # DeepSpeed's estimate covers the trainable parameters, and at stage 3 gathering the largest trainable module.
    estimate = deepspeed_estimate(shape, zero, b)
    ours = (states["trainable_weights"] + states["gradients"] + states["optimizer_states"]
            + (2 * b * shape.largest_trainable_module if zero.stage >= 3 else 0))
    plan: Dict[str, Any] = {
        "zero": dataclasses.asdict(zero),
        "quantization": cfg.model.llm.quantization,
        "parameters": {"frozen": shape.frozen_params, "trainable": shape.trainable_params},
        "positions_per_micro_batch": batch.positions,
        "per_rank_bytes": {**states, "activations": acts[False], "activations_checkpointed": acts[True]},
        "per_rank_gib": {**{k: gib(v) for k, v in states.items()},
                         "activations": gib(acts[False]), "activations_checkpointed": gib(acts[True])},
        "trainable_states_bytes": {"ours": ours, "deepspeed_estimator": estimate},
        "total_gib": {"without_checkpointing": gib(totals[False]), "with_checkpointing": gib(totals[True])},
        "gradient_checkpointing": on,
    }
    uncounted = [f"model.strategy={cfg.model.strategy}'s own attention activations"] if cfg.model.strategy in (
        "apt", "dvp") else []
    uncounted += ["the online CLIP tower's activations"] if cfg.model.vision.online else []
    if uncounted:
        plan["not_counted"] = uncounted
    if gpu_memory is not None:
        plan["verdict"] = verdict(totals, on, gpu_memory)
    return plan


def verdict(totals: Dict[bool, int], checkpointing: bool, gpu_memory: int) -> str:
    """One line: does the run's setting fit in ``gpu_memory`` bytes, and what would change it."""
    need, limit = totals[checkpointing], FIT_FRACTION * gpu_memory
    setting = f"train.gradient_checkpointing={str(checkpointing).lower()}"
    head = f"{need / GIB:.1f} GiB per rank of {gpu_memory / GIB:.0f} GiB ({setting})"
    if need <= limit:
        return f"fits: {head}"
    if not checkpointing and totals[True] <= limit:
        return f"does not fit: {head}; with train.gradient_checkpointing=true {totals[True] / GIB:.1f} GiB fits"
    return (f"does not fit: {head}; lower train.micro_batch_size or data.max_seq_len, or use more ranks "
            "with ZeRO-3")
