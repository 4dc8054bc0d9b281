"""Reconstruction quality of the autoregressive predictor on held-out videos, per frame offset.

What is measured (the training loss's quantities, split by how much history the prediction had):
for a video whose frames the LLM saw, the predictor reads the LLM's final hidden states at the video
tokens of frames ``s .. s+k-1`` and predicts the frozen vision encoder's embeddings of frame ``s+k``,
pooled like that frame's video tokens. The **frame offset** ``k`` (1 .. ``num_hist``) is the number
of history frames. For every ``k`` and every start ``s`` whose ``k + 1`` frames are all present, the
prediction of the last window position is compared with the target:

- ``mse``: mean squared error over the target elements (tokens x embedding_dim) of all such windows;
- ``copy_last_mse``: the same for the copy-last-frame baseline (predict frame ``s+k`` = frame
  ``s+k-1``'s target);
- ``ratio`` = ``mse / copy_last_mse`` (< 1: the predictor beats copying the last frame);
- ``mean_target_mse``: the best constant predictor (each target predicted by the mean target at its
  grid position over the same windows, i.e. the targets' variance); a predictor above it has not
  learned to use its input at all.

Feeding exactly ``k`` frames and reading the last position is valid with the frame-causal mask on or
off: with the mask that position equals position ``k-1`` of any longer window (it sees the same
frames and position embeddings); without it, longer windows would let early positions see their own
target. Note that a predictor trained without the mask is supervised only at offset ``num_hist``.
With ``use_fast_slow_frames`` each stream (fast, slow) is measured on its own frame sequence and the
offsets are pooled over streams (``by_stream`` keeps them apart).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


PredictFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class OffsetSums:
    """Running sums for one frame offset: squared errors of the predictor and of copy-last, the
    number of target elements and of windows, and the per-(grid position, dimension) sum and sum of
    squares of the targets (``[P, E]``, float64), from which the constant mean-target baseline follows."""

    sq_error: float = 0.0
    copy_last_sq_error: float = 0.0
    elements: int = 0
    windows: int = 0
    target_sum: torch.Tensor | None = None
    target_sq_sum: torch.Tensor | None = None

    def add(self, other: "OffsetSums") -> None:
        self.sq_error += other.sq_error
        self.copy_last_sq_error += other.copy_last_sq_error
        self.elements += other.elements
        self.windows += other.windows
        if other.target_sum is not None:
            if self.target_sum is None:
                self.target_sum, self.target_sq_sum = other.target_sum.clone(), other.target_sq_sum.clone()
            else:
                self.target_sum += other.target_sum
                self.target_sq_sum += other.target_sq_sum

    def mean_target_mse(self) -> float | None:
        """MSE of predicting every target by the mean target at its grid position (over these windows):
        the best constant predictor, i.e. the targets' variance. A predictor above it ignores its input."""
        if self.target_sum is None or not self.windows:
            return None
        mean = self.target_sum / self.windows
        return float((self.target_sq_sum / self.windows - mean * mean).clamp(min=0).mean())

    def to_dict(self) -> dict[str, Any]:
        mse = self.sq_error / self.elements if self.elements else None
        base = self.copy_last_sq_error / self.elements if self.elements else None
        ratio = mse / base if mse is not None and base else None
        return {"mse": mse, "copy_last_mse": base, "ratio": ratio, "mean_target_mse": self.mean_target_mse(),
                "windows": self.windows, "elements": self.elements}


def next_frame_errors(
    predict: PredictFn,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    max_offset: int,
) -> dict[int, OffsetSums]:
    """Per-offset error sums of one batch of frame sequences.

    Args:
        predict: maps ``[N, k, P, D]`` predictor inputs of ``k`` frames to ``[N, k, P, E]`` predictions
            (position ``f`` predicts frame ``f + 1``); only the last position is read.
        tokens: ``[B, K, P, D]`` predictor inputs per frame.
        targets: ``[B, K, P, E]`` target embeddings per frame.
        valid: bool ``[B, K]``: frames present (a window needs all its frames).
        max_offset: largest offset ``k`` (``num_hist``).

    Returns:
        ``{k: OffsetSums}`` for ``k = 1 .. max_offset`` (zero sums where no window fits).
    """
    if tokens.shape[:3] != targets.shape[:3] or valid.shape != tokens.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)}, targets {tuple(targets.shape)} and valid "
                         f"{tuple(valid.shape)} must agree on [B, K, P] / [B, K]")
    num_frames = tokens.shape[1]
    out: dict[int, OffsetSums] = {}
    for k in range(1, max_offset + 1):
        sums = OffsetSums()
        out[k] = sums
        if num_frames < k + 1:
            continue
        ok = valid.bool().unfold(1, k + 1, 1).all(-1)  # [B, K - k]: window s..s+k complete
        rows, starts = ok.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        frame_idx = starts[:, None] + torch.arange(k, device=starts.device)
        pred = predict(tokens[rows[:, None], frame_idx])[:, -1].float()
        target = targets[rows, starts + k].float()
        previous = targets[rows, starts + k - 1].float()
        sums.sq_error = float((pred - target).pow(2).sum())
        sums.copy_last_sq_error = float((previous - target).pow(2).sum())
        sums.elements = target.numel()
        sums.windows = int(rows.numel())
        sums.target_sum = target.sum(0).double().cpu()
        sums.target_sq_sum = target.double().pow(2).sum(0).cpu()
    return out


class ReconstructionAccumulator:
    """Sums per (stream, offset) over batches; :meth:`summary` gives the report dict."""

    def __init__(self, module: nn.Module) -> None:
        cfg = module.config
        self.num_hist = int(cfg.num_hist)
        self.info = {
            "num_hist": self.num_hist,
            "use_frame_causal_mask": bool(cfg.use_frame_causal_mask),
            "loss_weight": float(cfg.loss_weight),
            "target_encoder": getattr(module, "target_encoder_mode", None),
            "use_fast_slow_frames": bool(cfg.use_fast_slow_frames),
        }
        self.sums: dict[str, dict[int, OffsetSums]] = {}
        self.videos = 0

    def add_batch(self, results: Mapping[str, Mapping[int, OffsetSums]], num_videos: int) -> None:
        """Add one batch's :func:`batch_reconstruction_errors` output covering ``num_videos`` videos."""
        self.videos += num_videos
        for stream, per_offset in results.items():
            table = self.sums.setdefault(stream, {k: OffsetSums() for k in range(1, self.num_hist + 1)})
            for k, sums in per_offset.items():
                table[k].add(sums)

    def summary(self) -> dict[str, Any]:
        """``by_offset`` (pooled over streams), ``full_history`` (offset ``num_hist``), ``all_offsets``
        (every window of every offset pooled) and, with several streams, ``by_stream``."""
        pooled = {k: OffsetSums() for k in range(1, self.num_hist + 1)}
        for table in self.sums.values():
            for k, sums in table.items():
                pooled[k].add(sums)
        total = OffsetSums()
        for sums in pooled.values():
            total.add(sums)
        by_offset = [{"offset": k, **pooled[k].to_dict()} for k in sorted(pooled)]
        result: dict[str, Any] = {
            **self.info,
            "num_videos": self.videos,
            "by_offset": by_offset,
            "full_history": by_offset[-1],
            "all_offsets": total.to_dict(),
        }
        if len(self.sums) > 1:
            result["by_stream"] = {name: [{"offset": k, **t[k].to_dict()} for k in sorted(t)]
                                   for name, t in self.sums.items()}
        return result


@contextmanager
def _capture_last_hidden(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the language model's final (normed) hidden states ``[B, L, hidden]`` during a forward:
    the tensor the autoregressive loss reads, without keeping every layer's states."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        store["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = model.model.language_model.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The forward inputs of a collated batch as training passes them, without ``labels``: every video
    with its bookkeeping (``video_row`` for several videos per record), every image (images before a
    video change its hidden states: the LLM is causal), positions."""
    return {k: v for k, v in batch.items() if k != "labels" and v is not None}


def batch_video_count(batch: Mapping[str, Any]) -> int:
    """Videos with frames in a collated batch: one ``video_grid_thw`` row each (Qwen-VL), else the
    ``video_num_frames`` entries above 0 (one per sample, or per video with ``video_row``)."""
    grids = batch.get("video_grid_thw")
    if grids is not None:
        return int(grids.shape[0])
    frames = batch.get("video_num_frames")
    return int((frames > 0).sum()) if frames is not None else 0


@torch.no_grad()
def video_hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """The LLM's final (normed) hidden states ``[B, L, hidden]`` of a collated batch and its
    :class:`~lmms_engine.models.layout.VideoTokenLayout`: what the autoregressive loss reads.

    ``batch``: the collator's keys (:func:`model_inputs`; labels are ignored: no position before the
    last video token depends on them, the LLM being causal).
    """
    inputs = model_inputs(batch)
    with _capture_last_hidden(model) as store:
        # logits_to_keep=1: the full-vocabulary logits of every position are never needed here.
        out = model(**inputs, logits_to_keep=1, use_cache=False)
    return store["hidden"], out.video_token_layout


@torch.no_grad()
def batch_reconstruction_errors(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    module: nn.Module | None = None,
) -> dict[str, dict[int, OffsetSums]]:
    """Per-stream, per-offset error sums of one collated batch (on the model's device).

    Args:
        model: a :class:`~lmms_engine.models.llava_video.LlavaVideoForConditionalGeneration`.
        batch: the collator's keys: ``input_ids``, ``attention_mask``, ``pixel_values_videos``
            ``[B, T, 3, H, W]`` (or ``[V, T, 3, H, W]`` with ``video_row``: several videos per record),
            ``video_num_frames``, image keys; labels are not needed.
        module: the predictor to measure; default ``model.autoregressive_module``. Another module built
            over the same tower (e.g. a probe fitted on a frozen model) works too.

    Returns:
        ``{stream: {offset: OffsetSums}}`` (stream ``all`` without fast/slow frames).
    """
    if hasattr(model, "reconstruction_errors"):  # model families with their own video layout (Qwen-VL)
        return model.reconstruction_errors(batch, module)
    module = module if module is not None else getattr(model, "autoregressive_module", None)
    if module is None:
        raise ValueError("the model has no autoregressive_module and no module was given")
    pixels = batch.get("pixel_values_videos")
    if pixels is None:
        return {}
    hidden, layout = video_hidden_states(model, batch)
    if batch.get("video_row") is not None:  # several videos per row: each video's own span, as training does
        from lmms_engine.models.llava_video import _video_spans

        hidden, layout = _video_spans(hidden, layout)
    # The module's own preparation (patch tokens per frame, newline/faster tokens skipped, absent frames
    # masked, slow frames pooled to the fast grid, targets pooled alike): exactly what training saw.
    frames = module.prepare_frames(hidden, pixels, video_token_layout=layout)
    causal = bool(module.config.use_frame_causal_mask)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return module.predictor(x, pool_stride=frames.pool_stride, pool_mode=frames.pool_mode, causal=causal)

    results = {}
    for name, idx in frames.streams:
        results[name] = next_frame_errors(predict, frames.tokens[:, idx], frames.targets[:, idx],
                                          frames.valid[:, idx], int(module.config.num_hist))
    return results


def reconstruction_verdict(row: Mapping[str, Any]) -> str:
    """A plain-words reading of one offset's (or all offsets') predictor MSE against copying the last
    frame and against the best constant prediction (``mean_target_mse``)."""
    mse, copy_last, constant = row.get("mse"), row.get("copy_last_mse"), row.get("mean_target_mse")
    if mse is None or not copy_last:
        return "no supervised windows: nothing to judge"
    ratio = mse / copy_last
    if ratio < 1:
        return f"the predictor beats copying the last frame (MSE {mse:.4f} = {ratio:.2f}x copy-last {copy_last:.4f})"
    if constant is not None and mse < constant:
        return (f"the predictor uses the video (MSE {mse:.4f} below the best constant prediction {constant:.4f}) "
                f"but does not beat copying the last frame yet ({ratio:.2f}x copy-last {copy_last:.4f})")
    return (f"the predictor has not learned: MSE {mse:.4f} is no better than a constant prediction"
            + (f" ({constant:.4f})" if constant is not None else "") + f", {ratio:.2f}x copy-last {copy_last:.4f}")


def reconstruction_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown table, one row per frame offset, then all offsets pooled."""
    def cell(value: float | None, fmt: str = ".5f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"Predictor: num_hist={summary['num_hist']}, frame-causal mask "
        f"{'on' if summary['use_frame_causal_mask'] else 'off'}, loss_weight={summary['loss_weight']}; "
        f"{summary['num_videos']} videos.",
        "",
        "| frame offset (history frames) | predictor MSE | copy-last MSE | ratio | mean-target MSE | windows |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(str(r["offset"]), r) for r in summary["by_offset"]] + [("**all**", summary["all_offsets"])]
    for name, r in rows:
        lines.append(f"| {name} | {cell(r['mse'])} | {cell(r['copy_last_mse'])} | {cell(r['ratio'], '.3f')} | "
                     f"{cell(r['mean_target_mse'])} | {r['windows']} |")
    return "\n".join(lines)


__all__ = ["OffsetSums", "ReconstructionAccumulator", "batch_reconstruction_errors", "batch_video_count",
           "model_inputs", "next_frame_errors", "reconstruction_markdown", "reconstruction_verdict",
           "video_hidden_states"]
