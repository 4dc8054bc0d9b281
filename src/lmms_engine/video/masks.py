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


def banded_frame_causal_mask(
    num_frames: int, tokens_per_frame: int, band: int, device: torch.device | str | None = None,
    num_key_frames: int | None = None, first_query_frame: int = 0, first_key_frame: int = 0,
) -> torch.Tensor:
    """Boolean frame-causal mask limited to ``band`` frames: query frame ``q`` attends key frames
    ``q - band + 1 .. q`` (full attention inside a frame), frame-major token order.

    ``band >= num_frames`` gives :func:`frame_causal_mask`. The optional offsets cut a block of the
    mask: query frames ``first_query_frame ..`` (``num_frames`` of them) against key frames
    ``first_key_frame ..`` (``num_key_frames``, default ``num_frames``), as a kernel that skips masked
    blocks needs it.
    """
    if num_frames < 1 or tokens_per_frame < 1 or band < 1:
        raise ValueError(f"num_frames, tokens_per_frame and band must be >= 1, got {num_frames}, "
                         f"{tokens_per_frame} and {band}")
    keys = num_frames if num_key_frames is None else num_key_frames
    query_frame = (torch.arange(num_frames, device=device) + first_query_frame).repeat_interleave(tokens_per_frame)
    key_frame = (torch.arange(keys, device=device) + first_key_frame).repeat_interleave(tokens_per_frame)
    offset = query_frame[:, None] - key_frame[None, :]
    return (offset >= 0) & (offset < band)
