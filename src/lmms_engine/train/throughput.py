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
- **Images**: the tower and projector as for a frame, on each tile the tower runs on
  (:func:`lmms_engine.data.images.image_tile_count` of ``image_sizes``: the base tile plus the anyres grid
  for the only image of its sample, ``batch_num_images``; one tile otherwise; the zero tiles that pad
  ``pixel_values [N, tiles_max, 3, S, S]`` do not run). Their ``<image>`` tokens are LLM tokens like any other.

Activation recomputation (gradient checkpointing) is not counted, as usual for MFU. The LLM's attention
term uses its query width (``heads x head_dim``, the LLM's hidden size in most models).
- **Autoregressive predictor** (when configured): ``input_proj`` (``6 x hidden x dim``) on every
  frame's ``P'`` tokens, the blocks' weights ``6 x N_blocks`` per token they run on, and their
  attention ``12 x Lq x Lk x dim`` per layer (the LLM's convention) over the blocks the kernel computes:
  ``window="sliding"``: one pass over ``T - 1`` frames, chunked banded attention
  (:func:`lmms_engine.models.frame_attention.attention_flops`); ``"all"``: ``T - num_hist`` windows of
  ``num_hist`` frames, full attention inside each; ``"random"``: one window.

**Qwen-VL** (:class:`QwenModelFlops`; Qwen2-VL, Qwen2.5-VL, Qwen3-VL) counts each batch from its own
grids (``video_grid_thw`` / ``image_grid_thw`` rows ``(t, h, w)`` in patches) and token counts, with the
same factors (frozen: forward only; trainable: 3x):

- **vision encoder**, per grid of ``N = t*h*w`` patches: the Conv3d patch embedding and each block's
  weights ``2 x params x N``; attention ``4 x s^2 x width`` per segment of ``s`` patches: one segment
  per temporal group (``h*w``) in full-attention blocks (all of Qwen2-VL / Qwen3-VL's,
  Qwen2.5-VL's ``fullatt_block_indexes``), Qwen2.5-VL's other blocks one segment per window of
  ``window_size / patch_size / merge`` merge units a side (edge windows smaller, as
  ``get_vision_window_index`` cuts them);
- **merger** (and Qwen3-VL's deepstack mergers, one per ``deepstack_visual_indexes`` entry): the two
  matmuls on each of the ``N / merge^2`` merged tokens; counted as the projector;
- a ``target_encoder: copy`` autoregressive module's frozen encoder: one more forward of the whole encoder
  on each video;
- **LLM**: as above, on each sample's tokens;
- **autoregressive predictor**: as above, per video, its temporal groups as frames and its merged grid
  ``h/merge x w/merge`` as the tokens per frame.

:class:`ThroughputCallback` logs, at every logging step, ``tokens_per_second_per_device``,
``samples_per_second`` (local rate x world size), ``vision_tokens_per_sample``,
``model_tflops_per_second_per_device`` and ``mfu`` (when a peak is known), for both families alike,
counting each training micro-batch through a forward pre-hook on the model.
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


def decoder_flops_shape(text: Any) -> tuple[int, int, int, int]:
    """``(matmul weights of the layers + lm_head, layers, hidden, attention width)`` of a decoder LLM
    config (Qwen2 / Qwen2.5 / Qwen3 text configs; the embedding table is a lookup, not counted)."""
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q_out = text.num_attention_heads * head_dim
    kv_out = text.num_key_value_heads * head_dim
    per_layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * inter
    return layers * per_layer + h * text.vocab_size, layers, h, q_out  # lm_head is a matmul even when tied


def _predictor_fields(autoregressive: Mapping[str, Any] | None, hidden: int, width: int) -> dict[str, Any]:
    """The autoregressive fields of :class:`StepFlops` from ``autoregressive_config`` keys (None: none);
    ``embedding_dim`` defaults to the vision ``width``."""
    defaults = AutoregressiveConfig()
    if autoregressive is None:
        return {}
    ar = {**defaults.to_dict(), "embedding_dim": width, **autoregressive}
    dim = int(ar["embedding_dim"])
    mlp = int(dim * float(ar["mlp_ratio"]))
    layers = int(ar["num_layers"])
    return {"predictor_params": hidden * dim + layers * (4 * dim * dim + 2 * dim * mlp), "ar_input_params": hidden * dim,
            "ar_dim": dim, "ar_layers": layers, "ar_num_hist": int(ar["num_hist"]), "ar_window": str(ar["window"])}


def _module_settings(model: nn.Module) -> Mapping[str, Any] | None:
    """The autoregressive module's settings of ``model`` as a mapping (None: no module)."""
    module = getattr(model, "autoregressive_module", None)
    if module is None:
        return None
    return module.config if isinstance(module.config, Mapping) else vars(module.config)


def _trains(modules: Sequence[nn.Module] | Any) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


@dataclass(frozen=True)
class StepFlops:
    """What both families share: the LLM and the autoregressive predictor's FLOPs.

    Attributes:
        llm_params: matmul weights of the LLM layers + ``lm_head`` (embedding excluded).
        llm_layers, llm_hidden: for the attention term; llm_attention_width: the queries' width
            (``heads x head_dim``; 0 = ``llm_hidden``).
        predictor_params: autoregressive predictor matmul weights (0 = no autoregressive loss).
        ar_input_params: of those, ``input_proj``'s (run on every frame); ar_dim, ar_layers: width and
            blocks of the predictor; ar_frame_tokens: ``P'`` (fixed-size towers). ar_num_hist, ar_window:
            window settings.
    """

    llm_params: int
    llm_layers: int
    llm_hidden: int
    llm_attention_width: int = 0
    predictor_params: int = 0
    ar_input_params: int = 0
    ar_dim: int = 0
    ar_layers: int = 0
    ar_frame_tokens: int = 0
    ar_num_hist: int = AutoregressiveConfig.num_hist
    ar_window: str = AutoregressiveConfig.window

    def llm_per_token(self, seq_len: int) -> float:
        """LLM forward+backward FLOPs per token of a sequence of ``seq_len`` tokens."""
        width = self.llm_attention_width or self.llm_hidden
        return 6.0 * self.llm_params + 12.0 * self.llm_layers * width * seq_len

    def llm_flops(self, sequence_lengths: Sequence[int]) -> float:
        """LLM forward+backward FLOPs of samples of these token counts (attention per sample)."""
        return float(sum(n * self.llm_per_token(n) for n in sequence_lengths))

    def predictor_per_video(self, num_frames: int, tokens_per_frame: int | None = None) -> float:
        """Autoregressive predictor forward+backward FLOPs of one video of ``num_frames`` frames."""
        return sum(self.predictor_parts(num_frames, tokens_per_frame))

    def predictor_parts(self, num_frames: int, tokens_per_frame: int | None = None) -> tuple[float, float]:
        """(weight matmuls, attention) forward+backward FLOPs of the predictor on one video of
        ``num_frames`` frames of ``tokens_per_frame`` tokens (None: ``ar_frame_tokens``)."""
        from lmms_engine.models.frame_attention import attention_flops

        per = self.ar_frame_tokens if tokens_per_frame is None else tokens_per_frame
        if self.predictor_params == 0:
            return 0.0, 0.0
        if num_frames < 2:  # nothing to predict: input_proj still runs on its frame, forward only
            return 2.0 * self.ar_input_params * num_frames * per, 0.0
        blocks = self.predictor_params - self.ar_input_params
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


@dataclass(frozen=True, kw_only=True)
class ModelFlops(StepFlops):
    """Per-unit FLOPs of one training step (forward + backward) of a LLaVA-OneVision video model.

    Attributes (beyond :class:`StepFlops`'):
        tower_params: matmul weights of the patch embedding and the tower layers that run.
        tower_layers, tower_width, patches: tower layers that run, width, patches per frame.
        tower_trainable: whether the tower gets a backward (3x its forward) or not (1x).
        projector_params, projector_trainable: the multimodal projector.
    """

    tower_params: int
    tower_layers: int
    tower_width: int
    patches: int
    tower_trainable: bool = False
    projector_params: int = 0
    projector_trainable: bool = True
    tile_size: int = 0
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

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
        llm, layers, h, attention_width = decoder_flops_shape(text)
        d, v_inter = vision.hidden_size, vision.intermediate_size
        side = patch_grid_side(vision)
        feature_layer = getattr(config, "vision_feature_layer", -1)
        if isinstance(feature_layer, (list, tuple)):
            feature_layer = max(f if f >= 0 else vision.num_hidden_layers + 1 + f for f in feature_layer)
        used = feature_layer if feature_layer >= 0 else vision.num_hidden_layers + 1 + feature_layer
        tower = used * (4 * d * d + 2 * d * v_inter) + 3 * vision.patch_size ** 2 * d
        projector = d * h + h * h
        ar = _predictor_fields(autoregressive, h, d)
        if ar:
            ar["ar_frame_tokens"] = ar_tokens_per_frame if ar_tokens_per_frame is not None else (-(-side // 2)) ** 2
        return cls(llm_params=llm, llm_layers=layers, llm_hidden=h, llm_attention_width=attention_width,
                   tower_params=tower, tower_layers=used, tower_width=d, patches=side * side,
                   tower_trainable=tower_trainable, projector_params=projector,
                   projector_trainable=projector_trainable, tile_size=int(vision.image_size),
                   grid_pinpoints=tuple((int(h_), int(w_)) for h_, w_ in getattr(config, "image_grid_pinpoints", None)
                                        or ()), **ar)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelFlops":
        """From a built model: its config, which parts train, and its autoregressive module."""
        ar = _module_settings(model)
        tokens = None
        layout = getattr(model, "video_layout", None)
        if ar is not None and layout is not None:
            tokens = layout.frame_grid_side(model.patch_side, 0) ** 2
        inner = getattr(model, "model", model)
        tower = getattr(inner, "vision_tower", None)
        projector = getattr(inner, "multi_modal_projector", None)
        return cls.from_config(
            model.config, autoregressive=ar, ar_tokens_per_frame=tokens,
            tower_trainable=tower is not None and _trains([tower]),
            projector_trainable=projector is None or _trains([projector]))

    def vision_per_frame(self) -> float:
        """Tower (forward, x3 if trainable) + projector FLOPs of one frame."""
        forward = 2.0 * self.tower_params * self.patches + 4.0 * self.tower_layers * self.tower_width * self.patches ** 2
        projector = (6.0 if self.projector_trainable else 2.0) * self.projector_params * self.patches
        return forward * (3.0 if self.tower_trainable else 1.0) + projector

    def image_tiles(self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None) -> list[int]:
        """Tiles the tower runs on for each image of ``image_sizes`` ``[N, 2]`` (height, width): tiled when
        it is the only image of its sample (``batch_num_images`` ``[B]``; None: every image, as transformers)."""
        from lmms_engine.data.images import image_tile_count

        counts = batch_num_images.tolist() if batch_num_images is not None else [1] * len(image_sizes)
        tiled = [n == 1 for n in counts for _ in range(n)]
        return [image_tile_count(int(h), int(w), tiled=t, image_size=self.tile_size, grid_pinpoints=self.grid_pinpoints)
                for (h, w), t in zip(image_sizes.tolist(), tiled)]

    def batch_flops(self, sequence_lengths: Sequence[int], video_num_frames: torch.Tensor | None = None,
                    image_sizes: torch.Tensor | None = None, batch_num_images: torch.Tensor | None = None) -> float:
        """FLOPs of one micro-batch: the token count of each sample (attention is per sample, also in
        packed rows), ``video_num_frames`` ``[V]`` (one entry per video) and the images' ``image_sizes``
        ``[N, 2]`` with ``batch_num_images`` ``[B]`` (:meth:`image_tiles`)."""
        total = self.llm_flops(sequence_lengths)
        if video_num_frames is not None:
            for frames in video_num_frames.tolist():
                total += frames * self.vision_per_frame() + self.predictor_per_video(frames)
        if image_sizes is not None:
            total += sum(self.image_tiles(image_sizes, batch_num_images)) * self.vision_per_frame()
        return float(total)

    def inputs_flops(self, sequence_lengths: Sequence[int], inputs: Mapping[str, Any]) -> float:
        """:meth:`batch_flops` of a batch given as the model's forward kwargs."""
        images = inputs.get("image_sizes") if inputs.get("pixel_values") is not None else None
        return self.batch_flops(sequence_lengths, inputs.get("video_num_frames"), images, inputs.get("batch_num_images"))

    def describe(self) -> str:
        """One line stating what is counted."""
        return (f"LLM 6x{self.llm_params / 1e6:.1f}M params/token + attention 12*L*h*seq; vision tower "
                f"{'fwd+bwd' if self.tower_trainable else 'forward only (frozen)'} 2x{self.tower_params / 1e6:.1f}M"
                f" x {self.patches} patches/frame + attention; projector {self.projector_params / 1e6:.2f}M; "
                f"AR predictor ({self.ar_window}) {self.predictor_params / 1e6:.2f}M x {self.ar_frame_tokens} "
                f"tokens/frame + attention")


def window_sides(cells: int, window: int) -> list[int]:
    """Sides of the windows that cut ``cells`` merge units into runs of ``window`` (the last one shorter),
    as ``transformers.vision_utils.get_vision_window_index`` cuts them."""
    return [window] * (cells // window) + ([cells % window] if cells % window else [])


@dataclass(frozen=True)
class VisionForward:
    """Forward FLOPs of a Qwen-VL vision encoder on some grids, by part."""

    patch_embed: float = 0.0
    blocks: float = 0.0
    attention: float = 0.0
    mergers: float = 0.0

    @property
    def encoder(self) -> float:
        """Everything but the mergers."""
        return self.patch_embed + self.blocks + self.attention


@dataclass(frozen=True, kw_only=True)
class QwenModelFlops(StepFlops):
    """FLOPs of one training step of a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; module docstring),
    counted per batch from its grids.

    Attributes (beyond :class:`StepFlops`'):
        patch_params: the Conv3d patch embedding's weights (``3 * temporal_patch * patch^2 * width``).
        block_params: matmul weights of one vision block (qkv, proj, MLP).
        depth, width: vision blocks and their width.
        full_blocks: blocks with full attention (per temporal group); the others use windows.
        window: window side in merge units (0 = no window attention).
        merge: ``spatial_merge_size``.
        merger_params: matmul weights of one merger (run on every merged token); mergers: how many run
            (1 + Qwen3-VL's deepstack mergers).
        tower_trainable, projector_trainable: backward through the encoder / the mergers.
        copy_encoder: a ``target_encoder: copy`` module runs the whole encoder once more (forward).
    """

    patch_params: int
    block_params: int
    depth: int
    width: int
    full_blocks: int
    window: int
    merge: int
    merger_params: int
    mergers: int = 1
    tower_trainable: bool = False
    projector_trainable: bool = True
    copy_encoder: bool = False

    @classmethod
    def from_config(cls, config: Any, *, autoregressive: Mapping[str, Any] | None = None,
                    tower_trainable: bool = False, projector_trainable: bool = True,
                    copy_encoder: bool = False) -> "QwenModelFlops":
        """From a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config; ``autoregressive`` as in :meth:`ModelFlops.from_config`."""
        from lmms_engine.models.qwen_vl_common import vision_width

        vision = config.vision_config
        llm, layers, h, attention_width = decoder_flops_shape(config.text_config)
        d, merge, family = vision_width(vision), vision.spatial_merge_size, config.model_type
        if family == "qwen2_vl":
            mlp, out = 2 * d * int(d * vision.mlp_ratio), vision.hidden_size  # fc1, fc2; merger into the LLM width
        else:
            mlp = (3 if family == "qwen2_5_vl" else 2) * d * vision.intermediate_size  # gate/up/down or fc1/fc2
            out = vision.out_hidden_size
        full, window = vision.depth, 0
        if family == "qwen2_5_vl":
            full = len([i for i in vision.fullatt_block_indexes if 0 <= i < vision.depth])
            window = vision.window_size // merge // vision.patch_size
        wide = d * merge ** 2
        return cls(llm_params=llm, llm_layers=layers, llm_hidden=h, llm_attention_width=attention_width,
                   patch_params=vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * d,
                   block_params=4 * d * d + mlp, depth=vision.depth, width=d, full_blocks=full, window=window,
                   merge=merge, merger_params=wide * wide + wide * out,
                   mergers=1 + len(getattr(vision, "deepstack_visual_indexes", None) or ()),
                   tower_trainable=tower_trainable, projector_trainable=projector_trainable,
                   copy_encoder=copy_encoder, **_predictor_fields(autoregressive, h, d))

    @classmethod
    def from_model(cls, model: nn.Module) -> "QwenModelFlops":
        """From a built engine Qwen-VL model: its config, which parts train, its autoregressive module."""
        module = getattr(model, "autoregressive_module", None)
        return cls.from_config(model.config, autoregressive=_module_settings(model),
                               tower_trainable=any(p.requires_grad for p in model.vision_tower_parameters()),
                               projector_trainable=_trains(model.projector_modules()),
                               copy_encoder=module is not None and module.target_encoder is not None)

    def vision_forward(self, grid_thw: Sequence[int]) -> VisionForward:
        """Forward FLOPs of the encoder on one grid ``(t, h, w)`` (patches)."""
        t, h, w = (int(v) for v in grid_thw)
        patches = t * h * w
        merged = patches // self.merge ** 2
        frame = 4.0 * (h * w) ** 2 * self.width  # one temporal group, full attention
        attention = self.full_blocks * t * frame
        if self.depth > self.full_blocks:
            unit = self.merge ** 2
            rows = sum((r * unit) ** 2 for r in window_sides(h // self.merge, self.window))
            cols = sum(c ** 2 for c in window_sides(w // self.merge, self.window))
            attention += (self.depth - self.full_blocks) * t * 4.0 * rows * cols * self.width
        return VisionForward(patch_embed=2.0 * self.patch_params * patches,
                             blocks=2.0 * self.depth * self.block_params * patches, attention=attention,
                             mergers=2.0 * self.mergers * self.merger_params * merged)

    def vision_flops(self, grid_thw: Sequence[int], video: bool = True) -> float:
        """Encoder (x3 if trainable) + mergers (x3 if trainable) on one grid, + a copied target encoder's
        forward on a video's (the targets are videos' only)."""
        forward = self.vision_forward(grid_thw)
        total = forward.encoder * (3.0 if self.tower_trainable else 1.0)
        total += forward.mergers * (3.0 if self.projector_trainable else 1.0)
        return total + (forward.encoder + forward.mergers if self.copy_encoder and video else 0.0)

    def batch_flops(self, sequence_lengths: Sequence[int], video_grid_thw: torch.Tensor | None = None,
                    image_grid_thw: torch.Tensor | None = None) -> float:
        """FLOPs of one micro-batch: each sample's token count, every video's and image's grid ``[N, 3]``
        (the predictor runs on videos: temporal groups as frames, the merged grid as their tokens)."""
        total = self.llm_flops(sequence_lengths)
        for grids, video in ((video_grid_thw, True), (image_grid_thw, False)):
            for t, h, w in (grids.tolist() if grids is not None else []):
                total += self.vision_flops((t, h, w), video)
                if video:
                    total += self.predictor_per_video(int(t), int(h * w) // self.merge ** 2)
        return float(total)

    def inputs_flops(self, sequence_lengths: Sequence[int], inputs: Mapping[str, Any]) -> float:
        """:meth:`batch_flops` of a batch given as the model's forward kwargs."""
        return self.batch_flops(sequence_lengths, inputs.get("video_grid_thw"), inputs.get("image_grid_thw"))

    def describe(self) -> str:
        """One line stating what is counted."""
        attention = "full" if not self.window else f"{self.full_blocks} full + windows of {self.window}x{self.window}"
        return (f"LLM 6x{self.llm_params / 1e6:.1f}M params/token + attention 12*L*h*seq; vision encoder "
                f"{'fwd+bwd' if self.tower_trainable else 'forward only (frozen)'} {self.depth} blocks of "
                f"{self.block_params / 1e6:.2f}M per patch, attention {attention}; {self.mergers} merger(s) "
                f"{self.merger_params / 1e6:.2f}M per merged token; AR predictor ({self.ar_window}) "
                f"{self.predictor_params / 1e6:.2f}M on each video's merged tokens + attention")


def model_flops(model: nn.Module) -> ModelFlops | QwenModelFlops | None:
    """The accounting of ``model``'s family: Qwen-VL grids, LLaVA-OneVision's fixed-size tower, else None."""
    from lmms_engine.models.qwen_vl_common import is_qwen_model

    if is_qwen_model(model):
        return QwenModelFlops.from_model(model)
    if hasattr(getattr(model.config, "vision_config", None), "image_size"):
        return ModelFlops.from_model(model)
    return None


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
    the family's ``inputs_flops`` (:func:`model_flops`). Rates use the wall time between logs (data loading included).

    Args:
        flops: the estimate; None = :func:`model_flops` of the model at train begin.
        peak_tflops: peak dense TFLOP/s of one device; None = by device name (H100 989, A100 312),
            no ``mfu`` when unknown (CPU).
    """

    def __init__(self, flops: ModelFlops | QwenModelFlops | None = None, peak_tflops: float | None = None) -> None:
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
            self.window.flops += self.flops.inputs_flops(lengths, inputs)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self.count(kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            if self.flops is None:
                self.flops = model_flops(model)
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


__all__ = ["ModelFlops", "PEAK_TFLOPS", "QwenModelFlops", "StepFlops", "ThroughputCallback", "VisionForward",
           "add_throughput_logging", "decoder_flops_shape", "model_flops", "peak_flops", "sample_lengths",
           "window_sides"]
