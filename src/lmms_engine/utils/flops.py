"""Counting FLOPs with torch's ``FlopCounterMode``, CPU attention kernels included.

torch's counter has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but none
for the CPU flash-attention kernel that ``scaled_dot_product_attention`` runs on CPU
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward): without one, every attention
on CPU counts zero. :func:`register_cpu_attention_flops` adds the same formulas the CUDA kernels use
(``4 * B * H * Lq * Lk * D`` forward, QK^T and AV; 2.5x that backward), so a dense mask counts as the
full ``Lq x Lk`` product the kernel computes. Kernels that skip masked blocks (flex attention with a
block mask) are counted by torch's own flex formula, over the blocks they run.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula


def _cpu_flash_ops() -> tuple:
    aten = torch.ops.aten
    ops = []
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"):
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.append(packet)
    return tuple(ops)


def register_cpu_attention_flops() -> None:
    """Give torch's FLOP counter formulas for the CPU flash-attention kernels (idempotent)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    ops = _cpu_flash_ops()
    if not ops or ops[0] in flop_registry or getattr(ops[0], "default", None) in flop_registry:
        return
    forward, backward = ops

    @register_flop_formula(forward)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running ``fn()`` (forward and, if ``fn`` calls it, backward), CPU attention included."""
    return sum(flops_by_op(fn).values())


def flops_by_op(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of running ``fn()`` per operator (e.g. ``aten.mm``,
    ``aten._scaled_dot_product_flash_attention_for_cpu``), CPU attention included."""
    register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


__all__ = ["count_flops", "flops_by_op", "register_cpu_attention_flops"]
