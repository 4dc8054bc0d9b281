"""Frame-level causal attention masks (DINO-WM's block lower-triangular mask)."""

from __future__ import annotations

from pathlib import Path

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


def frame_block_size(mask: torch.Tensor) -> int | None:
    """Tokens per frame of a frame-causal ``mask`` (``frame_causal_mask(T, P)`` for some ``T, P``): the
    first row's count of True; None when the mask is not one (no frame boundaries to draw)."""
    n = mask.shape[0]
    size = int(mask[0].sum())
    if mask.shape != (n, n) or size < 1 or n % size:
        return None
    return size if torch.equal(mask.cpu(), frame_causal_mask(n // size, size)) else None


def plot_mask(mask: torch.Tensor, path: str | Path, title: str, tokens_per_frame: int | None = None) -> Path:
    """Draw a boolean ``[N, N]`` attention mask (True = may attend, dark) into the PNG ``path``.

    Frame boundaries (red lines every ``tokens_per_frame`` tokens; inferred from a frame-causal mask
    when not given) and a legend; rendered with matplotlib's Agg canvas (no display, no pyplot state).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError("expected a boolean [N, N] mask tensor (True = may attend), got "
                        + (f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                           else type(mask).__name__))
    rows, cols = mask.shape
    block = tokens_per_frame if tokens_per_frame is not None else frame_block_size(mask)
    figure = Figure(figsize=(6.5, 6), dpi=100)
    axes = figure.subplots()
    axes.imshow(mask.detach().cpu().numpy(), cmap="Greys", vmin=0, vmax=1.25, interpolation="nearest")
    handles = [Patch(facecolor="0.2", label="may attend"), Patch(facecolor="white", edgecolor="0.6", label="masked")]
    if block:
        for edge in range(block, max(rows, cols), block):
            axes.axhline(edge - 0.5, color="tab:red", linewidth=0.8)
            axes.axvline(edge - 0.5, color="tab:red", linewidth=0.8)
        frames = cols // block
        ticks = [block * f + (block - 1) / 2 for f in range(frames)]
        axes.set_xticks(ticks, [f"f{f}" for f in range(frames)])
        axes.set_yticks(ticks, [f"f{f}" for f in range(frames)])
        handles.append(Patch(facecolor="none", edgecolor="tab:red", label=f"frame boundary ({block} tokens)"))
        axes.set_xlabel("key token (by frame)")
        axes.set_ylabel("query token (by frame)")
    else:
        axes.set_xlabel("key token")
        axes.set_ylabel("query token")
    axes.set_xlim(-0.5, cols - 0.5)
    axes.set_ylim(rows - 0.5, -0.5)
    axes.set_title(title)
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path
