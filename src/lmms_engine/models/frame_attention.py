"""Banded frame-causal attention for the one-pass (``window: sliding``) predictor, and its rotary
temporal positions.

Tokens are frame-major, ``tokens_per_frame`` per frame. Query frame ``q`` attends key frames
``q - band + 1 .. q`` (:func:`~lmms_engine.video.masks.banded_frame_causal_mask`). Most of the
``L x L`` score matrix is masked (``band / frames`` of it is not), so the kernels here skip masked
blocks instead of computing and discarding them:

- ``chunked`` (default off CUDA, from 96 tokens and more than ``2 * band`` frames; shorter
  sequences take ``dense``): ``scaled_dot_product_attention`` per chunk of ``band`` query frames
  against the ``2 * band - 1`` key frames it can reach, each with its small mask. Measured on CPU at
  the predictor's real width (8 heads x 144, 15 frames x 196 tokens, band 3, forward+backward): 1.7 s
  against 4.9 s for one call with the dense mask (and 4.6 s with no mask at all), see
  benchmarks/RESULTS.md.
- ``flex`` (default on CUDA): ``torch.nn.attention.flex_attention`` under ``torch.compile`` with a
  block mask built from the same rule, which runs only the blocks the band touches.
- ``dense``: one ``scaled_dot_product_attention`` call with the full boolean mask (the reference).

Temporal positions are rotary (RoPE over the frame index, applied to queries and keys): a score
depends on the offset between query and key frame only, never on where a sequence starts, so one pass
over a whole video treats every frame as a window over its own history would.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from lmms_engine.video.masks import banded_frame_causal_mask

BACKENDS = ("auto", "chunked", "flex", "dense")
ROPE_BASE = 10000.0

_compiled_flex: Callable | None = None
_block_masks: dict[tuple, object] = {}


# Below this many tokens (or with fewer than two chunks' worth of frames) one dense call is cheaper
# than several small ones: per-call overhead dominates, not the masked blocks. Measured on CPU, band 3,
# forward+backward: 7 frames x 16 tokens chunked 0.90 ms against dense 1.16 ms, 7 x 4 tokens 0.54 ms
# against 0.35 ms, 15 x 16 tokens 1.76 ms against 3.06 ms.
_CHUNKED_MIN_TOKENS = 96


def resolve_backend(backend: str, device: torch.device, frames: int = 0, tokens_per_frame: int = 0,
                    band: int = 1) -> str:
    """``auto`` -> ``flex`` on CUDA (when torch has it); elsewhere ``chunked``, or ``dense`` for
    sequences too short for skipping blocks to pay."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
            return "flex"
        except ImportError:
            pass
    if frames <= 2 * band or frames * tokens_per_frame < _CHUNKED_MIN_TOKENS:
        return "dense"
    return "chunked"


@functools.lru_cache(maxsize=256)
def _mask(query_frames: int, per_frame: int, band: int, device: str, key_frames: int, first_query: int,
          first_key: int) -> torch.Tensor:
    return banded_frame_causal_mask(query_frames, per_frame, band, device=device, num_key_frames=key_frames,
                                    first_query_frame=first_query, first_key_frame=first_key)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tokens_per_frame: int, band: int,
                     backend: str = "auto", dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``q, k, v`` ``[N, heads, L, head_dim]`` (``L = frames * tokens_per_frame``) under
    the banded frame-causal mask. Returns ``[N, heads, L, head_dim]``."""
    length = q.shape[-2]
    frames, rest = divmod(length, tokens_per_frame)
    if rest:
        raise ValueError(f"{length} tokens are not whole frames of {tokens_per_frame}")
    backend = resolve_backend(backend, q.device, frames, tokens_per_frame, band)
    if backend == "flex" and dropout_p == 0.0:
        try:
            return _flex(q, k, v, tokens_per_frame, band)
        except Exception as err:  # noqa: BLE001 - e.g. a head size the compiled kernel does not take
            warnings.warn(f"flex attention failed ({type(err).__name__}: {err}); using chunked attention",
                          stacklevel=2)
    if backend == "dense" or band >= frames:
        mask = _mask(frames, tokens_per_frame, band, str(q.device), frames, 0, 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return _chunked(q, k, v, frames, tokens_per_frame, band, dropout_p)


def _chunked(q, k, v, frames: int, per_frame: int, band: int, dropout_p: float) -> torch.Tensor:
    outs = []
    for first in range(0, frames, band):
        last = min(frames, first + band)
        key0 = max(0, first - band + 1)
        mask = _mask(last - first, per_frame, band, str(q.device), last - key0, first, key0)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, first * per_frame:last * per_frame], k[:, :, key0 * per_frame:last * per_frame],
            v[:, :, key0 * per_frame:last * per_frame], attn_mask=mask, dropout_p=dropout_p))
    return torch.cat(outs, dim=2)


def band_block_mask(length: int, per_frame: int, band: int, device: torch.device | str):
    """flex attention's block mask for the band (cached): only blocks the band touches are run."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (length, per_frame, band, str(device))
    block_mask = _block_masks.get(key)
    if block_mask is None:
        def band_mask(b, h, q_idx, kv_idx):
            offset = q_idx // per_frame - kv_idx // per_frame
            return (offset >= 0) & (offset < band)

        block_mask = create_block_mask(band_mask, None, None, length, length, device=device)
        _block_masks[key] = block_mask
    return block_mask


def _flex(q, k, v, per_frame: int, band: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=band_block_mask(q.shape[-2], per_frame, band, q.device))


@functools.lru_cache(maxsize=64)
def frame_rotary_tables(frames: int, tokens_per_frame: int, head_dim: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_tables` of ``frames`` frame-major frames of ``tokens_per_frame`` tokens
    (``[frames * tokens_per_frame, head_dim]`` each), cached: every step of a run asks for the same."""
    # Normal tensors even when first asked for under inference mode (an evaluation): the cache outlives
    # that block, and autograd cannot save inference tensors for a later training step's backward.
    with torch.inference_mode(False):
        frame_of_token = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)
        return rotary_tables(frame_of_token, head_dim, dtype)


def rotary_tables(frame_of_token: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[L, head_dim]`` for tokens at frame positions ``frame_of_token`` ``[L]``
    (rotate-half layout: pairs ``(i, i + head_dim / 2)``; an odd last dimension is left unrotated)."""
    half = head_dim // 2
    inv_freq = ROPE_BASE ** (-torch.arange(half, device=frame_of_token.device, dtype=torch.float32) / max(half, 1))
    angles = frame_of_token.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if head_dim % 2:
        cos = torch.cat([cos, cos, torch.ones_like(cos[:, :1])], dim=-1)
        sin = torch.cat([sin, sin, torch.zeros_like(sin[:, :1])], dim=-1)
    else:
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., L, head_dim]`` by the tables of :func:`rotary_tables`."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:2 * half]
    parts = [-second, first] + ([torch.zeros_like(x[..., 2 * half:])] if x.shape[-1] % 2 else [])
    return x * cos + torch.cat(parts, dim=-1) * sin


def attention_flops(frames: int, tokens_per_frame: int, band: int | None, width: int, backend: str = "auto",
                    device: torch.device | str | None = None) -> tuple[int, int]:
    """(forward, backward) matmul FLOPs of one predictor attention over ``frames`` frames of
    ``tokens_per_frame`` tokens at model width ``width`` (all heads), as the kernel runs it: ``band``
    None = full (the window modes); with a band, ``backend`` (``auto``: as :func:`resolve_backend`
    picks on ``device``, default CUDA when available) says which blocks run: ``chunked`` its chunks,
    ``flex`` the 128 x 128 blocks the band touches, ``dense`` the full square. Forward = QK^T + AV =
    ``4 * Lq * Lk * width``; backward 2.5x that (torch's counter's rule)."""
    per, length = tokens_per_frame, frames * tokens_per_frame
    if band is not None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = resolve_backend(backend, torch.device(device), frames, per, band)
    if band is None or backend == "dense" or band >= frames:
        pairs = length ** 2
    elif backend == "flex":
        block, pairs = 128, 0
        for q0 in range(0, length, block):
            q1 = min(length, q0 + block)
            first_key = max(0, (q0 // per - band + 1) * per)  # earliest key any query of the block reaches
            last_key = min(length, ((q1 - 1) // per + 1) * per)  # causal: no key past the last query's frame
            k0, k1 = first_key // block * block, -(-last_key // block) * block
            pairs += (q1 - q0) * (min(k1, length) - k0)
    else:
        pairs = 0
        for first in range(0, frames, band):
            last = min(frames, first + band)
            pairs += (last - first) * per * (last - max(0, first - band + 1)) * per
    forward = 4 * pairs * width
    return forward, math.floor(2.5 * forward)


__all__ = ["BACKENDS", "apply_rotary", "attention_flops", "banded_attention", "frame_rotary_tables", "resolve_backend",
           "rotary_tables"]
