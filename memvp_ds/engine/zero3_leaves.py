"""ZeRO-3 hook granularity: every frozen decoder block is one ZeRO-3 leaf module."""

from __future__ import annotations

from torch import nn

from memvp_ds.model.vlm import is_trainable


def mark_frozen_blocks_as_zero3_leaves(model: nn.Module) -> int:
    """Flag each decoder block of ``model.llm`` without trainable tensors as a ZeRO-3 leaf; return how many.

    Call before ``deepspeed.initialize``. Without it ZeRO-3 hooks every sub-module (each Linear and norm)
    and wraps its inputs and outputs in pass-through autograd functions, to gather its weights before its
    backward. Those extra graph nodes change the order in which autograd adds up the gradient of a tensor
    read three or more times (the normalised input of q/k/v; the FFN input read by gate, up and the MemVP
    memory term), so ZeRO-3's gradients differed from ZeRO-2's and a single process's in the last bit; Adam
    at high learning rates grows such differences to percent-level losses within ten steps, and runs on
    ZeRO-3 drifted away from the same runs on ZeRO-2. A leaf block is gathered
    whole when it is entered and keeps the graph plain PyTorch builds: the same gradients bit for bit, and
    a few hooks per block instead of one set per sub-module. The cost is that a block's frozen weights are
    gathered at once (LLaMA-13B: 0.32 G parameters, 0.65 GB in bf16), below ZeRO-3's default
    stage3_max_live_parameters (1e9).

    Blocks holding trainable tensors keep per-module hooks: ZeRO-3 reduces a leaf's gradients from a module
    backward hook rather than per parameter, a path we do not rely on (for a block whose input needs no
    gradient, PyTorch runs that hook once the output gradient exists, before the weight gradients inside are
    computed, so ZeRO-3 would reduce zeros). That includes DAS's
    skippable wrappers (trainable adapter), whose frozen block inside stays fine-grained too: the wrapper also
    calls that block's input norm on its own when it skips the block, and blocks with LoRA (``model.lora``),
    whose gradients then equal plain PyTorch's to rounding rather than bit for bit (tests/test_train.py).
    """
    from deepspeed.utils import set_z3_leaf_module

    marked = 0
    # The decoder's own list (not model.llm's validated decoder_layers): DAS replaces entries with wrappers.
    for block in model.llm.base_model.layers:
        if not any(is_trainable(p) for p in block.parameters()):
            set_z3_leaf_module(block, True)
            marked += 1
    return marked
