"""Training throughput and model FLOPs utilisation (MFU) of a LLaVA-OneVision video model.

FLOPs are estimated from the config (no profiler), counting matrix multiplies only (biases, norms,
activations, pooling and the softmax are left out; embedding lookups are free):

- **LLM** (trainable or not, gradients flow through it): ``6 x N_llm`` per text token, with
  ``N_llm`` = the decoder layers' projection weights + ``lm_head`` (no embedding table), **plus** the
  attention term ``12 x layers x hidden x L`` per token for a sequence of ``L`` tokens (QK^T and AV,
  forward 4, backward 8).
- **Vision tower**, per frame: ``2 x N_tower x P`` (patch embedding + the layers up to
  ``vision_feature_layer``, ``P`` patches) plus attention ``4 x layers x width x P^2``. A frozen tower
  runs forward only (factor 2, no backward); a trainable one counts 3x that.
- **Projector**, per patch: ``6 x N_proj`` (trainable) or ``2 x N_proj`` (frozen, over a frozen
  tower: nothing below it needs a gradient, so forward only).

Activation recomputation (gradient checkpointing) is not counted, as usual for MFU.
- **Autoregressive predictor** (when configured): ``input_proj`` (``6 x hidden x dim``) on every
  frame's ``P'`` tokens, the blocks' weights ``6 x N_blocks`` per token they run on, and their
  attention ``12 x Lq x Lk x dim`` per layer (the LLM's convention) over the blocks the kernel computes:
  ``window="sliding"``: one pass over ``T - 1`` frames, chunked banded attention
  (:func:`lmms_engine.models.frame_attention.attention_flops`); ``"all"``: ``T - num_hist`` windows of
  ``num_hist`` frames, full attention inside each; ``"random"``: one window.

:class:`ThroughputCallback` logs, at every logging step, ``tokens_per_second_per_device``,
``samples_per_second`` (local rate x world size), ``vision_tokens_per_sample`` and ``mfu`` (when a
peak is known), counting each training micro-batch through a forward pre-hook on the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from lmms_engine.models.autoregressive_config import AutoregressiveConfig
from lmms_engine.models.vision import patch_grid_side

#: Dense bf16 peak TFLOP/s by device-name substring (first match wins).
PEAK_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_flops(device: torch.device | str | None = None, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``peak_tflops`` if given, else by CUDA device name, else None (CPU)."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
        return peak_tflops * 1e12
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class ModelFlops:
    """Per-unit FLOPs of one training step (forward + backward) of a LLaVA-OneVision video model.

    Attributes:
        llm_params: matmul weights of the LLM layers + ``lm_head`` (embedding excluded).
        llm_layers, llm_hidden: for the attention term.
        tower_params: matmul weights of the patch embedding and the tower layers that run.
        tower_layers, tower_width, patches: tower layers that run, width, patches per frame.
        tower_trainable: whether the tower gets a backward (3x its forward) or not (1x).
        projector_params, projector_trainable: the multimodal projector.
        predictor_params: autoregressive predictor matmul weights (0 = no autoregressive loss).
        ar_input_params: of those, ``input_proj``'s (run on every frame); ar_dim, ar_layers: width and
            blocks of the predictor; ar_frame_tokens: ``P'``. ar_num_hist, ar_window: window settings.
    """

    llm_params: int
    llm_layers: int
    llm_hidden: int
    tower_params: int
    tower_layers: int
    tower_width: int
    patches: int
    tower_trainable: bool = False
    projector_params: int = 0
    projector_trainable: bool = True
    predictor_params: int = 0
    ar_input_params: int = 0
    ar_dim: int = 0
    ar_layers: int = 0
    ar_frame_tokens: int = 0
    ar_num_hist: int = AutoregressiveConfig.num_hist
    ar_window: str = AutoregressiveConfig.window

    @classmethod
    def from_config(cls, config: Any, *, autoregressive: Mapping[str, Any] | None = None,
                    tower_trainable: bool = False, projector_trainable: bool = True,
                    ar_tokens_per_frame: int | None = None) -> "ModelFlops":
        """From a ``LlavaOnevisionConfig`` (Qwen2 text config, SigLIP vision config).

        Args:
            autoregressive: the ``autoregressive_config`` keys (``embedding_dim``, ``num_hist``,
                ``num_layers``, ``mlp_ratio``, ``window``); None = no autoregressive loss.
            ar_tokens_per_frame: pooled tokens per frame the predictor sees (``P'``); None = the full
                patch grid pooled at the default LLaVA stride 2 (bilinear, ``ceil(side / 2)^2``).
        """
        text, vision = config.text_config, config.vision_config
        h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
        head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
        q_out = text.num_attention_heads * head_dim
        kv_out = text.num_key_value_heads * head_dim
        per_layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * inter
        llm = layers * per_layer + h * text.vocab_size  # lm_head is a matmul even when tied

        d, v_inter = vision.hidden_size, vision.intermediate_size
        side = patch_grid_side(vision)
        feature_layer = getattr(config, "vision_feature_layer", -1)
        if isinstance(feature_layer, (list, tuple)):
            feature_layer = max(f if f >= 0 else vision.num_hidden_layers + 1 + f for f in feature_layer)
        used = feature_layer if feature_layer >= 0 else vision.num_hidden_layers + 1 + feature_layer
        tower = used * (4 * d * d + 2 * d * v_inter) + 3 * vision.patch_size ** 2 * d
        projector = d * h + h * h

        defaults = AutoregressiveConfig()
        predictor = dim = ar_layers = frame_tokens = 0
        num_hist, window = defaults.num_hist, defaults.window
        if autoregressive is not None:
            ar = {**defaults.to_dict(), "embedding_dim": d, **autoregressive}  # embedding_dim: the tower's width
            dim = int(ar["embedding_dim"])
            mlp = int(dim * float(ar["mlp_ratio"]))
            ar_layers = int(ar["num_layers"])
            predictor = h * dim + ar_layers * (4 * dim * dim + 2 * dim * mlp)
            num_hist = int(ar["num_hist"])
            window = str(ar["window"])
            frame_tokens = ar_tokens_per_frame if ar_tokens_per_frame is not None else (-(-side // 2)) ** 2
        return cls(llm_params=llm, llm_layers=layers, llm_hidden=h, tower_params=tower, tower_layers=used,
                   tower_width=d, patches=side * side, tower_trainable=tower_trainable,
                   projector_params=projector, projector_trainable=projector_trainable,
                   predictor_params=predictor, ar_input_params=h * dim if predictor else 0, ar_dim=dim,
                   ar_layers=ar_layers, ar_frame_tokens=frame_tokens, ar_num_hist=num_hist, ar_window=window)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelFlops":
        """From a built model: its config, which parts train, and its autoregressive module."""
        config = model.config
        module = getattr(model, "autoregressive_module", None)
        ar = None
        tokens = None
        if module is not None:
            ar = vars(module.config) if not isinstance(module.config, Mapping) else module.config
            layout = getattr(model, "video_layout", None)
            if layout is not None:
                tokens = layout.frame_grid_side(model.patch_side, 0) ** 2
        inner = getattr(model, "model", model)
        tower = getattr(inner, "vision_tower", None)
        projector = getattr(inner, "multi_modal_projector", None)
        return cls.from_config(
            config, autoregressive=ar, ar_tokens_per_frame=tokens,
            tower_trainable=tower is not None and any(p.requires_grad for p in tower.parameters()),
            projector_trainable=projector is None or any(p.requires_grad for p in projector.parameters()))

    def llm_per_token(self, seq_len: int) -> float:
        """LLM forward+backward FLOPs per token of a sequence of ``seq_len`` tokens."""
        return 6.0 * self.llm_params + 12.0 * self.llm_layers * self.llm_hidden * seq_len

    def vision_per_frame(self) -> float:
        """Tower (forward, x3 if trainable) + projector FLOPs of one frame."""
        forward = 2.0 * self.tower_params * self.patches + 4.0 * self.tower_layers * self.tower_width * self.patches ** 2
        projector = (6.0 if self.projector_trainable else 2.0) * self.projector_params * self.patches
        return forward * (3.0 if self.tower_trainable else 1.0) + projector

    def predictor_per_video(self, num_frames: int) -> float:
        """Autoregressive predictor forward+backward FLOPs of one video of ``num_frames`` frames."""
        return sum(self.predictor_parts(num_frames))

    def predictor_parts(self, num_frames: int) -> tuple[float, float]:
        """(weight matmuls, attention) forward+backward FLOPs of the predictor on one video."""
        from lmms_engine.models.frame_attention import attention_flops

        if self.predictor_params == 0 or num_frames < 2:
            return 0.0, 0.0
        per, blocks = self.ar_frame_tokens, self.predictor_params - self.ar_input_params
        if self.ar_window == "sliding":
            run_tokens = (num_frames - 1) * per
            attention = attention_flops(num_frames - 1, per, self.ar_num_hist, self.ar_dim)[0]
        else:
            frames = min(self.ar_num_hist, num_frames - 1)  # a short video: one window of its frames
            windows = 1 if self.ar_window == "random" else max(num_frames - self.ar_num_hist, 1)
            run_tokens = windows * frames * per
            attention = windows * attention_flops(frames, per, None, self.ar_dim)[0]
        matmuls = 6.0 * (self.ar_input_params * num_frames * per + blocks * run_tokens)
        return matmuls, 3.0 * self.ar_layers * attention

    def batch_flops(self, sequence_lengths: Sequence[int], video_num_frames: torch.Tensor | None = None) -> float:
        """FLOPs of one micro-batch: the token count of each sample (attention is per sample, also in
        packed rows) and ``video_num_frames`` ``[V]`` (one entry per video)."""
        total = sum(n * self.llm_per_token(n) for n in sequence_lengths)
        if video_num_frames is not None:
            for frames in video_num_frames.tolist():
                total += frames * self.vision_per_frame() + self.predictor_per_video(frames)
        return float(total)

    def describe(self) -> str:
        """One line stating what is counted."""
        return (f"LLM 6x{self.llm_params / 1e6:.1f}M params/token + attention 12*L*h*seq; vision tower "
                f"{'fwd+bwd' if self.tower_trainable else 'forward only (frozen)'} 2x{self.tower_params / 1e6:.1f}M"
                f" x {self.patches} patches/frame + attention; projector {self.projector_params / 1e6:.2f}M; "
                f"AR predictor ({self.ar_window}) {self.predictor_params / 1e6:.2f}M x {self.ar_frame_tokens} "
                f"tokens/frame + attention")


def sample_lengths(inputs: Mapping[str, Any], pad_token_id: int | None = None) -> list[int]:
    """Token count of each sample of a batch (the model's forward kwargs).

    Padded batches: ``attention_mask.sum(-1)``. Packed batches (``position_ids`` and no
    ``attention_mask``): a sample starts where its position ids restart at 0; a run made only of
    ``pad_token_id`` is row padding, not a sample. Without either: every row is one sample.
    """
    mask, ids, positions = inputs.get("attention_mask"), inputs.get("input_ids"), inputs.get("position_ids")
    if mask is not None:
        return [int(n) for n in mask.sum(-1).tolist()]
    if ids is None:
        return []
    if positions is None:
        return [int(ids.shape[1])] * int(ids.shape[0])
    lengths = []
    for row_ids, row_positions in zip(ids, positions.expand_as(ids)):
        starts = (row_positions == 0).nonzero().flatten().tolist() + [int(row_ids.shape[0])]
        for start, stop in zip(starts, starts[1:]):
            if pad_token_id is not None and bool((row_ids[start:stop] == pad_token_id).all()):
                continue
            lengths.append(stop - start)
    return lengths


@dataclass
class _Window:
    tokens: int = 0
    samples: int = 0
    vision_tokens: int = 0
    flops: float = 0.0


class ThroughputCallback(TrainerCallback):
    """Log tokens/s per device, samples/s, vision tokens per sample and MFU every logging step.

    Each training forward of the model is counted by a forward pre-hook registered at
    ``on_train_begin`` (so adding the callback is all that is needed): tokens and samples by
    :func:`sample_lengths` (packed rows count each sample), vision tokens = ``input_ids == video_token_id``, FLOPs by
    :meth:`ModelFlops.batch_flops`. Rates use the wall time between logs (data loading included).

    Args:
        flops: the estimate; None = :meth:`ModelFlops.from_model` at train begin.
        peak_tflops: peak dense TFLOP/s of one device; None = by device name (H100 989, A100 312),
            no ``mfu`` when unknown (CPU).
    """

    def __init__(self, flops: ModelFlops | None = None, peak_tflops: float | None = None) -> None:
        self.flops = flops
        self.peak_tflops = peak_tflops
        self.peak: float | None = peak_flops(None, peak_tflops)
        self.window = _Window()
        self.video_token_id: int | None = None
        self.pad_token_id: int | None = None
        self._handle: Any = None
        self._since = time.perf_counter()
        self.last: dict[str, float] = {}

    def count(self, inputs: Mapping[str, Any]) -> None:
        """Add one micro-batch (the model's forward kwargs) to the current window."""
        lengths = sample_lengths(inputs, self.pad_token_id)
        if not lengths:
            return
        ids = inputs.get("input_ids")
        self.window.tokens += sum(lengths)
        self.window.samples += len(lengths)
        if ids is not None and self.video_token_id is not None:
            self.window.vision_tokens += int((ids == self.video_token_id).sum())
        if self.flops is not None:
            self.window.flops += self.flops.batch_flops(lengths, inputs.get("video_num_frames"))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self.count(kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            vision = getattr(model.config, "vision_config", None)
            if self.flops is None and hasattr(vision, "image_size"):
                # Fixed-size towers only (LLaVA-OneVision); Qwen-VL frames vary in size: no FLOPs or MFU.
                self.flops = ModelFlops.from_model(model)
            self.video_token_id = getattr(model.config, "video_token_id", None)
            text_config = getattr(model.config, "text_config", model.config)
            self.pad_token_id = getattr(text_config, "pad_token_id", None)
            if self._handle is None:
                self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.peak = peak_flops(args.device, self.peak_tflops)
        self.window = _Window()
        self._since = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def metrics(self, elapsed: float, ranks: int = 1) -> dict[str, float]:
        """Rates of the current window over ``elapsed`` seconds; the window holds the sums over ``ranks``
        devices (per-device values are their means; samples/s is the total)."""
        w = self.window
        elapsed = max(elapsed, 1e-9)
        ranks = max(ranks, 1)
        out = {"tokens_per_second_per_device": w.tokens / ranks / elapsed,
               "samples_per_second": w.samples / elapsed,
               "vision_tokens_per_sample": w.vision_tokens / max(w.samples, 1),
               "model_tflops_per_second_per_device": w.flops / ranks / elapsed / 1e12}
        if self.peak:
            out["mfu"] = w.flops / ranks / elapsed / self.peak
        return out

    def _reduce_window(self, device: torch.device) -> int:
        """Sum the window over ranks (HF logs on every rank, so this collective is safe); return how many
        ranks were summed. Each rank then reports the per-device mean and the global samples/s."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 1
        w = self.window
        totals = torch.tensor([w.tokens, w.samples, w.vision_tokens, w.flops], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        tokens, samples, vision_tokens, flops = totals.tolist()
        self.window = _Window(int(tokens), int(samples), int(vision_tokens), flops)
        return dist.get_world_size()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        ranks = self._reduce_window(args.device)
        self.last = self.metrics(now - self._since, ranks)
        logs.update(self.last)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.last)  # HF appended a copy before calling callbacks
        self.window = _Window()
        self._since = now


def add_throughput_logging(trainer: Any, peak_tflops: float | None = None) -> ThroughputCallback:
    """Add a :class:`ThroughputCallback` ahead of the reporting callbacks (so TensorBoard, W&B and the
    JSON-lines log see its values) and return it."""
    callback = ThroughputCallback(peak_tflops=peak_tflops)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["ModelFlops", "PEAK_TFLOPS", "ThroughputCallback", "add_throughput_logging", "peak_flops", "sample_lengths"]
