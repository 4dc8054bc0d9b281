"""LLaVA-NeXT spatial pooling (`get_2dPool`) of per-frame patch features.

Arithmetic (per frame, a square grid of side ``s`` in row-major order):

- ``average``: ``avg_pool2d(kernel=stride, stride=stride)``, floor: 27x27 -> 13x13 at stride 2.
- ``max``: ``max_pool2d``, same sizes as ``average``.
- ``bilinear``: interpolate to ``ceil(s / stride)`` per side, ``align_corners=False``:
  27x27 -> 14x14 at stride 2 (LLaVA-OneVision's token count, HF's ``apply_pooling``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

PoolMode = Literal["average", "max", "bilinear"]
POOL_MODES: tuple[str, ...] = ("average", "max", "bilinear")


def check_pool_args(stride: int, mode: str) -> None:
    """Raise ``ValueError`` naming the bad value when ``stride``/``mode`` cannot pool."""
    if mode not in POOL_MODES:
        raise ValueError(f"unknown spatial pool mode {mode!r}; valid modes: {', '.join(POOL_MODES)}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"spatial pool stride must be an integer >= 1, got {stride!r}")


def grid_side(num_patches: int) -> int:
    """Side of the square patch grid holding ``num_patches`` tokens; error if not a square."""
    side = math.isqrt(num_patches)
    if side * side != num_patches or num_patches == 0:
        raise ValueError(
            f"spatial pooling needs a square patch grid, but a frame has {num_patches} patches "
            f"(not a perfect square)"
        )
    return side


def pooled_side(side: int, stride: int, mode: str) -> int:
    """Grid side after pooling a ``side x side`` grid: floor for average/max, ceil for bilinear."""
    check_pool_args(stride, mode)
    if mode == "bilinear":
        return math.ceil(side / stride)
    if side < stride:
        raise ValueError(f"cannot {mode}-pool a {side}x{side} grid with stride {stride} (stride > side)")
    return side // stride


def spatial_pool(features: torch.Tensor, stride: int = 2, mode: str = "average") -> torch.Tensor:
    """Pool each frame's square patch grid.

    Args:
        features: ``[..., P, D]`` patch features, ``P = s * s`` in row-major order (e.g. ``[T, P, D]``).
        stride: pooling stride (>= 1); stride 1 returns the input unchanged.
        mode: ``"average"``, ``"max"`` or ``"bilinear"``.

    Returns:
        ``[..., P', D]`` with ``P' = pooled_side(s, stride, mode) ** 2``.
    """
    check_pool_args(stride, mode)
    if features.dim() < 2:
        raise ValueError(f"expected features of shape [..., P, D], got {tuple(features.shape)}")
    *lead, num_patches, dim = features.shape
    side = grid_side(num_patches)
    out_side = pooled_side(side, stride, mode)
    if stride == 1:
        return features
    grid = features.reshape(-1, side, side, dim).permute(0, 3, 1, 2)
    if mode == "average":
        pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)
    elif mode == "max":
        pooled = F.max_pool2d(grid, kernel_size=stride, stride=stride)
    else:
        pooled = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
    return pooled.permute(0, 2, 3, 1).reshape(*lead, out_side * out_side, dim)
