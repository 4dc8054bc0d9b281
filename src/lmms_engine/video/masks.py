"""Frame-level causal attention masks (DINO-WM's block lower-triangular mask)."""

from __future__ import annotations

import torch


def frame_causal_mask(
    num_frames: int, tokens_per_frame: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean ``[N, N]`` mask, ``N = num_frames * tokens_per_frame``, frame-major token order.

    ``mask[i, j]`` is True when query token ``i`` may attend to key token ``j``: when ``j``'s frame is
    at or before ``i``'s frame (full attention inside a frame). This is the convention of
    ``torch.nn.functional.scaled_dot_product_attention`` boolean masks and of DINO-WM (1 = attend).
    """
    if num_frames < 1 or tokens_per_frame < 1:
        raise ValueError(
            f"num_frames and tokens_per_frame must be >= 1, got {num_frames} and {tokens_per_frame}"
        )
    frame_of_token = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return frame_of_token[:, None] >= frame_of_token[None, :]


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive float form of a boolean mask: 0 where True (attend), the dtype's minimum where False."""
    if mask.dtype != torch.bool:
        raise TypeError(f"expected a boolean mask, got dtype {mask.dtype}")
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~mask, torch.finfo(dtype).min)
