"""ZeRO-3: a parameter that gets no gradient in a step must not be updated with an older one."""

from __future__ import annotations


def clear_gradient_partitions(optimizer) -> None:
    """Zero ZeRO-3's reduced-gradient buffer after an optimizer step (a no-op for other stages).

    DeepSpeed's stage-3 optimizer (0.19, without optimizer offload) keeps every parameter's reduced gradient
    partition in one flat buffer, which backward overwrites only for the parameters that received a gradient,
    and the optimizer step reads the whole buffer. A trainable parameter unused in a step (the generators of
    DVP's inactive layers during its search, DAS adapters of layers that run) was therefore updated with its
    last gradient once more, where ZeRO-2 and plain PyTorch give it zero: a ZeRO-3 search drifted from the
    same search on ZeRO-2, and a resumed search from the uninterrupted one (tests/test_search.py). Zeroing
    the buffer after each step makes an unused parameter's gradient zero, as everywhere else.
    """
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()
