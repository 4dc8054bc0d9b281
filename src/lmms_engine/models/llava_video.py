"""LLaVA-OneVision with the LLaVA-NeXT / LLaVA-Video video-token layouts and the autoregressive loss.

``LlavaVideoForConditionalGeneration`` subclasses transformers' ``LlavaOnevisionForConditionalGeneration``
(same modules, same parameter names), so it loads any LLaVA-OneVision checkpoint in HF format and writes
checkpoints that plain transformers loads. What it adds:

- the video path of :class:`~lmms_engine.models.layout.VideoLayoutConfig` (pool stride and mode,
  newline position, the LLaVA-Video slow/fast interleave with a learned ``faster_token``);
- a per-batch :class:`~lmms_engine.models.layout.VideoTokenLayout` telling where every frame's tokens sit;
- the optional ``autoregressive_module`` whose weighted loss is added to the language-model loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers import AutoConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionCausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from lmms_engine.models.loss_terms import LossTerm, LossTerms, label_token_count, token_loss_sum, unit_counts
from lmms_engine.models.autoregressive_config import CONFIG_AR_ENABLE_KEY, CONFIG_AR_KEY
from lmms_engine.models.family import VideoFamilyMixin
from lmms_engine.models.layout import (
    ROLE_FASTER,
    ROLE_NEWLINE,
    ROLE_PATCH,
    FrameTokenIndex,
    VideoLayoutConfig,
    VideoTokenLayout,
    VideoTokenTemplate,
    build_video_template,
)
from lmms_engine.models.vision import feature_size, patch_grid_side, select_features, vision_width
from lmms_engine.models.llava_video_config import LLAVA_MODEL_TYPES, LLAVA_VIDEO_MODEL_TYPE, LlavaVideoConfig
from lmms_engine.utils.config import ConfigError, from_mapping
from lmms_engine.utils.sharding import gathers_weights
from lmms_engine.video.pooling import pooled_side, spatial_pool

# Keys our model adds to the HF config (config.json); plain transformers keeps them as inert attributes.
CONFIG_LAYOUT_KEY = "video_layout"


def _register_weight_renaming() -> None:
    """Give our class transformers' LLaVA-OneVision key renaming (legacy hub checkpoints such as
    ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` store ``language_model.lm_head.weight`` etc.).
    transformers applies renamings only to its own classes and to names registered like this."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for name in ("LlavaVideoForConditionalGeneration", "lmms_video_llava"):  # class, LlavaVideoConfig's model_type
        if get_checkpoint_conversion_mapping(name) is None:
            register_checkpoint_conversion_mapping(name, get_checkpoint_conversion_mapping("llava_onevision"))


_register_weight_renaming()


@functools.lru_cache(maxsize=512)
def _cached_template(num_frames: int, patch_side: int, layout: VideoLayoutConfig) -> VideoTokenTemplate:
    return build_video_template(num_frames, patch_side, layout)


@dataclasses.dataclass
class LlavaVideoCausalLMOutput(LlavaOnevisionCausalLMOutputWithPast):
    """Outputs of :class:`LlavaVideoForConditionalGeneration`.

    Attributes (beyond the HF causal-LM outputs):
        loss: this batch's objective under its own counts: the token mean of the language-model loss
            plus ``loss_weight`` times the autoregressive term's mean over its supervised target tokens
            (:meth:`~lmms_engine.models.loss_terms.LossTerms.objective`). Training with several
            micro-batches or ranks normalises ``loss_terms`` over the whole step instead (the trainer).
        loss_terms: the raw sums and counts (:class:`~lmms_engine.models.loss_terms.LossTerms`): LM
            token-loss sum and label-token count, and per autoregressive stream the squared-error sum
            and supervised-target-token count.
        loss_components: detached values of this batch alone, from ``loss_terms``: ``main_loss``,
            ``total_loss`` and, with the autoregressive module, ``autoregressive_loss`` (weighted),
            ``ar_mse``, ``ar_copy_last_mse`` and ``ar_fast_loss``/``ar_slow_loss`` when fast/slow is on
            (NaN for a metric without targets in the batch); ``main_loss + autoregressive_loss ==
            total_loss``.
        video_token_layout: where each frame's tokens sit in the sequences (packed rows: one entry per
            video, positions flat in the ``R * L`` tokens; see ``forward``'s ``video_row``).
        vision_features: ``[B, T, P, D_vision]`` (packed rows: ``[V, T, P, D_vision]``) detached tower
            features at ``vision_feature_layer`` (before the projector, unpooled, zeros for absent
            frames); only when the autoregressive module reuses them (shared target encoder), else None.
    """

    loss_terms: LossTerms | None = None
    loss_components: dict[str, torch.Tensor] | None = None
    video_token_layout: VideoTokenLayout | None = None
    vision_features: torch.Tensor | None = None


class LlavaVideoForConditionalGeneration(VideoFamilyMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with configurable video-token layouts and an autoregressive reconstruction loss.

    Video path: every real frame (``t < video_num_frames[b]``; padding frames never reach the tower)
    goes through the vision tower; features at ``config.vision_feature_layer`` are projected, then
    pooled per frame with :func:`~lmms_engine.video.pooling.spatial_pool` at that frame's stride, and
    laid out by :func:`~lmms_engine.models.layout.build_video_template` with ``image_newline`` as the
    newline token and ``faster_token`` (a learned ``[text hidden size]`` vector, only with
    ``add_faster_video``) after each frame. With the default layout (bilinear, stride 2, one_token)
    this is exactly transformers' own LLaVA-OneVision video path.

    Configuration lives in the HF config (and so in ``config.json``): ``video_layout`` (dict of
    :class:`VideoLayoutConfig`), ``enable_autoregressive`` and ``autoregressive_config`` (the module's
    resolved config, ``target_encoder`` always ``shared`` or ``copy``). Build models with
    :func:`lmms_engine.models.builder.build_model`, which also checks these settings against the YAML.

    Checkpoint format: one HF checkpoint. Every learned parameter, including ``faster_token`` and the
    autoregressive module (predictor, and the frozen target encoder in ``copy`` mode), is saved in the
    main safetensors, so ``save_pretrained``/``from_pretrained`` and the Trainer's checkpoint resume
    restore them with no side file. A ``shared`` target encoder is the vision tower itself and is not
    stored twice. With an HF-native layout plain transformers loads the checkpoint as
    ``LlavaOnevisionForConditionalGeneration`` (or ``AutoModelForImageTextToText``), reports
    ``autoregressive_module.*`` as unexpected keys and gives the same logits; with any other layout
    ``config.json`` says ``model_type: lmms_video_llava`` (:class:`LlavaVideoConfig`), which plain
    transformers refuses (Auto classes) or warns about, instead of evaluating a different layout.

    Always frozen: the vision tower's ``post_layernorm`` and ``head`` (the LLM reads hidden states
    before them; DDP rejects parameters that never get a gradient).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        raw_layout = getattr(config, CONFIG_LAYOUT_KEY, None) or {}
        self.video_layout: VideoLayoutConfig = from_mapping(VideoLayoutConfig, raw_layout, "config.video_layout")
        setattr(config, CONFIG_LAYOUT_KEY, self.video_layout.to_dict())
        # config.json's model_type says whether plain transformers may load it (LlavaVideoConfig).
        if not self.video_layout.is_hf_native and type(config) is LlavaOnevisionConfig:
            config.__class__ = LlavaVideoConfig
        elif self.video_layout.is_hf_native and type(config) is LlavaVideoConfig:
            config.__class__ = LlavaOnevisionConfig
        hidden = config.text_config.hidden_size
        if self.video_layout.add_faster_video:
            self.faster_token = nn.Parameter(torch.randn(hidden, dtype=self.dtype) / math.sqrt(hidden))
        else:
            self.register_parameter("faster_token", None)
        for param in self._unused_vision_parameters():
            param.requires_grad_(False)
        self._restore_trained_modules()

    @classmethod
    def _prepare_load(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A folder or hub id loads with either model type (LLAVA_MODEL_TYPES), without transformers'
        "other model type" warning."""
        if kwargs.get("config") is None and args and isinstance(args[0], (str, os.PathLike)):
            hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                          "subfolder") if k in kwargs}
            config = AutoConfig.from_pretrained(args[0], **hub)
            if isinstance(config, LlavaOnevisionConfig):
                kwargs["config"] = config

    def _freeze_vision_tower(self) -> None:
        self.model.vision_tower.requires_grad_(False)

    # ------------------------------------------------------------------ parts
    @property
    def vision_tower(self) -> nn.Module:
        """The vision tower (SigLIP for LLaVA-OneVision), i.e. ``model.model.vision_tower``."""
        return self.model.vision_tower

    @property
    def patch_side(self) -> int:
        """Side of the tower's square patch grid (``image_size // patch_size``)."""
        return patch_grid_side(self.config.vision_config)

    @property
    def vision_feature_size(self) -> int:
        """Width of the tower features the projector reads (``vision_feature_layer``; a list concatenates)."""
        return feature_size(vision_width(self.config.vision_config), self.config.vision_feature_layer)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LlavaVideoForConditionalGeneration) and module.faster_token is not None:
            init.normal_(module.faster_token, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))
        if hasattr(module, "target_std") and hasattr(module, "calibrated"):
            # FramePredictor's output affine, absent from checkpoints written before it existed: identity.
            init.zeros_(module.target_mean)
            init.ones_(module.target_std)
            init.zeros_(module.calibrated)

    def _tokens_per_frame(self) -> int:
        """Tower tokens per frame after ``vision_feature_select_strategy`` (``default`` drops the first)."""
        full = self.patch_side * self.patch_side
        return full - 1 if self.config.vision_feature_select_strategy == "default" else full

    def _unused_vision_parameters(self) -> Iterator[nn.Parameter]:
        tower = self.model.vision_tower
        inner = getattr(tower, "vision_model", tower)
        for name in ("post_layernorm", "head"):
            part = getattr(inner, name, None)
            if isinstance(part, nn.Module):
                yield from part.parameters()

    def set_trainable(self, *, vision_tower: bool, projector: bool, language_model: bool) -> None:
        """Set ``requires_grad`` per part.

        ``projector`` covers the multimodal projector, ``image_newline`` (unless the layout has no
        newline tokens) and ``faster_token``;
        ``language_model`` covers the LLM and ``lm_head``. The autoregressive predictor always trains and
        its target encoder never does (the module's own rule). The tower's unused ``post_layernorm`` and
        ``head`` stay frozen.
        """
        module = getattr(self, "autoregressive_module", None)
        if vision_tower and module is not None and _target_is_shared(module):
            raise ConfigError(
                "the autoregressive module shares the vision tower as its frozen target encoder "
                "(target_encoder: shared); a trainable vision tower needs target_encoder: copy"
            )
        self.model.vision_tower.requires_grad_(vision_tower)
        for param in self._unused_vision_parameters():
            param.requires_grad_(False)
        self.model.multi_modal_projector.requires_grad_(projector)
        # With no_token videos never use image_newline: a trainable one would idle under DDP.
        self.model.image_newline.requires_grad_(projector and self.video_layout.mm_newline_position != "no_token")
        if self.faster_token is not None:
            self.faster_token.requires_grad_(projector)
        self.model.language_model.requires_grad_(language_model)
        self.lm_head.requires_grad_(language_model)

    @torch.no_grad()
    def calibrate_autoregressive_targets(self, pixel_values_videos: torch.Tensor,
                                         video_num_frames: torch.Tensor | None = None) -> int:
        """Calibrate the autoregressive predictor's output to the target features of these videos
        (``[B, T, 3, H, W]``, ``video_num_frames`` ``[B]`` real frames), pooled on the grid the predictor
        sees (the fast grid with ``add_faster_video``); return the frames used. See
        :class:`~lmms_engine.models.autoregressive_reconstruction.FramePredictor`."""
        module = getattr(self, "autoregressive_module", None)
        if module is None:
            raise ValueError("the model has no autoregressive_module to calibrate")
        layout = self.video_layout
        stride = layout.mm_spatial_pool_stride * (2 if layout.add_faster_video else 1)
        b, t = pixel_values_videos.shape[:2]
        used = None
        if video_num_frames is not None:
            used = torch.arange(t, device=pixel_values_videos.device)[None] < video_num_frames.to(
                pixel_values_videos.device)[:, None]
        device = next(module.predictor.parameters()).device
        return module.calibrate_targets(pixel_values_videos.to(device), None if used is None else used.to(device),
                                        pool_stride=stride, pool_mode=layout.mm_spatial_pool_mode)

    def attach_autoregressive_module(self, config: Mapping[str, Any] | Any) -> nn.Module:
        """Create ``self.autoregressive_module`` over this model's vision tower.

        ``config`` is a mapping or an ``AutoregressiveConfig``. ``vision_feature_layer`` and
        ``vision_feature_select_strategy`` are taken from the model config (a different explicit value
        is an error); a missing ``embedding_dim`` becomes the tower's feature size. With
        ``enable_multiscale_pooling`` its pooling keys must equal the model's layout (set the layout
        through :func:`~lmms_engine.models.builder.build_model`). ``target_encoder: auto`` resolves by the
        tower's current ``requires_grad``: call this after freezing. The resolved config is stored in
        ``config.autoregressive_config`` so checkpoints restore the same module.
        """
        from lmms_engine.models.autoregressive_reconstruction import create_autoregressive_reconstruction_module

        cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        where = "autoregressive_config"
        for key in ("vision_feature_layer", "vision_feature_select_strategy"):
            model_value = getattr(self.config, key)
            if key in cfg and cfg[key] != model_value:
                raise ConfigError(
                    f"{where}.{key}={cfg[key]!r} differs from the model's {key}={model_value!r}; the targets "
                    f"are read where the LLM reads its features: remove the key"
                )
            cfg[key] = model_value
        cfg.setdefault("embedding_dim", self.vision_feature_size)
        from lmms_engine.models.builder import resolve_video_layout

        resolve_video_layout(self.video_layout.to_dict(), cfg, where=f"config.{CONFIG_LAYOUT_KEY}", ar_where=where,
                             unused_is_error=False)  # the model's layout is fixed: the block may only agree
        hidden_size = self.config.text_config.hidden_size
        module = create_autoregressive_reconstruction_module(self.vision_tower, hidden_size, cfg)
        self.autoregressive_module = module
        stored = module.config.to_dict()
        stored["target_encoder"] = "shared" if _target_is_shared(module) else "copy"
        setattr(self.config, CONFIG_AR_ENABLE_KEY, True)
        setattr(self.config, CONFIG_AR_KEY, stored)
        return module

    # ------------------------------------------------------------------ video path
    def encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower + feature selection + projector for a stack of frames.

        Args:
            frames: ``[N, 3, H, W]`` normalised pixels.

        Returns:
            ``(features [N, P, D_vision], projected [N, P, D_text])``: tower features at
            ``vision_feature_layer`` (after ``vision_feature_select_strategy``) and their projection.
        """
        tower = self.model.vision_tower
        features = select_features(tower, frames.to(dtype=tower.dtype), self.config.vision_feature_layer,
                                   self.config.vision_feature_select_strategy)
        return features, self.model.multi_modal_projector(features)

    def _videos_of_batch(
        self,
        rows: int,
        pixel_values_videos: torch.Tensor | None,
        video_num_frames: torch.Tensor | None,
        video_row: torch.Tensor | None,
    ) -> tuple[list[int], list[int], int]:
        """(frames of each video, row of each video, T_max), checked against the batch's shapes."""
        if video_row is None:
            owner = list(range(rows))
            what = f"B={rows}"
        else:
            if video_row.dim() != 1:
                raise ValueError(f"video_row must be [V] (the row of each video), got shape {tuple(video_row.shape)}")
            owner = [int(r) for r in video_row.tolist()]
            bad = [r for r in owner if not 0 <= r < rows]
            if bad:
                raise ValueError(f"video_row holds rows {bad} outside [0, {rows}) (input_ids has {rows} rows)")
            what = f"V={len(owner)} (entries of video_row)"
        if pixel_values_videos is None:
            if video_row is not None and owner:
                raise ValueError(f"video_row names {len(owner)} videos but pixel_values_videos is None")
            return [0] * len(owner), owner, 0
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[0] != len(owner):
            raise ValueError(
                f"pixel_values_videos must be [{what}, T, 3, H, W], got {tuple(pixel_values_videos.shape)}"
            )
        max_frames = pixel_values_videos.shape[1]
        if video_num_frames is None:
            return [max_frames] * len(owner), owner, max_frames
        num_frames = [int(n) for n in video_num_frames.tolist()]
        if len(num_frames) != len(owner) or any(not 0 <= n <= max_frames for n in num_frames):
            raise ValueError(
                f"video_num_frames must hold {len(owner)} values in [0, {max_frames}] (frames in "
                f"pixel_values_videos), got {num_frames}"
            )
        return num_frames, owner, max_frames

    def _video_token_runs(self, video_mask: torch.Tensor, num_frames: list[int], owner: list[int],
                          packed: bool) -> list[torch.Tensor]:
        """Column of every ``<video>`` token of each video: a row's video tokens are split among its
        videos in their order. Checks each row's count against its videos' ``video_token_count``."""
        layout_cfg = self.video_layout
        side = self.patch_side
        found = video_mask.sum(dim=1).tolist()
        counts = [layout_cfg.video_token_count(n, side) if n else 0 for n in num_frames]
        per_row: list[list[int]] = [[] for _ in found]
        for v, r in enumerate(owner):
            per_row[r].append(v)
        for r, videos in enumerate(per_row):
            expected = sum(counts[v] for v in videos)
            if found[r] == expected:
                continue
            grid = f"under the layout {layout_cfg.to_dict()} with a {side}x{side} patch grid"
            hint = ("; a video is never cut: truncate whole exchanges (dataset truncation: turns) or drop the "
                    "sample, and expand <video> for the model's layout")
            if not packed:
                n = num_frames[r]
                reason = f"a {n}-frame video {grid}" if n else "no video"
                raise ValueError(
                    f"sample {r} of the batch: expected {expected} video tokens (id {self.config.video_token_id}) "
                    f"for {reason}, found {found[r]} in input_ids{hint}"
                )
            listed = ", ".join(f"video {v} ({num_frames[v]} frames, {counts[v]} tokens)" for v in videos)
            raise ValueError(
                f"row {r} of the packed batch: expected {expected} video tokens (id {self.config.video_token_id}) "
                f"for {listed or 'no video'} {grid}, found {found[r]} in input_ids{hint}"
            )
        runs: list[torch.Tensor] = []
        cursor = [0] * len(found)
        columns = [video_mask[r].nonzero().squeeze(1) for r in range(len(found))] if owner else []
        for v, r in enumerate(owner):
            runs.append(columns[r][cursor[r]:cursor[r] + counts[v]])
            cursor[r] += counts[v]
        return runs

    def _embed_videos(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        pixel_values_videos: torch.Tensor | None,
        video_num_frames: torch.Tensor | None,
        keep_features: bool,
        video_row: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, VideoTokenLayout, torch.Tensor | None]:
        """Scatter the laid-out video tokens into ``inputs_embeds`` ``[R, L, D]``; return the layout and,
        with ``keep_features``, the tower features ``[B, T, P, D_vision]`` (zeros for absent frames).

        In steps: the batch's videos and their ``<video>`` runs (checked against the layout), the layout
        with one token-bank index per ``<video>`` token (:meth:`_lay_out_videos`, no tower needed), the
        real frames through tower and projector (:meth:`encode_frames`), the pooled token bank
        (:meth:`_video_token_bank`), the scatter. Without ``video_row`` video ``b`` belongs to row ``b``
        and the layout indexes ``[B, L]`` by column; with ``video_row`` ``[V]`` (packed rows) it has one
        entry per video and its positions are flat indices ``row * L + column`` into the ``R * L`` tokens.
        """
        rows = input_ids.shape[0]
        device = input_ids.device
        video_mask = input_ids == self.config.video_token_id
        num_frames, owner, max_frames = self._videos_of_batch(rows, pixel_values_videos, video_num_frames, video_row)
        runs = self._video_token_runs(video_mask, num_frames, owner, video_row is not None)
        layout, bank_index = self._lay_out_videos(input_ids.shape, num_frames, owner, max_frames, runs,
                                                  packed=video_row is not None, device=device)
        real = [(b, t) for b in range(len(owner)) for t in range(num_frames[b])]
        if not real:
            features_out = None
            if keep_features:
                features_out = torch.zeros(len(owner), max_frames, self._tokens_per_frame(), self.vision_feature_size,
                                           dtype=inputs_embeds.dtype, device=device)
            return self._touch_visual_parameters(inputs_embeds), layout, features_out
        b_idx = torch.tensor([b for b, _ in real], device=device)
        t_idx = torch.tensor([t for _, t in real], device=device)
        features, projected = self.encode_frames(pixel_values_videos[b_idx, t_idx])
        slow_rows = torch.tensor([self.video_layout.is_slow_frame(t) for _, t in real], device=device)
        bank = self._video_token_bank(projected, slow_rows)
        inputs_embeds = inputs_embeds.masked_scatter(video_mask[..., None],
                                                     bank[bank_index[video_mask]].to(inputs_embeds.dtype))
        features_out = None
        if keep_features:
            features_out = features.new_zeros(len(owner), max_frames, *features.shape[1:])
            features_out[b_idx, t_idx] = features.detach()
        return inputs_embeds, layout, features_out

    def _video_token_bank(self, projected: torch.Tensor, slow_rows: torch.Tensor) -> torch.Tensor:
        """The embeddings every ``<video>`` token is taken from: ``[N_tokens, D]``.

        ``projected`` ``[N, P, D]`` are the real frames' projected features in batch order and
        ``slow_rows`` ``[N]`` marks the slow ones. The bank holds the slow frames pooled at the stride
        (in order), then the fast frames pooled at the fast stride, then ``image_newline`` and
        ``faster_token``; :meth:`_lay_out_videos` indexes it in that order.
        """
        cfg = self.video_layout
        pooled = [spatial_pool(projected[slow_rows], cfg.mm_spatial_pool_stride, cfg.mm_spatial_pool_mode).flatten(0, 1)]
        if cfg.add_faster_video:
            pooled.append(spatial_pool(projected[~slow_rows], cfg.fast_pool_stride, cfg.mm_spatial_pool_mode).flatten(0, 1))
        extras = [self.model.image_newline[None].to(projected.dtype)]
        if self.faster_token is not None:
            extras.append(self.faster_token[None].to(projected.dtype))
        return torch.cat(pooled + extras, dim=0)

    def _lay_out_videos(self, shape: torch.Size, num_frames: list[int], owner: list[int], max_frames: int,
                        runs: list[torch.Tensor], packed: bool, device: torch.device
                        ) -> tuple[VideoTokenLayout, torch.Tensor]:
        """The batch's :class:`VideoTokenLayout` and, per token ``[R, L]``, its index into the token bank
        of :meth:`_video_token_bank` (0 where there is no ``<video>`` token). Needs no features: a
        frame's place in the bank follows from which real frames are slow."""
        cfg = self.video_layout
        side = self.patch_side
        rows, length = shape
        batch = len(owner)
        slow_side = cfg.frame_grid_side(side, 0)
        fast_side = pooled_side(side, cfg.fast_pool_stride, cfg.mm_spatial_pool_mode) if cfg.add_faster_video else 0
        slow_pos = torch.full((batch, max_frames, slow_side * slow_side), -1, dtype=torch.long, device=device)
        fast_pos = (torch.full((batch, max_frames, fast_side * fast_side), -1, dtype=torch.long, device=device)
                    if cfg.add_faster_video else None)
        separator = torch.zeros(rows, length, dtype=torch.bool, device=device)
        present = torch.arange(max_frames, device=device)[None, :] < \
            torch.tensor(num_frames, dtype=torch.long, device=device)[:, None]
        is_slow = torch.tensor([cfg.is_slow_frame(t) for t in range(max_frames)], dtype=torch.bool, device=device)

        # Bank offset of each real frame's first pooled token (slow frames first, then fast ones).
        slow_flags = [cfg.is_slow_frame(t) for b in range(batch) for t in range(num_frames[b])]
        slow_rows = torch.tensor(slow_flags, dtype=torch.bool, device=device)
        slow_count = sum(slow_flags)
        offset = (torch.cumsum(slow_rows.long(), 0) - 1) * slow_side * slow_side
        fast_offset = slow_count * slow_side * slow_side + (torch.cumsum((~slow_rows).long(), 0) - 1) * fast_side ** 2
        offset = torch.where(slow_rows, offset, fast_offset)
        newline_index = slow_count * slow_side * slow_side + (len(slow_flags) - slow_count) * fast_side * fast_side

        bank_index = torch.zeros(rows, length, dtype=torch.long, device=device)
        first_real = 0
        for b in range(batch):
            n = num_frames[b]
            if n == 0:
                continue
            template = _cached_template(n, side, cfg)
            role, frame, patch = template.role.to(device), template.frame.to(device), template.patch.to(device)
            seq, row = runs[b], owner[b]
            is_patch = role == ROLE_PATCH
            index = torch.where(is_patch, offset[first_real + frame.clamp(min=0)] + patch.clamp(min=0),
                                torch.full_like(role, newline_index))
            bank_index[row, seq] = torch.where(role == ROLE_FASTER, newline_index + 1, index)
            pf, pp, ps = frame[is_patch], patch[is_patch], seq[is_patch]
            if packed:
                ps = ps + row * length
            slow_tok = is_slow[pf]
            slow_pos[b, pf[slow_tok], pp[slow_tok]] = ps[slow_tok]
            if fast_pos is not None:
                fast_pos[b, pf[~slow_tok], pp[~slow_tok]] = ps[~slow_tok]
            separator[row, seq[(role == ROLE_NEWLINE) | (role == ROLE_FASTER)]] = True
            first_real += n

        layout = VideoTokenLayout(
            slow=FrameTokenIndex(positions=slow_pos, frame_mask=present & is_slow[None, :], grid_side=slow_side,
                                 pool_stride=cfg.mm_spatial_pool_stride),
            fast=(FrameTokenIndex(positions=fast_pos, frame_mask=present & ~is_slow[None, :], grid_side=fast_side,
                                  pool_stride=cfg.fast_pool_stride) if fast_pos is not None else None),
            separator_mask=separator,
            pool_mode=cfg.mm_spatial_pool_mode,
            num_frames=torch.tensor(num_frames, dtype=torch.long, device=device),
        )
        return layout, bank_index

    def _embed_images(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, pixel_values: torch.Tensor,
                      image_sizes: torch.Tensor | None, batch_num_images: torch.Tensor | None) -> torch.Tensor:
        """LLaVA-OneVision's image path, as transformers runs it: features scattered into the ``<image>`` tokens."""
        image_outputs = self.model.get_image_features(pixel_values, image_sizes, batch_num_images=batch_num_images,
                                                      return_dict=True)
        image_features = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask, _ = self.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                        image_features=image_features)
        return inputs_embeds.masked_scatter(image_mask, image_features)

    def _loss_terms(self, logits: torch.Tensor, labels: torch.Tensor, hidden_states: torch.Tensor,
                    pixel_values_videos: torch.Tensor | None, vision_features: torch.Tensor | None,
                    layout: VideoTokenLayout | None, packed: bool) -> LossTerms:
        """The raw loss terms of the contract: the LM token-loss sum and, with the module, its streams."""
        module = getattr(self, "autoregressive_module", None)
        ar_terms: dict[str, LossTerm] = {}
        if module is not None:
            if layout is None:
                raise ValueError("the autoregressive loss needs input_ids to locate the video tokens")
            ar_terms = self._autoregressive_output(module, hidden_states, pixel_values_videos, vision_features, layout,
                                                   packed=packed).terms
        return LossTerms(language_model=token_loss_sum(logits, labels), autoregressive=ar_terms,
                         autoregressive_weight=module.loss_weight if module is not None else 0.0)

    def _autoregressive_output(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        pixel_values_videos: torch.Tensor | None,
        vision_features: torch.Tensor | None,
        layout: VideoTokenLayout,
        packed: bool = False,
    ) -> Any:
        """The module's loss output; shared mode hands over ``vision_features``, copy mode the pixels.

        ``packed``: the layout indexes videos by flat position in the ``R * L`` tokens (see
        :meth:`_embed_videos`); each video then reads its own span of tokens (:func:`_video_spans`)."""
        shared = _target_is_shared(module)
        if layout.slow.positions.shape[1] == 0 or layout.slow.positions.shape[0] == 0:
            # A batch without video frames: one absent frame per row, so the module returns its zero
            # loss that still reaches the predictor (every DDP rank backpropagates through the same graph).
            batch = hidden_states.shape[0]
            layout = _with_one_absent_frame(layout, batch)
            if shared:
                vision_features = hidden_states.new_zeros(batch, 1, self._tokens_per_frame(),
                                                          self.vision_feature_size)
            else:
                size = self.config.vision_config.image_size
                pixel_values_videos = hidden_states.new_zeros(batch, 1, 3, size, size)
        elif packed:
            hidden_states, layout = _video_spans(hidden_states, layout)
        return module.compute_autoregressive_loss(
            hidden_states,
            video_frames=None if shared else pixel_values_videos,
            target_features=vision_features if shared else None,
            video_token_layout=layout,
            return_output=True,
        )

    def _touch_visual_parameters(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """A batch without video frames: one blank frame goes through the tower and the projector and an
        exact zero that depends on them is added, where other ranks need this rank's vision forward: in
        training with trainable visual parameters (each DDP rank's backward must reach the same
        parameters, or the gradient reduction stalls), and whenever the tower is sharded (FSDP / ZeRO-3
        gather its weights inside the forward, frozen or not, in training and in evaluation)."""
        visual = [p for p in self.model.vision_tower.parameters()] + list(self.model.multi_modal_projector.parameters())
        visual += [self.model.image_newline] + ([self.faster_token] if self.faster_token is not None else [])
        trains = self.training and torch.is_grad_enabled() and any(p.requires_grad for p in visual)
        if not (trains or gathers_weights(self.model.vision_tower)):
            return inputs_embeds
        size = self.config.vision_config.image_size
        _, projected = self.encode_frames(inputs_embeds.new_zeros(1, 3, size, size))
        zero = projected.sum() + self.model.image_newline.sum()
        if self.faster_token is not None:
            zero = zero + self.faster_token.sum()
        return inputs_embeds + (zero * 0.0).to(inputs_embeds.dtype)

    # ------------------------------------------------------------------ loss units
    def count_loss_units(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Units of the loss terms ``forward`` will return for ``batch`` (a collated batch with
        ``labels``), counted without running anything: label tokens after the shift and, with the
        autoregressive module, supervised target tokens per stream (from ``video_num_frames``). Keys as
        :meth:`~lmms_engine.models.loss_terms.LossTerms.counts`; the trainer sums them over a step."""
        labels = batch["labels"]
        module = getattr(self, "autoregressive_module", None)
        autoregressive: dict[str, int] = {}
        if module is not None:
            num_frames, _, _ = self._videos_of_batch(labels.shape[0], batch.get("pixel_values_videos"),
                                                     batch.get("video_num_frames"), batch.get("video_row"))
            side = self.video_layout.uniform_grid_side(self.patch_side)
            autoregressive = module.supervised_target_counts([n for n in num_frames if n], side * side)
        return unit_counts(label_token_count(labels), autoregressive)

    # ------------------------------------------------------------------ forward
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_num_frames: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        video_row: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> LlavaVideoCausalLMOutput:
        """Forward on a collated batch.

        Args:
            input_ids: ``[B, L]``; a video of ``T`` frames is ``video_token_count(T, patch_side)``
                copies of ``config.video_token_id``. Packed rows (``video_row`` given): ``[R, L]``, each
                row several samples, the runs of a row's videos in the order of the videos.
            attention_mask: ``[B, L]`` (1 = token, 0 = padding).
            labels: ``[B, L]``, -100 = ignored; shifted inside (HF causal-LM loss).
            pixel_values_videos: ``[B, T, 3, H, W]`` normalised frames, padding frames anywhere
                past ``video_num_frames``; None when no sample has a video.
            video_num_frames: ``[B]`` real frames per sample (0 = no video); None = all ``T``.
            pixel_values, image_sizes, batch_num_images: LLaVA-OneVision image inputs (``[N, tiles, 3, S, S]``,
                ``[N, 2]``, images per sample ``[B]``), handled as transformers does: the image of a sample
                with exactly one is tiled (anyres), several images are one tile each.
            video_row: ``[V]`` packed batches only: the row of each video. ``pixel_values_videos`` is
                then ``[V, T, 3, H, W]`` and ``video_num_frames`` ``[V]``; pass ``position_ids`` ``[R, L]``
                restarting at 0 for each sample and no ``attention_mask``: transformers then masks
                attention block-diagonally per sample. The returned ``video_token_layout`` has one entry
                per video, positions flat in the ``R * L`` tokens (``row * L + column``), and
                ``separator_mask`` ``[R, L]``; ``vision_features`` are ``[V, T, P, D_vision]``.
                Absent: video ``b`` belongs to row ``b``, at most one per row.
            logits_to_keep, cache, use_cache, position_ids, inputs_embeds: as in transformers.

        Returns:
            :class:`LlavaVideoCausalLMOutput`; with ``labels``, ``loss_terms`` holds the raw sums and counts
            of the loss contract (:mod:`lmms_engine.models.loss_terms`) and ``loss`` their normalisation
            by this batch's own counts. Nothing is scaled for gradient accumulation or ranks here.
        """
        if "num_items_in_batch" in kwargs:
            raise TypeError("num_items_in_batch is not taken: the forward returns raw loss sums and counts "
                            "(output.loss_terms); normalise them over the step with LossTerms.objective(units)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is None and (pixel_values_videos is not None or pixel_values is not None):
            raise ValueError("visual inputs need input_ids to find the <video>/<image> placeholder tokens")
        if use_cache is None and labels is not None:
            use_cache = False  # training: a KV cache is never read
        if video_row is not None:
            use_cache = _check_packed_call(attention_mask, position_ids, cache, use_cache)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        module = getattr(self, "autoregressive_module", None)
        shared_targets = module is not None and labels is not None and _target_is_shared(module)
        layout = None
        vision_features = None
        if input_ids is not None:
            inputs_embeds, layout, vision_features = self._embed_videos(
                input_ids, inputs_embeds, pixel_values_videos, video_num_frames, keep_features=shared_targets,
                video_row=video_row,
            )
        if pixel_values is not None:
            inputs_embeds = self._embed_images(input_ids, inputs_embeds, pixel_values, image_sizes, batch_num_images)

        outputs = self.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = terms = components = None
        if labels is not None:
            terms = self._loss_terms(logits, labels, hidden_states, pixel_values_videos, vision_features, layout,
                                     packed=video_row is not None)
            loss = terms.objective()
            components = terms.components()

        return LlavaVideoCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache if hasattr(outputs, "cache") else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            loss_terms=terms,
            loss_components=components,
            video_token_layout=layout,
            vision_features=vision_features,
        )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs of one generation step, for records with several videos (``video_row``):
        after the prompt, where transformers drops the frames, ``video_row`` goes too; on the prompt, an
        attention mask transformers left out (one unpadded row) is given back as ones, since a generation
        prompt is a padded batch, never packed rows."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if inputs.get("pixel_values_videos") is None:
            inputs.pop("video_row", None)
        elif inputs.get("video_row") is not None and inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs


def _with_one_absent_frame(layout: VideoTokenLayout, batch: int) -> VideoTokenLayout:
    def widen(index: FrameTokenIndex | None) -> FrameTokenIndex | None:
        if index is None:
            return None
        patches = index.positions.shape[2]
        return dataclasses.replace(
            index,
            positions=index.positions.new_full((batch, 1, patches), -1),
            frame_mask=index.frame_mask.new_zeros(batch, 1),
        )

    return dataclasses.replace(layout, slow=widen(layout.slow), fast=widen(layout.fast))


def _check_packed_call(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                       cache: Cache | None, use_cache: bool | None) -> bool:
    """``use_cache`` for packed rows, which transformers masks per sample only from ``position_ids``
    with neither an attention mask nor a cache (a plain causal mask would let samples see each other)."""
    if attention_mask is None and position_ids is None:
        raise ValueError("packed rows (video_row given) need position_ids [R, L] restarting at 0 for each sample "
                         "(the collator's position_ids), or an explicit attention_mask")
    if attention_mask is None and (cache is not None or use_cache):
        raise ValueError("packed rows (video_row given) are masked per sample only without a KV cache: pass "
                         "use_cache=False and no cache")
    return False if use_cache is None else use_cache


def _video_spans(hidden_states: torch.Tensor, layout: VideoTokenLayout) -> tuple[torch.Tensor, VideoTokenLayout]:
    """Packed rows: each video's own tokens ``[V, S, D]`` and the layout re-indexed into them.

    ``hidden_states`` ``[R, L, D]``; the layout's positions are flat indices into the ``R * L`` tokens.
    Video ``v`` gets the span from its first to its last patch token (``S`` = the longest span; shorter
    spans run on into the following tokens, which no position points at). Gathering spans keeps the
    autoregressive gather, and its backward, at the size of the video tokens instead of ``V`` copies
    of the whole batch.
    """
    rows, length, dim = hidden_states.shape
    total = rows * length
    indexes = [layout.slow] + ([layout.fast] if layout.fast is not None else [])
    positions = torch.cat([index.positions.flatten(1) for index in indexes], dim=1)  # [V, N]
    valid = positions >= 0
    start = torch.where(valid, positions, total).amin(1)
    end = torch.where(valid, positions, -1).amax(1)
    has_tokens = valid.any(1)
    start = torch.where(has_tokens, start, 0)
    width = int(torch.where(has_tokens, end - start + 1, 1).max())
    take = (start[:, None] + torch.arange(width, device=start.device)).clamp(max=total - 1)
    spans = hidden_states.reshape(total, dim)[take]

    def shift(index: FrameTokenIndex | None) -> FrameTokenIndex | None:
        if index is None:
            return None
        local = torch.where(index.positions >= 0, index.positions - start[:, None, None], -1)
        return dataclasses.replace(index, positions=local)

    return spans, dataclasses.replace(layout, slow=shift(layout.slow), fast=shift(layout.fast))


def _target_is_shared(module: nn.Module) -> bool:
    """Whether the autoregressive module reuses the model's tower and its features (``shared`` mode)."""
    return module.target_encoder_mode == "shared"


__all__ = ["LLAVA_MODEL_TYPES", "LLAVA_VIDEO_MODEL_TYPE", "LlavaVideoCausalLMOutput", "LlavaVideoConfig",
           "LlavaVideoForConditionalGeneration"]
