"""DeepSpeed's optimizer state, gathered to full size and restored: the workarounds a checkpoint needs under
ZeRO-1/2/3 (memvp_ds/engine/checkpoint.py decides when and where to save; this module knows how).

Every function that gathers is collective: call it on all ranks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from memvp_ds.config import Config
from memvp_ds.distributed import DistInfo, barrier
from memvp_ds.export import write_export

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _link_optimizer_states(optimizer) -> None:
    """Work around DeepSpeed ZeRO-1/2 linking Adam states to parameters only for the param group that
    stepped first (it links after the first group's step, then never again), which leaves the no-decay
    group's moments invisible to safe_get/set_full_optimizer_state."""
    if getattr(optimizer, "_hp_optimizer_states_linked", None) is not None and getattr(optimizer, "optimizer", None):
        if all(optimizer.optimizer.state.get(p) for g in optimizer.optimizer.param_groups for p in g["params"]):
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()


def _adam_params(optimizer) -> List[torch.Tensor]:
    """The tensors the wrapped torch optimizer keeps Adam state for. ZeRO-3 puts its flat fp32 partitions
    into the torch optimizer's param groups only for the duration of each step, so they are looked up on
    the DeepSpeed optimizer itself."""
    base = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in base.param_groups for p in group["params"]]
    return params + list(getattr(optimizer, "fp32_partitioned_groups_flat", []))


def ensure_adam_states(optimizer) -> None:
    """Create torch AdamW's state (zeros, step 0) where it does not exist yet, as before the first update,
    so that a checkpoint can be loaded into a freshly built engine."""
    base = getattr(optimizer, "optimizer", optimizer)
    on_param_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for param in _adam_params(optimizer):
        if not base.state.get(param):
            base.state[param] = {
                "step": torch.tensor(0.0, dtype=torch.float32, device=param.device if on_param_device else "cpu"),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
    _link_optimizer_states(optimizer)


def gather_trainable(model, optimizer) -> Dict[str, torch.Tensor]:
    """Full fp32 weights and Adam moments of every trainable tensor (collective: call on all ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # Before the first successful update (the first steps, or every step skipped by an fp16 overflow) Adam
    # has no state yet: the zeros it would start from are what a resume needs.
    ensure_adam_states(optimizer)
    tensors = {}
    for name, param in model.trainable_parameters().items():
        tensors[f"param/{name}"] = safe_get_full_fp32_param(param).detach().float().cpu().contiguous()
        for key in ADAM_STATES:
            state = safe_get_full_optimizer_state(param, key)
            if state is not None:
                tensors[f"{key}/{name}"] = state.detach().float().cpu().contiguous()
    return tensors


def rng_state() -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_full_fp32_state(param, value: torch.Tensor, dist_info: DistInfo, adam_key: Optional[str] = None) -> None:
    """Give a trainable tensor's fp32 master copy (or its Adam state ``adam_key``) the full-size ``value``.

    Under ZeRO-3 each rank sets its own partition: DeepSpeed's full-tensor setter (0.19) cuts the value
    without the padding of the last partition, so it fails on every tensor whose size the world size does
    not divide (a one-element bias on 2 ranks, 40 per-layer scales on 16). Partitions span all ranks: the
    data-parallel group is the world.
    """
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                 safe_set_local_fp32_param, safe_set_local_optimizer_state)

    if not hasattr(param, "ds_tensor"):  # ZeRO-1/2: DeepSpeed's setter handles the flat partitions
        if adam_key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, adam_key)
        return
    size = param.ds_tensor.numel()
    flat = value.flatten()
    padded = torch.cat([flat, flat.new_zeros(size * dist_info.world_size - flat.numel())])
    local = padded.narrow(0, size * dist_info.rank, size)
    if adam_key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, adam_key)


def restore_trainable(model, optimizer, tensors: Dict[str, torch.Tensor], dist_info: DistInfo,
                      optimizer_steps: int) -> None:
    """Give every trainable tensor its checkpointed fp32 weight and Adam moments (``param/<name>``,
    ``exp_avg/<name>``, ``exp_avg_sq/<name>``: full size) and Adam its step count."""
    import deepspeed

    ensure_adam_states(optimizer)
    for name, param in model.trainable_parameters().items():
        weight = tensors[f"param/{name}"]
        set_full_fp32_state(param, weight, dist_info)
        # The module's own (possibly low-precision, possibly partitioned) copy must match too.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(weight.to(param.dtype))
        for key in ADAM_STATES:
            if f"{key}/{name}" in tensors:
                set_full_fp32_state(param, tensors[f"{key}/{name}"], dist_info, key)
    set_adam_step(optimizer, optimizer_steps)


def set_adam_step(optimizer, steps: int) -> None:
    """Adam's bias correction depends on the number of updates; restore it in the wrapped torch optimizer."""
    base = getattr(optimizer, "optimizer", optimizer)
    for group in base.param_groups:
        if "step" in group:
            group["step"] = steps
    for param in _adam_params(optimizer):
        slot = base.state.get(param)
        if slot is not None and "step" in slot:
            slot["step"] = torch.tensor(float(steps), dtype=slot["step"].dtype, device=slot["step"].device) \
                if torch.is_tensor(slot["step"]) else steps


def export_trainable(model, dist_info: DistInfo, cfg: Config, path: str,
                     feature_recipe: Optional[Dict[str, Any]] = None,
                     provenance: Optional[Dict[str, Any]] = None) -> None:
    """Gather the trainable weights to full size and write the export (collective: call on all ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param

    tensors = {name: safe_get_full_fp32_param(p).detach().float().cpu().contiguous()
               for name, p in model.trainable_parameters().items()}
    if dist_info.is_main:
        write_export(tensors, path, cfg, feature_recipe, provenance)
    barrier()
