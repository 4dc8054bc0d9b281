"""Autoregressive reconstruction: predict the vision encoder's embedding of frame t+1 (DINO-WM style).

From the LLM's hidden states at the video tokens of frames ``<= t``, a small frame-causal transformer
(the predictor) predicts the frozen vision encoder's features of frame ``t+1``; the loss is their MSE.

Shapes and conventions
----------------------
- Per-frame hidden states ``[B, T, P', hidden_size]`` come either from a
  :class:`~lmms_engine.models.layout.VideoTokenLayout` (gathered at each frame's patch tokens; newline
  and faster tokens skipped; absent frames and samples without video masked) or, without a
  layout, from ``hidden_states`` that are exactly the video tokens, frame-major: ``T x P'`` tokens,
  ``P'`` = the tower's full patch grid (e.g. 8x8 = 64 for a 64 px / patch-8 tower) unless
  ``enable_multiscale_pooling`` pools it with ``mm_spatial_pool_stride`` / ``mm_spatial_pool_mode``
  (4x4 = 16 at average stride 2).
- Targets ``[B, T, P_full, embedding_dim]``: the tower's ``hidden_states[vision_feature_layer]`` after
  the feature select strategy, before the projector, detached; pooled exactly like each frame's video
  tokens (the layout's stride and pool mode), so each hidden token has one target.
- Faster video (``layout.fast`` set): slow frames' hidden states are pooled down to the fast grid with
  the layout's pool mode (pooling by ``s`` then by 2 gives the same side as pooling by ``2s``) and every
  frame's targets are pooled at the fast stride: the predictor sees one uniform grid.
- One pass (``window="sliding"``, the default): the predictor runs once over each video's frames
  ``0..T-2``; position ``t`` attends frames ``t-num_hist+1..t`` (banded frame-causal mask; deeper
  layers reach further back through earlier positions, never forward) and predicts frame ``t+1``, so
  every frame ``1..T-1`` is a target exactly once. Frames count while present from frame 0 on
  (truncation cuts a video's end).
- Windows of ``num_hist + 1`` frames (teacher forcing): inputs frames ``i..i+num_hist-1``, targets
  ``i+1..i+num_hist``. A window is used only when all its frames are present. With the frame-causal
  mask every position is supervised; without it only the last position (which never sees its target).
  ``window="all"`` uses every window, ``"random"`` one random window per sample. A sample with no full
  window but ``n >= 2`` leading frames uses one shorter window of ``n`` frames (warned once).
- Fast/slow streams (``use_fast_slow_frames``): frames ``0, fast_stride, ...`` (``num_fast`` of them)
  and ``0, slow_stride, ...`` (``num_slow``), clipped to the frames seen (warned once); the predictor
  runs on each and the MSE is the mean of the streams that have targets.
- Loss: MSE over the elements of supervised target tokens; the returned loss is ``loss_weight * mse``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmms_engine.models.autoregressive_config import AutoregressiveConfig
from lmms_engine.models.frame_attention import apply_rotary, banded_attention, frame_rotary_tables
from lmms_engine.models.layout import FrameTokenIndex, VideoTokenLayout
from lmms_engine.models.loss_terms import LossTerm, autoregressive_mean
from lmms_engine.models.vision import feature_size, patch_grid_side, select_features, vision_width
from lmms_engine.utils.sharding import gathers_weights
from lmms_engine.video.masks import frame_causal_mask
from lmms_engine.video.pooling import pooled_side, spatial_pool


@dataclass
class AutoregressiveLossOutput:
    """Result of :meth:`AutoregressiveReconstructionModule.compute_autoregressive_loss`.

    Attributes:
        loss: ``loss_weight * mse``, the term added to the main loss (main + this = total).
        mse: raw MSE over supervised target elements (detached).
        copy_last_mse: MSE of the copy-last-frame baseline (predict frame t+1 = target of frame t) on the
            same supervised tokens (detached).
        fast_loss, slow_loss: ``loss_weight * mse`` of each stream when ``use_fast_slow_frames`` (detached;
            zero for a stream without targets), else None.
        num_targets: supervised target tokens, all streams.
        terms: per stream (``"all"``, or ``"fast"`` and ``"slow"``), the raw :class:`LossTerm` of the loss
            contract: squared error per supervised target token (mean over ``embedding_dim``) summed, and
            the number of supervised target tokens (see :mod:`lmms_engine.models.loss_terms`).
    """

    loss: torch.Tensor
    mse: torch.Tensor
    copy_last_mse: torch.Tensor
    fast_loss: torch.Tensor | None
    slow_loss: torch.Tensor | None
    num_targets: int
    terms: dict[str, LossTerm] = field(default_factory=dict)


@dataclass
class PreparedFrames:
    """What :meth:`AutoregressiveReconstructionModule.prepare_frames` returns.

    Attributes:
        tokens: ``[B, T, P', embedding_dim]`` projected hidden states of every frame (zeros where absent).
        targets: ``[B, T, P', embedding_dim]`` detached float32 targets pooled like the tokens.
        valid: ``[B, T]`` frames present.
        pool_stride, pool_mode: how the ``P'`` grid was pooled from the tower's full grid.
        streams: ``[(name, frame indices)]`` the temporal sequences the predictor runs on.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    pool_stride: int
    pool_mode: str
    streams: list[tuple[str, torch.Tensor]]


class PredictorBlock(nn.Module):
    """Pre-norm transformer block whose attention takes a boolean mask (True = attend), or a banded
    frame-causal attention with rotary temporal positions (the one-pass predictor)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                band: BandedAttention | None = None) -> torch.Tensor:
        """``x`` ``[N, L, dim]``; ``attn_mask`` bool ``[L, L]`` or None (full attention); ``band``: the
        one-pass predictor's banded attention (``attn_mask`` unused then)."""
        n, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        if band is None:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:
            attn = band(q, k, v, dropout)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(n, length, dim)))
        return x + self.drop(self.mlp(self.norm2(x)))


@dataclass
class BandedAttention:
    """The one-pass predictor's attention: banded frame-causal (``band`` frames), rotary positions."""

    tokens_per_frame: int
    band: int
    cos: torch.Tensor
    sin: torch.Tensor
    backend: str

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        return banded_attention(q, k, v, tokens_per_frame=self.tokens_per_frame, band=self.band,
                                backend=self.backend, dropout_p=dropout)


class FramePredictor(nn.Module):
    """DINO-WM-style predictor: Linear(hidden -> embedding), pre-norm blocks, final LayerNorm.

    Window modes (``all``, ``random``): position embeddings are learned per (frame-in-window, token)
    on the tower's full patch grid ``[num_hist, patch_side**2, embedding_dim]`` and pooled like the
    tokens when the grid is pooled, so one table serves every pooling stride.

    One pass (``sliding``): the table holds one frame (``[1, patch_side**2, embedding_dim]``: where a
    token sits in its frame); which frame it is comes from rotary embeddings of the frame index inside
    attention, so a score depends only on how many frames apart query and key are, never on where the
    sequence starts. Attention is banded frame-causal over ``num_hist`` frames
    (:mod:`lmms_engine.models.frame_attention`; ``attention_backend`` picks the kernel, ``auto`` by
    device).

    The output is ``target_mean + target_std * norm(x)``: two buffers ``[embedding_dim]`` (0 and 1, an
    identity, until :meth:`calibrate` sets them from target features; ``calibrated`` records that).
    Why: DINO-WM's targets are LayerNorm outputs, which a final LayerNorm matches, but a vision
    tower's hidden states are not normalised. The tiny SigLIP's per-channel means span -3.4..2.8
    while each channel varies by 0.2-0.5; the LayerNorm's bias, the only parameter that can carry
    that offset, moves about ``lr`` per Adam step, so at lr 2e-3 it travels ~0.4 in 400 steps and
    the predictor ended above the best constant prediction. With the statistics as a fixed output
    affine it starts at the targets' scale and learns only what varies.
    """

    def __init__(self, hidden_size: int, config: AutoregressiveConfig, patch_side: int) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.patch_side = patch_side
        self.sliding = config.window == "sliding"
        self.num_hist = config.num_hist
        self.num_heads = config.num_heads
        self.attention_backend = "auto"
        self.input_proj = nn.Linear(hidden_size, dim)
        table_frames = 1 if self.sliding else config.num_hist
        self.pos_embed = nn.Parameter(torch.zeros(table_frames, patch_side * patch_side, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            PredictorBlock(dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("target_mean", torch.zeros(dim))
        self.register_buffer("target_std", torch.ones(dim))
        # A float flag (1 = calibrated): the predictor's tensors are all float32, even in a bf16 model.
        self.register_buffer("calibrated", torch.zeros(()))

    @torch.no_grad()
    def calibrate(self, targets: torch.Tensor) -> None:
        """Set the output affine to the per-channel mean and standard deviation of ``targets``
        ``[..., embedding_dim]`` (e.g. the target features of the first training videos)."""
        flat = targets.detach().reshape(-1, targets.shape[-1]).float()
        if flat.shape[0] < 2:
            raise ValueError(f"calibration needs at least 2 target vectors, got {flat.shape[0]}")
        self.target_mean.copy_(flat.mean(0))
        self.target_std.copy_(flat.std(0).clamp(min=1e-6))
        self.calibrated.fill_(1.0)

    def position_embedding(self, num_frames: int, pool_stride: int, pool_mode: str,
                           grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``[num_frames, P', dim]`` for frames pooled with ``pool_stride`` / ``pool_mode``, or, with
        ``grid = (h, w)`` (towers of variable frame size, e.g. Qwen-VL), the table resized bilinearly
        to ``h x w`` (``P' = h * w``). One pass: ``[1, P', dim]``, the same for every frame."""
        table = self.pos_embed[:num_frames]
        if grid is None:
            return spatial_pool(table, pool_stride, pool_mode)
        side = self.patch_side
        square = table.view(num_frames, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=tuple(grid), mode="bilinear", align_corners=False)
        return resized.flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, *, pool_stride: int = 1, pool_mode: str = "average",
                causal: bool = True, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Predict the next frame's embeddings for every input frame.

        Args:
            tokens: ``[N, F, P', dim]`` projected hidden states (``input_proj`` output) of ``F`` frames
                (``F <= num_hist`` in the window modes; any ``F`` in one pass).
            pool_stride, pool_mode: how the ``P'`` grid was pooled from the tower's full grid.
            causal: frame-causal mask (True) or full attention (False); the one-pass predictor is
                always causal.
            grid: ``(h, w)`` of the ``P' = h * w`` tokens for frames of any size (see ``position_embedding``).

        Returns:
            ``[N, F, P', dim]``; position ``f`` predicts frame ``f + 1``.
        """
        n, frames, patches, dim = tokens.shape
        if not self.sliding and not 1 <= frames <= self.pos_embed.shape[0]:
            raise ValueError(f"predictor takes 1..num_hist = {self.pos_embed.shape[0]} frames, got {frames}")
        if frames < 1:
            raise ValueError("predictor got no frames")
        pos = self.position_embedding(1 if self.sliding else frames, pool_stride, pool_mode, grid)
        if pos.shape[1] != patches:
            raise ValueError(f"predictor got {patches} tokens per frame, but pooling the tower's "
                             f"{self.patch_side}x{self.patch_side} grid with {pool_mode} stride {pool_stride} "
                             f"gives {pos.shape[1]}")
        x = (tokens + pos.to(tokens.dtype)).reshape(n, frames * patches, dim)
        band = mask = None
        if self.sliding:
            cos, sin = frame_rotary_tables(frames, patches, dim // self.num_heads, x.dtype, x.device)
            band = BandedAttention(patches, self.num_hist, cos, sin, self.attention_backend)
        elif causal:
            mask = frame_causal_mask(frames, patches, device=x.device)
        for block in self.blocks:
            x = block(x, mask, band)
        out = self.target_mean.to(x.dtype) + self.target_std.to(x.dtype) * self.norm(x)
        return out.view(n, frames, patches, dim)


#: Side of the predictor's position table for towers of variable frame size (Qwen-VL): resized to each
#: video's merged grid (``FramePredictor.position_embedding``).
VARIABLE_GRID_TABLE_SIDE = 16


def _tower_geometry(vision_tower: nn.Module) -> tuple[int, int]:
    """(width, patch grid side) of a ViT-style tower from its config; towers of variable frame size (a
    ``spatial_merge_size``, no ``image_size``: Qwen-VL) get :data:`VARIABLE_GRID_TABLE_SIDE`."""
    config = getattr(vision_tower, "config", None)
    if isinstance(vision_tower, nn.Module) and config is not None and not hasattr(config, "image_size") \
            and hasattr(config, "spatial_merge_size") and hasattr(config, "hidden_size"):
        return vision_width(config), VARIABLE_GRID_TABLE_SIDE
    names = ("hidden_size", "image_size", "patch_size")
    if not isinstance(vision_tower, nn.Module) or config is None or not all(hasattr(config, n) for n in names):
        raise TypeError(
            "vision_tower must be a vision encoder module whose .config has hidden_size, image_size and "
            f"patch_size (e.g. transformers' SiglipVisionModel, model.model.vision_tower); got "
            f"{type(vision_tower).__name__}"
        )
    return vision_width(config), patch_grid_side(config)


class AutoregressiveReconstructionModule(nn.Module):
    """Next-frame embedding prediction from the LLM's video-token hidden states (see module docstring).

    Target encoder (``config.target_encoder``):
        ``shared``: keeps a reference to the model's tower without registering it (no parameters, no
        state-dict keys); uses the features the model hands over (``target_features``) with no vision
        forward, or runs the tower under ``no_grad`` on ``video_frames``.
        ``copy``: a frozen deep copy (``requires_grad`` False, eval mode, saved in checkpoints), so
        targets stay fixed while the tower trains; needs ``video_frames``.
        ``auto``: ``shared`` when every tower parameter is frozen at creation, else ``copy``.

    Attributes:
        config: the :class:`AutoregressiveConfig`.
        loss_weight, enable_multiscale_pooling: from the config (the guide's debugging snippet reads them).
        target_encoder_mode: ``"shared"`` or ``"copy"`` (``auto`` resolved).
        target_encoder: the frozen copy in ``copy`` mode, else None.
        predictor: the :class:`FramePredictor` (the only trainable parameters).
    """

    def __init__(self, vision_tower: nn.Module, hidden_size: int,
                 config: Mapping | AutoregressiveConfig | None = None,
                 encoder_parameters: Callable[[], Iterable[nn.Parameter]] | None = None) -> None:
        super().__init__()
        if not isinstance(config, AutoregressiveConfig):
            config = AutoregressiveConfig.from_dict(config)
        width, patch_side = _tower_geometry(vision_tower)
        config.check_against_tower(feature_size(width, config.vision_feature_layer),
                                   tower=f"at vision_feature_layer={config.vision_feature_layer!r}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.config = config
        self.hidden_size = hidden_size
        self.patch_side = patch_side
        # The parameters that shape the targets (the whole tower unless the model says otherwise, e.g. a
        # Qwen-VL encoder without its merger): "auto" and the frozen-target checks read these.
        object.__setattr__(self, "_encoder_parameters", encoder_parameters or vision_tower.parameters)
        mode = config.target_encoder
        if mode == "auto":
            mode = "copy" if any(p.requires_grad for p in self._encoder_parameters()) else "shared"
        self.target_encoder_mode: str = mode
        # Not registered: the model owns the tower; in copy mode it is the source for re-syncing.
        object.__setattr__(self, "_source_tower", vision_tower)
        if mode == "copy":
            self.target_encoder = copy.deepcopy(vision_tower).requires_grad_(False).eval()
        else:
            self.target_encoder = None
        self.predictor = FramePredictor(hidden_size, config, patch_side)
        self._warned: set[str] = set()
        #: Batches prepared (:meth:`prepare_frames`: every loss and reconstruction evaluation), and per event (``clip-fast``, ``clip-slow``:
        #: a stream clipped to a short video; ``short``: a video shorter than a window) in how many of them
        #: it happened.
        self.forward_count = 0
        self.event_counts: dict[str, int] = {}
        self._events_now: set[str] = set()

    # -- public helpers ----------------------------------------------------------------------------

    @property
    def loss_weight(self) -> float:
        return self.config.loss_weight

    @property
    def enable_multiscale_pooling(self) -> bool:
        return self.config.enable_multiscale_pooling

    @property
    def uses_shared_features(self) -> bool:
        """True when the model should hand over its own vision features (``target_features``)."""
        return self.target_encoder_mode == "shared"

    def extra_repr(self) -> str:
        return (f"target_encoder={self.target_encoder_mode!r}, hidden_size={self.hidden_size}, "
                f"embedding_dim={self.config.embedding_dim}, num_hist={self.config.num_hist}, "
                f"loss_weight={self.config.loss_weight}")

    def dense_pooling(self) -> tuple[int, str]:
        """(stride, mode) of the frames when no layout is given."""
        stride = self.config.mm_spatial_pool_stride if self.config.enable_multiscale_pooling else 1
        return stride, self.config.mm_spatial_pool_mode

    def tokens_per_frame(self) -> int:
        """``P'``: video tokens per frame expected without a layout."""
        stride, mode = self.dense_pooling()
        return pooled_side(self.patch_side, stride, mode) ** 2

    def train(self, mode: bool = True) -> "AutoregressiveReconstructionModule":
        super().train(mode)
        if self.target_encoder is not None:
            self.target_encoder.eval()  # the snapshot is a fixed function, dropout never on
        return self

    @torch.no_grad()
    def sync_target_encoder(self) -> None:
        """Copy mode: refresh the snapshot from the live tower (e.g. after loading pretrained tower
        weights into a model whose checkpoint has no snapshot)."""
        if self.target_encoder is None:
            return
        self.target_encoder.load_state_dict(self._source_tower.state_dict())

    @torch.no_grad()
    def encode_targets(self, video_frames: torch.Tensor, frames_used: torch.Tensor | None = None) -> torch.Tensor:
        """Target features of ``video_frames`` ``[B, T, 3, H, W]`` -> ``[B, T, P_full, embedding_dim]``.

        Runs the target encoder (the copy, or the shared tower) under ``no_grad`` on the frames marked in
        ``frames_used`` ``[B, T]`` (all by default); the others stay zero.
        """
        if video_frames.dim() != 5:
            raise ValueError(f"video_frames must be [B, T, 3, H, W], got {tuple(video_frames.shape)}")
        encoder = self.target_encoder if self.target_encoder is not None else self._source_tower
        size = int(encoder.config.image_size)
        if tuple(video_frames.shape[-2:]) != (size, size):
            raise ValueError(f"video_frames are {video_frames.shape[-2]}x{video_frames.shape[-1]} pixels; the vision "
                             f"tower takes {size}x{size} (load them with target_size=({size}, {size}))")
        self._check_encoder_frozen(stacklevel=4)
        b, t = video_frames.shape[:2]
        used = torch.ones(b, t, dtype=torch.bool, device=video_frames.device) if frames_used is None \
            else frames_used.to(video_frames.device)
        param = next(encoder.parameters(), None)
        dtype = param.dtype if param is not None else video_frames.dtype
        out = torch.zeros(b, t, self.patch_side ** 2, self.config.embedding_dim,
                          dtype=dtype, device=video_frames.device)
        if not used.any():
            if gathers_weights(encoder):  # the other ranks' forwards gather its weights: take part
                encoder(pixel_values=video_frames.new_zeros(1, 3, size, size, dtype=dtype))
            return out
        feats = select_features(encoder, video_frames[used].to(dtype), self.config.vision_feature_layer,
                                self.config.vision_feature_select_strategy)
        out[used] = self._check_features(feats, "the target encoder's features")
        return out

    @torch.no_grad()
    def calibrate_targets(self, video_frames: torch.Tensor, frames_used: torch.Tensor | None = None, *,
                          pool_stride: int = 1, pool_mode: str = "average") -> int:
        """Set the predictor's output affine (:meth:`FramePredictor.calibrate`) from the target features
        of ``video_frames`` ``[B, T, 3, H, W]`` (frames marked in ``frames_used`` ``[B, T]``), pooled as the
        predictor sees them; return how many frames were used (0: nothing changed)."""
        b, t = video_frames.shape[:2]
        used = torch.ones(b, t, dtype=torch.bool, device=video_frames.device) if frames_used is None \
            else frames_used.to(video_frames.device).bool()
        if not used.any():
            return 0
        feats = spatial_pool(self.encode_targets(video_frames, used).float(), pool_stride, pool_mode)
        self.predictor.calibrate(feats[used])
        return int(used.sum())

    def predict(self, frame_hidden: torch.Tensor, *, pool_stride: int | None = None,
                pool_mode: str | None = None) -> torch.Tensor:
        """Predict next-frame embeddings ``[N, F, P', embedding_dim]`` from hidden states
        ``[N, F, P', hidden_size]`` of ``F <= num_hist`` frames (position ``f`` predicts frame ``f+1``).
        Pooling defaults to :meth:`dense_pooling`."""
        stride, mode = self.dense_pooling()
        tokens = self.predictor.input_proj(frame_hidden.to(self.predictor.input_proj.weight.dtype))
        return self.predictor(tokens, pool_stride=pool_stride or stride, pool_mode=pool_mode or mode,
                              causal=self.config.use_frame_causal_mask)

    # -- the loss ----------------------------------------------------------------------------------

    def compute_autoregressive_loss(
        self,
        hidden_states: torch.Tensor,
        video_frames: torch.Tensor | None = None,
        *,
        target_features: torch.Tensor | None = None,
        video_token_layout: VideoTokenLayout | None = None,
        return_output: bool = False,
    ) -> torch.Tensor | AutoregressiveLossOutput:
        """Weighted next-frame reconstruction loss.

        Args:
            hidden_states: ``[B, L, hidden_size]`` LLM hidden states. Without ``video_token_layout`` they
                must be exactly the video tokens, frame-major: ``T x P'`` tokens, ``P'`` =
                :meth:`tokens_per_frame` (the tower's full grid unless ``enable_multiscale_pooling``).
            video_frames: ``[B, T, 3, H, W]`` normalised pixels; encoded by the target encoder when
                ``target_features`` are not used.
            target_features: ``[B, T, P_full, embedding_dim]`` vision features at
                ``vision_feature_layer`` (after the select strategy), before projector and pooling: the
                features the model already computed. Used in ``shared`` mode (no vision forward);
                ignored in ``copy`` mode, which encodes ``video_frames`` with its snapshot.
            video_token_layout: where each frame's tokens sit in ``hidden_states``; its strides and pool
                mode set the target pooling.
            return_output: return an :class:`AutoregressiveLossOutput` instead of the loss tensor.

        Returns:
            ``loss_weight * mse`` (a scalar that still reaches the predictor's parameters when nothing
            is supervised, so distributed backward never waits), or the full output.
        """
        frames = self.prepare_frames(hidden_states, video_frames, target_features=target_features,
                                     video_token_layout=video_token_layout)
        results = {}
        for name, idx in frames.streams:
            results[name] = self._stream_sums(frames.tokens[:, idx], frames.targets[:, idx], frames.valid[:, idx],
                                              frames.pool_stride, frames.pool_mode)
        return self._combine(results, return_output)

    def prepare_frames(
        self,
        hidden_states: torch.Tensor,
        video_frames: torch.Tensor | None = None,
        *,
        target_features: torch.Tensor | None = None,
        video_token_layout: VideoTokenLayout | None = None,
    ) -> "PreparedFrames":
        """The predictor's inputs and targets, as the loss and the reconstruction evaluation use them:
        hidden states gathered per frame (or split densely), projected by ``input_proj`` (once per
        token), the targets encoded (frames of some stream only) and pooled like the tokens, the
        valid-frame mask and the streams. Arguments as :meth:`compute_autoregressive_loss`."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, L, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        self.forward_count += 1
        self._events_now = set()
        num_frames = self._num_frames(video_frames, target_features, video_token_layout)
        if video_token_layout is not None:
            frame_hidden, valid, stride, mode = self.gather_layout(hidden_states, video_token_layout)
        else:
            frame_hidden, valid, stride, mode = self._dense_frames(hidden_states, num_frames)
        streams = self.frame_streams(num_frames, valid.device)
        used = valid & torch.stack([torch.isin(torch.arange(num_frames, device=valid.device), idx)
                                    for _, idx in streams]).any(0)
        targets = spatial_pool(self._targets(video_frames, target_features, used, hidden_states.shape[0],
                                             num_frames).float(), stride, mode)
        tokens = self.predictor.input_proj(frame_hidden.to(self.predictor.input_proj.weight.dtype))
        return PreparedFrames(tokens=tokens, targets=targets, valid=valid, pool_stride=stride, pool_mode=mode,
                              streams=streams)

    def compute_grid_loss(
        self,
        videos: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]],
    ) -> AutoregressiveLossOutput:
        """The loss over videos of different frame grids (Qwen-VL), as one batch.

        Each entry is ``(frame_hidden [N, T, h*w, hidden_size], targets [N, T, h*w, embedding_dim],
        valid [N, T], (h, w))``: the LLM's hidden states at each frame's tokens (raster order), their
        detached targets, which frames are present, and the grid. Windows, streams, masks and the loss
        are those of :meth:`compute_autoregressive_loss`; squared errors and counts are summed over all
        entries before the loss is formed. No entry (a text-only batch) gives the exact zero that
        reaches every predictor parameter.
        """
        self.forward_count += 1
        self._events_now = set()
        weight_dtype = self.predictor.input_proj.weight.dtype
        results: dict[str, tuple] = {}
        for frame_hidden, targets, valid, grid in videos:
            if frame_hidden.shape[:3] != targets.shape[:3] or frame_hidden.shape[-1] != self.hidden_size \
                    or targets.shape[-1] != self.config.embedding_dim or frame_hidden.shape[2] != grid[0] * grid[1]:
                raise ValueError(f"grid entry: hidden states {tuple(frame_hidden.shape)} and targets "
                                 f"{tuple(targets.shape)} do not fit a {grid[0]}x{grid[1]} grid of "
                                 f"[hidden {self.hidden_size}] -> [embedding {self.config.embedding_dim}]")
            self._check_encoder_frozen(stacklevel=4)
            tokens = self.predictor.input_proj(frame_hidden.to(weight_dtype))
            for name, idx in self.frame_streams(frame_hidden.shape[1], valid.device):
                sq, base, count = self._stream_sums(tokens[:, idx], targets[:, idx].float().detach(), valid[:, idx],
                                                    1, "average", grid=tuple(grid))
                if name not in results:
                    results[name] = (sq, base, count)
                elif sq is not None:
                    prev = results[name]
                    results[name] = (sq if prev[0] is None else prev[0] + sq,
                                     base if prev[1] is None else prev[1] + base, prev[2] + count)
        if not results:
            results = {name: (None, None, 0) for name in self.stream_names()}
        return self._combine(results, True)

    # -- internals ---------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        """Warn once per module; ``stacklevel`` points at the caller of the public method."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"autoregressive reconstruction: {message}", stacklevel=stacklevel)

    def _warn_counted(self, key: str, message: str, stacklevel: int) -> None:
        """Count an event of this forward; warn at its 1st, 10th, 100th, ... occurrence with how often it
        happened so far (``event_counts``), so a short-clip warning says whether it is rare or the rule."""
        if key in self._events_now:
            return
        self._events_now.add(key)
        seen = self.event_counts.get(key, 0) + 1
        self.event_counts[key] = seen
        if seen == 10 ** (len(str(seen)) - 1):
            warnings.warn(f"autoregressive reconstruction: {message} (in {seen} of {self.forward_count} "
                          f"batches so far)", stacklevel=stacklevel)

    def _check_encoder_frozen(self, stacklevel: int) -> None:
        if self.target_encoder is not None:
            if any(p.requires_grad for p in self.target_encoder.parameters()):
                self.target_encoder.requires_grad_(False)
                self._warn_once("unfrozen", "the target encoder copy had trainable parameters (requires_grad_ "
                                "was called on the whole model); it was frozen again", stacklevel)
        elif any(p.requires_grad for p in self._encoder_parameters()):
            self._warn_once("shared-trains", "target_encoder='shared' but the vision tower trains: targets "
                            "drift with it; use target_encoder='copy' for fixed targets", stacklevel)

    def _check_features(self, feats: torch.Tensor, what: str) -> torch.Tensor:
        full = self.patch_side ** 2
        if feats.shape[-2:] != (full, self.config.embedding_dim):
            raise ValueError(
                f"{what} have {feats.shape[-2]} tokens of size {feats.shape[-1]} per frame; expected the "
                f"tower's {self.patch_side}x{self.patch_side} = {full} patches of size "
                f"{self.config.embedding_dim} (vision_feature_select_strategy="
                f"{self.config.vision_feature_select_strategy!r})"
            )
        return feats

    def _num_frames(self, video_frames, target_features, layout) -> int:
        sources = {}
        if video_frames is not None:
            sources["video_frames"] = video_frames.shape[1]
        if target_features is not None:
            if target_features.dim() != 4:
                raise ValueError(f"target_features must be [B, T, P_full, embedding_dim], got "
                                 f"{tuple(target_features.shape)}")
            sources["target_features"] = target_features.shape[1]
        if layout is not None:
            sources["video_token_layout"] = layout.slow.positions.shape[1]
        if "video_frames" not in sources and "target_features" not in sources:
            raise ValueError("compute_autoregressive_loss needs video_frames or target_features")
        if len(set(sources.values())) > 1:
            raise ValueError(f"frame counts disagree: {sources}")
        return next(iter(sources.values()))

    def _targets(self, video_frames, target_features, used, batch, num_frames) -> torch.Tensor:
        self._check_encoder_frozen(stacklevel=5)
        if self.target_encoder_mode == "shared" and target_features is not None:
            feats = self._check_features(target_features, "target_features")
        elif video_frames is not None:
            feats = self.encode_targets(video_frames, used)
        else:
            raise ValueError("target_encoder='copy' needs video_frames: target_features come from the "
                             "training tower, the targets from the frozen snapshot")
        if feats.shape[:2] != (batch, num_frames):
            raise ValueError(f"targets are [B, T] = {tuple(feats.shape[:2])}, hidden states/layout give "
                             f"[{batch}, {num_frames}]")
        return feats.detach()

    def _dense_frames(self, hidden_states: torch.Tensor, num_frames: int):
        stride, mode = self.dense_pooling()
        per_frame = self.tokens_per_frame()
        if hidden_states.shape[1] != num_frames * per_frame:
            side = pooled_side(self.patch_side, stride, mode)
            raise ValueError(
                f"without a video_token_layout, hidden_states must be exactly the video tokens, frame-major: "
                f"T x P' = {num_frames} x {per_frame} = {num_frames * per_frame} tokens (P' = {side}x{side}, "
                f"the tower's {self.patch_side}x{self.patch_side} grid pooled by {mode} stride {stride}); got "
                f"{hidden_states.shape[1]}. Pass video_token_layout for sequences with other tokens."
            )
        b = hidden_states.shape[0]
        frames = hidden_states.reshape(b, num_frames, per_frame, self.hidden_size)
        valid = torch.ones(b, num_frames, dtype=torch.bool, device=hidden_states.device)
        return frames, valid, stride, mode

    def _gather_index(self, hidden_states: torch.Tensor, index: FrameTokenIndex):
        positions = index.positions.to(hidden_states.device)
        b, t, p = positions.shape
        if p != index.grid_side ** 2:
            raise ValueError(f"layout index has {p} positions per frame for a {index.grid_side}x"
                             f"{index.grid_side} grid")
        if positions.numel() and positions.max() >= hidden_states.shape[1]:
            raise ValueError(f"layout positions reach {int(positions.max())}, hidden_states has "
                             f"{hidden_states.shape[1]} tokens")
        valid = index.frame_mask.to(hidden_states.device).bool() & (positions >= 0).all(-1)
        gathered = hidden_states.gather(
            1, positions.clamp(min=0).reshape(b, t * p, 1).expand(-1, -1, hidden_states.shape[-1])
        ).view(b, t, p, hidden_states.shape[-1])
        # where, not multiply: padding may hold inf/NaN and must not reach the loss or its gradient.
        return torch.where(valid[..., None, None], gathered, torch.zeros((), dtype=gathered.dtype,
                                                                          device=gathered.device)), valid

    def _check_grid(self, index: FrameTokenIndex, mode: str) -> None:
        expected = pooled_side(self.patch_side, index.pool_stride, mode)
        if expected != index.grid_side:
            raise ValueError(f"layout grid {index.grid_side}x{index.grid_side} does not match the tower's "
                             f"{self.patch_side}x{self.patch_side} grid pooled by {mode} stride "
                             f"{index.pool_stride} ({expected}x{expected})")

    def gather_layout(self, hidden_states: torch.Tensor, layout: VideoTokenLayout):
        """Hidden states of each frame's patch tokens, on one grid: ``([B, T, h*w, hidden], valid [B, T],
        stride, mode)``; with the faster stream, slow frames are pooled down to the fast grid."""
        mode = layout.pool_mode
        self._check_grid(layout.slow, mode)
        frames, valid = self._gather_index(hidden_states, layout.slow)
        if layout.fast is None:
            return frames, valid, layout.slow.pool_stride, mode
        self._check_grid(layout.fast, mode)
        ratio, rest = divmod(layout.fast.pool_stride, layout.slow.pool_stride)
        if rest or pooled_side(layout.slow.grid_side, ratio, mode) != layout.fast.grid_side:
            raise ValueError(f"fast stride {layout.fast.pool_stride} is not a multiple of slow stride "
                             f"{layout.slow.pool_stride} giving the fast grid")
        fast_frames, fast_valid = self._gather_index(hidden_states, layout.fast)
        # One uniform grid for the predictor: slow frames pooled down to the fast grid.
        frames = torch.where(valid[..., None, None], spatial_pool(frames, ratio, mode), fast_frames)
        return frames, valid | fast_valid, layout.fast.pool_stride, mode

    def stream_names(self) -> tuple[str, ...]:
        """Names of the temporal streams: ``("all",)`` or ``("fast", "slow")``."""
        return ("fast", "slow") if self.config.use_fast_slow_frames else ("all",)

    def _stream_frames(self, num_frames: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        cfg = self.config
        if not cfg.use_fast_slow_frames:
            return [("all", torch.arange(num_frames, device=device))]
        streams = []
        for name, stride, wanted in (("fast", cfg.fast_stride, cfg.num_fast), ("slow", cfg.slow_stride, cfg.num_slow)):
            count = min(wanted, (num_frames - 1) // stride + 1)
            streams.append((name, torch.arange(count, device=device) * stride))
        return streams

    def frame_streams(self, num_frames: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """The temporal sequences the predictor runs on: ``[("all", frames)]``, or the fast and slow
        streams (frame indices into ``[0, num_frames)``) when ``use_fast_slow_frames``."""
        cfg = self.config
        streams = self._stream_frames(num_frames, device)
        if cfg.use_fast_slow_frames:
            for (name, idx), stride, wanted in zip(streams, (cfg.fast_stride, cfg.slow_stride),
                                                   (cfg.num_fast, cfg.num_slow)):
                if len(idx) < wanted:
                    self._warn_counted(f"clip-{name}", f"the {name} stream wants {wanted} frames {stride} apart "
                                       f"(a span of {(wanted - 1) * stride + 1} frames) but the video has "
                                       f"{num_frames}; using {len(idx)}", stacklevel=5)
        return streams

    def _window_candidates(self, valid: torch.Tensor, warn: bool = True) -> list[tuple[list[int], int]]:
        """Per sample of ``valid`` ``[B, K]``: (start frames of its usable windows, window length); a
        sample with no full window but ``n >= 2`` leading frames has one shorter window, none below."""
        valid = valid.cpu()
        b, k = valid.shape
        full = self.config.num_hist + 1
        ok = valid.unfold(1, full, 1).all(-1) if k >= full else torch.zeros(b, 0, dtype=torch.bool)
        found: list[tuple[list[int], int]] = []
        short = None
        for sample in range(b):
            starts = ok[sample].nonzero().flatten().tolist()
            length = full
            if not starts:
                lead = int(valid[sample].long().cumprod(0).sum())
                starts, length = ([0], lead) if lead >= 2 else ([], 0)
                short = lead if starts and short is None else short
            found.append((starts, length))
        if short is not None and warn:
            self._warn_counted("short", f"a frame sequence with {short} usable frames is shorter than "
                               f"num_hist + 1 = {full}: using a window of {short} frames ({short - 1} history)",
                               stacklevel=7)
        return found

    def _windows(self, valid: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Windows to train on, grouped by length: ``{W: (sample index [n], start frame [n])}``."""
        found: dict[int, list[tuple[int, int]]] = {}
        for sample, (starts, length) in enumerate(self._window_candidates(valid)):
            if not starts:
                continue
            if self.config.window == "random":
                starts = [starts[int(torch.randint(len(starts), ()))]]
            found.setdefault(length, []).extend((sample, s) for s in starts)
        return {w: (torch.tensor([s for s, _ in v]), torch.tensor([i for _, i in v])) for w, v in found.items()}

    def supervised_target_counts(self, video_num_frames: list[int], tokens_per_frame: int) -> dict[str, int]:
        """Supervised target tokens per stream that :meth:`compute_autoregressive_loss` will count for
        videos of ``video_num_frames`` frames (all present) on a predictor grid of ``tokens_per_frame``
        tokens, without running anything: ``{stream name: tokens}``. The trainer counts a step's units
        with it before the step's first forward."""
        max_frames = max(video_num_frames, default=0)
        frames = torch.tensor(video_num_frames, dtype=torch.long)
        per_window = (lambda length: length - 1) if self.config.use_frame_causal_mask else (lambda length: 1)
        counts = {}
        for name, idx in self._stream_frames(max(max_frames, 1), torch.device("cpu")):
            valid = idx[None, :] < frames[:, None]
            if self.config.window == "sliding":  # every present frame after the first, once
                counts[name] = int((valid.long().cumprod(1).sum(1) - 1).clamp(min=0).sum()) * tokens_per_frame
                continue
            total = 0
            for starts, length in self._window_candidates(valid, warn=False):
                windows = min(len(starts), 1) if self.config.window == "random" else len(starts)
                total += windows * per_window(length) * tokens_per_frame
            counts[name] = total
        return counts

    def _stream_sums(self, tokens, targets, valid, stride: int, mode: str, grid: tuple[int, int] | None = None):
        """(squared error sum, copy-last squared error sum, supervised tokens) of one frame sequence."""
        if self.config.window == "sliding":
            return self._sliding_sums(tokens, targets, valid, stride, mode, grid)
        causal = self.config.use_frame_causal_mask
        sq = base = None
        count = 0
        for length, (samples, starts) in self._windows(valid).items():
            samples, starts = samples.to(tokens.device), starts.to(tokens.device)
            frame_idx = starts[:, None] + torch.arange(length, device=tokens.device)
            rows = samples[:, None]
            pred = self.predictor(tokens[rows, frame_idx[:, :-1]], pool_stride=stride, pool_mode=mode,
                                  causal=causal, grid=grid)
            target, previous = targets[rows, frame_idx[:, 1:]], targets[rows, frame_idx[:, :-1]]
            if not causal:  # only the last position never sees its target frame
                pred, target, previous = pred[:, -1:], target[:, -1:], previous[:, -1:]
            err = (pred.float() - target).pow(2).sum()
            base_err = (previous - target).pow(2).sum()
            sq = err if sq is None else sq + err
            base = base_err if base is None else base + base_err
            count += pred.shape[0] * pred.shape[1] * pred.shape[2]
        return sq, base, count

    def _sliding_sums(self, tokens, targets, valid, stride: int, mode: str, grid: tuple[int, int] | None = None):
        """One banded frame-causal pass over each sample's frames: position ``t`` predicts frame ``t + 1``
        and is supervised when frames ``0 .. t + 1`` are all present (frames are present as a prefix:
        truncation cuts a video's end), so every frame ``t >= 1`` of that prefix is a target once."""
        lead = valid.long().cumprod(1).sum(1)  # [B] leading present frames
        supervised = torch.arange(valid.shape[1] - 1, device=valid.device)[None, :] + 1 < lead[:, None]
        if valid.shape[1] < 2 or not supervised.any():
            return None, None, 0
        rows = supervised.any(1)
        last = int(lead[rows].max())  # frames the longest sample supplies; later ones are padding
        if bool(rows.all()):  # the usual batch: slices, not gathered copies
            tokens, targets, keep = tokens[:, :last - 1], targets[:, :last], supervised[:, :last - 1]
        else:
            tokens, targets, keep = tokens[rows, :last - 1], targets[rows, :last], supervised[rows, :last - 1]
        pred = self.predictor(tokens, pool_stride=stride, pool_mode=mode, causal=True, grid=grid).float()
        target, previous = targets[:, 1:], targets[:, :-1]
        if bool(keep.all()):
            err, base_err = F.mse_loss(pred, target, reduction="sum"), F.mse_loss(previous, target, reduction="sum")
        else:  # where, not multiply: positions past a sample's frames must not reach the loss or its gradient
            keep = keep[..., None, None]
            err = torch.where(keep, (pred - target).pow(2), 0.0).sum()
            base_err = torch.where(keep, (previous - target).pow(2), 0.0).sum()
        return err, base_err.detach(), int(keep.sum()) * pred.shape[2]

    def _combine(self, results: dict, return_output: bool):
        """Per-stream :class:`LossTerm` s (squared error per target token, mean over the embedding, summed
        over the supervised tokens) and, from them, the batch's own loss and metrics."""
        dim = self.config.embedding_dim
        zero = None
        terms: dict[str, LossTerm] = {}
        for name, (sq, base, count) in results.items():
            if sq is None:
                if zero is None:  # a zero that still reaches every predictor parameter (DDP waits otherwise)
                    zero = sum(p.sum() for p in self.predictor.parameters()).float() * 0.0
                sq, base = zero, zero.detach()
            terms[name] = LossTerm(total=sq / dim, count=torch.tensor(count, device=sq.device),
                                   baseline=base.detach() / dim)
        own = {name: term.count for name, term in terms.items()}
        mse = autoregressive_mean(terms, own)
        loss = self.config.loss_weight * mse
        if not return_output:
            return loss
        weight = self.config.loss_weight
        streams = {name: (weight * t.total / t.count.clamp(min=1)).detach() for name, t in terms.items()}
        return AutoregressiveLossOutput(
            loss=loss, mse=mse.detach(), copy_last_mse=autoregressive_mean(terms, own, baseline=True),
            fast_loss=streams.get("fast"), slow_loss=streams.get("slow"),
            num_targets=sum(count for _, _, count in results.values()), terms=terms)


def create_autoregressive_reconstruction_module(
    vision_tower: nn.Module,
    hidden_size: int,
    config: Mapping | AutoregressiveConfig | None = None,
    encoder_parameters: Callable[[], Iterable[nn.Parameter]] | None = None,
) -> AutoregressiveReconstructionModule:
    """Build the module for a model whose LLM has ``hidden_size`` and whose vision tower is ``vision_tower``.

    ``config``: an :class:`AutoregressiveConfig`, a plain dict of its keys (checked: unknown keys, types,
    values) or None for the defaults. ``embedding_dim`` must equal the tower's feature size.
    ``encoder_parameters``: the tower's parameters that produce the targets (default: all of them), for
    ``target_encoder: auto`` and the frozen-target checks.
    """
    return AutoregressiveReconstructionModule(vision_tower, hidden_size, config, encoder_parameters)


__all__ = [
    "AutoregressiveConfig",
    "AutoregressiveLossOutput",
    "AutoregressiveReconstructionModule",
    "FramePredictor",
    "PreparedFrames",
    "create_autoregressive_reconstruction_module",
]
