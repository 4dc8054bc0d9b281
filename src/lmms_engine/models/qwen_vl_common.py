"""What the Qwen-VL families (Qwen2.5-VL, Qwen3-VL, and Qwen2-VL) share: video features, targets, positions, freezing.

:class:`QwenVideoMixin` is mixed into a subclass of transformers' ``*ForConditionalGeneration`` of each
family (:mod:`lmms_engine.models.qwen2_5_vl`, :mod:`lmms_engine.models.qwen3_vl`): same modules, same
parameter names, so those checkpoints load as they are and what the engine saves loads in plain
transformers (``AutoModelForImageTextToText``); the autoregressive module's weights are extra keys
that plain transformers reports as unexpected and ignores.

The reading of the autoregressive loss for these models (also in docs/design.md):

- one "frame" = one temporal group (``temporal_patch_size`` = 2 video frames, one Conv3d patch depth);
- inputs: the LLM's final hidden states at the group's ``<|video_pad|>`` tokens, in their order
  (raster order of the merged ``h/2 x w/2`` grid);
- targets: the frozen vision encoder's output before the merger (the last block's hidden states,
  :func:`vision_width` wide: 1280 for Qwen2.5-VL and Qwen2-VL, 1152 for Qwen3-VL), averaged over each 2x2
  merge window, so each LLM token has exactly one target. Qwen2.5-VL runs its blocks on
  window-reordered merge units; the targets are put back in raster order first
  (:func:`raster_merge_units`);
- ``target_encoder: shared`` reuses the main forward's vision output (no second vision forward);
  ``copy`` runs a frozen deep copy of the vision encoder on the same patches.

Positions: transformers' own rope-index function (``model.get_rope_index``) on each sample; packed rows
(``position_ids`` restarting at 0 per sample, no attention mask) get it per sample, and the text
positions as the first of four rows so the attention mask stays block-diagonal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import slice_logits_to_keep

from lmms_engine.data.qwen_vision import mm_token_type_ids as token_types
from lmms_engine.models.autoregressive_config import CONFIG_AR_ENABLE_KEY, CONFIG_AR_KEY
from lmms_engine.models.family import VideoFamilyMixin
from lmms_engine.models.loss_terms import LossTerm, LossTerms, label_token_count, token_loss_sum, unit_counts
from lmms_engine.models.vision import vision_width
from lmms_engine.utils.config import ConfigError



@dataclasses.dataclass
class QwenVideoCausalLMOutput(ModelOutput):
    """Outputs of the engine's Qwen-VL models.

    Attributes:
        loss: this batch's objective under its own counts (``loss_terms.objective()``).
        logits: ``[B, L, V]``.
        loss_terms: the raw sums and counts of the loss contract (:mod:`lmms_engine.models.loss_terms`):
            LM token-loss sum and label-token count, per autoregressive stream the squared-error sum and
            supervised-target-token count; the trainer normalises them over the whole step.
        loss_components: detached values of this batch alone (``main_loss``, ``autoregressive_loss``,
            ``total_loss``, ``ar_*``).
        video_token_positions: per video, ``[t, h/2 * w/2]`` flat indices (``row * L + column``) of its
            ``<|video_pad|>`` tokens, one row per temporal group.
        vision_targets: per video, ``[t, h/2 * w/2, D_vision]`` detached targets (pre-merger features
            pooled per merge window), only when the autoregressive module reuses them.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: Any = None
    attentions: Any = None
    loss_terms: LossTerms | None = None
    loss_components: dict[str, torch.Tensor] | None = None
    video_token_positions: list[torch.Tensor] | None = None
    vision_targets: list[torch.Tensor] | None = None


def raster_merge_units(features: torch.Tensor, grid_thw: torch.Tensor, vision_config: Any) -> torch.Tensor:
    """Qwen2.5-VL's pre-merger features (window order) -> raster order of the merge units.

    ``features`` ``[N, D]`` as the vision encoder's ``last_hidden_state``; its blocks ran on merge units
    permuted by ``get_vision_window_index`` (the merger's output is permuted back by transformers; the
    blocks' output is not).
    """
    from transformers.vision_utils import get_vision_window_index

    unit = vision_config.spatial_merge_size ** 2
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=vision_config.spatial_merge_size,
                                              window_size=vision_config.window_size,
                                              patch_size=vision_config.patch_size)
    reverse = torch.argsort(window_index.to(features.device))
    return features.view(-1, unit, features.shape[-1])[reverse].reshape(features.shape)


def merge_window_mean(features: torch.Tensor, merge_size: int) -> torch.Tensor:
    """``[N, D]`` patch features in raster merge-unit order -> ``[N / m^2, D]``, one per LLM token."""
    unit = merge_size ** 2
    return features.view(-1, unit, features.shape[-1]).mean(1)


def packed_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` column spans of its samples (a span starts where positions restart at 0)."""
    spans = []
    for row in position_ids.tolist():
        starts = [c for c, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts = [0] + starts
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def register_weight_renaming(cls: type, parent: type) -> None:
    """Give ``cls`` its transformers parent's checkpoint key renaming (hub Qwen2.5-VL checkpoints store
    ``visual.*`` / ``model.layers.*``); transformers applies renamings to its classes and registered names."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(parent.__name__)
    if mapping is not None and get_checkpoint_conversion_mapping(cls.__name__) is None:
        register_checkpoint_conversion_mapping(cls.__name__, mapping)


def qwen_model_class(model_type: str) -> type:
    """The engine's class for a Qwen-VL ``model_type``."""
    if model_type == "qwen2_5_vl":
        from lmms_engine.models.qwen2_5_vl import Qwen2_5_VLVideoForConditionalGeneration

        return Qwen2_5_VLVideoForConditionalGeneration
    if model_type == "qwen3_vl":
        from lmms_engine.models.qwen3_vl import Qwen3VLVideoForConditionalGeneration

        return Qwen3VLVideoForConditionalGeneration
    if model_type == "qwen2_vl":
        from lmms_engine.models.qwen2_vl import Qwen2VLVideoForConditionalGeneration

        return Qwen2VLVideoForConditionalGeneration
    raise ValueError(f"{model_type!r} is not a Qwen-VL family the engine trains (qwen2_vl, qwen2_5_vl, qwen3_vl)")


def check_qwen_autoregressive_keys(cfg: Mapping[str, Any], family: str, where: str) -> None:
    """``autoregressive_config`` keys without a meaning for Qwen-VL are errors naming the family."""
    for key in ("enable_multiscale_pooling", "add_faster_video"):
        if cfg.get(key):
            raise ConfigError(f"{where}.{key}: the LLaVA-NeXT video-token layout does not apply to {family} "
                              f"(one token per 2x2 merge window); remove it")
    for key, allowed in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "full")):
        if key in cfg and cfg[key] != allowed:
            raise ConfigError(f"{where}.{key}={cfg[key]!r}: {family} targets are the vision encoder's last "
                              f"block output before the merger; remove the key")


def check_qwen_model_config(cfg: Any, family: str, where: str = "model_config") -> None:
    """The ``model_config`` keys that make no sense for a Qwen-VL checkpoint (checked before any weight
    loads): LLaVA-NeXT layout keys, and autoregressive keys tied to that layout."""
    from lmms_engine.models.builder import LAYOUT_FIELDS

    for key in LAYOUT_FIELDS:
        if getattr(cfg, key) is not None:
            raise ConfigError(f"{where}.{key}: the LLaVA-NeXT video-token layout does not apply to "
                              f"model_name_or_path={cfg.model_name_or_path!r} ({family}), which has one token per "
                              f"2x2 merge window of each temporal group; remove the key")
    check_qwen_autoregressive_keys(dict(cfg.autoregressive_config or {}), family, f"{where}.autoregressive_config")


def build_qwen_model(cfg: Any, hf_config: Any, tokenizer: Any = None) -> Any:
    """:func:`~lmms_engine.models.builder.build_model` for a Qwen-VL checkpoint (``cfg`` a ``ModelConfig``).

    LLaVA-NeXT layout keys are a :class:`ConfigError` naming the family; the tokenizer's
    ``<|video_pad|>`` must be the checkpoint's ``video_token_id``. Freezing keys and the autoregressive
    settings mean what they mean for LLaVA-OneVision.
    """
    from lmms_engine.models.builder import _torch_dtype, autoregressive_plan, finish_model

    family = hf_config.model_type
    where = f"model_config.model_name_or_path={cfg.model_name_or_path!r} ({family})"
    check_qwen_model_config(cfg, family)
    if tokenizer is not None:
        token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        if token_id != hf_config.video_token_id:
            raise ConfigError(f"the tokenizer's '<|video_pad|>' id {token_id} differs from {where}'s video_token_id="
                              f"{hf_config.video_token_id}; use the checkpoint's own tokenizer")
    enable, restore, ar_config = autoregressive_plan(cfg, hf_config)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(cfg.torch_dtype, False)}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = qwen_model_class(family).from_pretrained(cfg.model_name_or_path, config=hf_config, **kwargs)
    return finish_model(model, cfg, tokenizer, enable, restore, ar_config)


def is_qwen_model(model: Any) -> bool:
    """Whether ``model`` is one of the engine's Qwen-VL models."""
    return isinstance(model, QwenVideoMixin)


class QwenVideoMixin(VideoFamilyMixin):
    """Video training additions for a Qwen-VL ``*ForConditionalGeneration`` (module docstring).

    Subclasses set :attr:`family`; one whose encoder reorders patches (Qwen2.5-VL's window attention)
    overrides :meth:`_targets_in_raster_order`.
    """

    family: str = ""
    #: whether ``second_per_grid_ts`` is a model input (Qwen2.5-VL)
    uses_second_per_grid: bool = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._restore_trained_modules()

    def _freeze_vision_tower(self) -> None:
        self.vision_tower_parameters_requires_grad(False)

    # ------------------------------------------------------------------ parts
    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder (``model.visual``; its ``merger`` is the projector)."""
        return self.model.visual

    def projector_modules(self) -> list[nn.Module]:
        """The merger (and Qwen3-VL's deepstack mergers): the projector of LLaVA's wording."""
        visual = self.model.visual
        mods = [visual.merger]
        deepstack = getattr(visual, "deepstack_merger_list", None)
        if deepstack is not None:
            mods.append(deepstack)
        return mods

    def vision_tower_parameters(self) -> Iterator[nn.Parameter]:
        """The vision encoder's parameters outside the projector modules."""
        skip = {id(p) for m in self.projector_modules() for p in m.parameters()}
        return (p for p in self.model.visual.parameters() if id(p) not in skip)

    def vision_tower_parameters_requires_grad(self, flag: bool) -> None:
        for param in self.vision_tower_parameters():
            param.requires_grad_(flag)

    def set_trainable(self, *, vision_tower: bool, projector: bool, language_model: bool) -> None:
        """``requires_grad`` per part, with the keys of LLaVA-OneVision: ``vision_tower`` = the vision
        encoder's blocks and patch embedding, ``projector`` = the merger(s), ``language_model`` = the LLM
        and ``lm_head``. The autoregressive predictor always trains; its target encoder never does."""
        module = getattr(self, "autoregressive_module", None)
        if vision_tower and module is not None and module.target_encoder_mode == "shared":
            raise ConfigError("the autoregressive module shares the vision tower as its frozen target encoder "
                              "(target_encoder: shared); a trainable vision tower needs target_encoder: copy")
        self.vision_tower_parameters_requires_grad(vision_tower)
        for mod in self.projector_modules():
            mod.requires_grad_(projector)
        self.model.language_model.requires_grad_(language_model)
        self.lm_head.requires_grad_(language_model)

    def attach_autoregressive_module(self, config: Mapping[str, Any] | Any) -> nn.Module:
        """Create ``self.autoregressive_module`` over the vision encoder (call after freezing:
        ``target_encoder: auto`` reads the encoder's ``requires_grad``). ``embedding_dim`` defaults to the
        vision width; the LLaVA-NeXT layout keys have no meaning for Qwen-VL and are refused."""
        from lmms_engine.models.autoregressive_reconstruction import create_autoregressive_reconstruction_module

        cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        check_qwen_autoregressive_keys(cfg, self.family, "autoregressive_config")
        cfg.setdefault("embedding_dim", vision_width(self.config.vision_config))
        module = create_autoregressive_reconstruction_module(self.model.visual, self.config.text_config.hidden_size,
                                                             cfg, encoder_parameters=self.vision_tower_parameters)
        self.autoregressive_module = module
        stored = module.config.to_dict()
        stored["target_encoder"] = module.target_encoder_mode
        setattr(self.config, CONFIG_AR_ENABLE_KEY, True)
        setattr(self.config, CONFIG_AR_KEY, stored)
        return module

    # ------------------------------------------------------------------ vision
    def _targets_in_raster_order(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The encoder's ``last_hidden_state`` ``[N, D]`` in raster merge-unit order: as it comes for
        encoders with full attention per temporal group (Qwen2-VL, Qwen3-VL)."""
        return features

    def video_targets(self, features: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per video ``[t, h/2 * w/2, D]``: pre-merger features, raster order, mean per merge window."""
        merge = self.config.vision_config.spatial_merge_size
        pooled = merge_window_mean(self._targets_in_raster_order(features, grid_thw), merge)
        sizes = [int(t * h * w) // merge ** 2 for t, h, w in grid_thw.tolist()]
        out = []
        for piece, (t, _, _) in zip(torch.split(pooled, sizes), grid_thw.tolist()):
            out.append(piece.reshape(int(t), -1, piece.shape[-1]))
        return out

    def _copy_targets(self, module: nn.Module, pixel_values_videos: torch.Tensor,
                      video_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        encoder = module.target_encoder
        with torch.no_grad():
            out = encoder(pixel_values_videos.to(next(encoder.parameters()).dtype), grid_thw=video_grid_thw,
                          return_dict=True)
        return [t.detach() for t in self.video_targets(out.last_hidden_state, video_grid_thw)]

    def video_token_positions(self, input_ids: torch.Tensor, video_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per video ``[t, h/2 * w/2]`` flat positions (``row * L + col``) of its ``<|video_pad|>`` tokens.

        The video tokens of the batch, in row-major order, belong to the videos in order (as
        transformers fills them); their count must match ``video_grid_thw``.
        """
        merge = self.config.vision_config.spatial_merge_size
        flat = (input_ids.reshape(-1) == self.config.video_token_id).nonzero().squeeze(1)
        sizes = [int(t * h * w) // merge ** 2 for t, h, w in video_grid_thw.tolist()]
        if flat.numel() != sum(sizes):
            raise ValueError(f"input_ids hold {flat.numel()} video tokens (id {self.config.video_token_id}) but "
                             f"video_grid_thw {video_grid_thw.tolist()} needs {sum(sizes)}")
        return [piece.view(int(t), -1) for piece, (t, _, _) in zip(torch.split(flat, sizes), video_grid_thw.tolist())]

    def _visual_trains(self) -> bool:
        return self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.model.visual.parameters())

    def _touch_visual_parameters(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """A batch without video or image: in training with trainable visual parameters, one blank 2x2-patch frame
        pair goes through the encoder and an exact zero depending on it is added (DDP ranks must reach the
        same parameters in backward)."""
        visual = self.model.visual
        vc = self.config.vision_config
        merge = vc.spatial_merge_size
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        grid = torch.tensor([[1, merge, merge]], device=inputs_embeds.device)
        out = visual(inputs_embeds.new_zeros(merge * merge, patch_dim), grid_thw=grid, return_dict=True)
        zero = out.pooler_output.sum()
        for feature in getattr(out, "deepstack_features", None) or []:
            zero = zero + feature.sum()
        return inputs_embeds + (zero * 0.0).to(inputs_embeds.dtype)

    # ------------------------------------------------------------------ positions
    def rope_positions(self, input_ids: torch.Tensor, mm_types: torch.Tensor, position_ids: torch.Tensor,
                       video_grid_thw: torch.Tensor | None, second_per_grid_ts: torch.Tensor | None,
                       image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows: ``[4, R, L]``, row 0 the given text positions, rows 1-3 M-RoPE from the model's
        ``get_rope_index`` per sample (each sample's span starts where ``position_ids`` restart), with the
        sample's own videos and images (taken in token order from ``video_grid_thw`` / ``image_grid_thw``)."""
        rows, length = input_ids.shape
        out = torch.zeros(3, rows, length, dtype=torch.long, device=input_ids.device)
        merge = self.config.vision_config.spatial_merge_size
        grids = {2: video_grid_thw, 1: image_grid_thw}
        tokens = {kind: [int(t * h * w) // merge ** 2 for t, h, w in (g.tolist() if g is not None else [])]
                  for kind, g in grids.items()}
        seconds = second_per_grid_ts.tolist() if second_per_grid_ts is not None else [1.0] * len(tokens[2])
        taken = {2: 0, 1: 0}
        for r, spans in enumerate(packed_segments(position_ids)):
            for start, end in spans:
                ids = input_ids[r:r + 1, start:end]
                types = mm_types[r:r + 1, start:end]
                kwargs: dict[str, Any] = {}
                for kind, key in ((2, "video_grid_thw"), (1, "image_grid_thw")):
                    count, first = int((types == kind).sum()), taken[kind]
                    while count > 0 and taken[kind] < len(tokens[kind]):
                        count -= tokens[kind][taken[kind]]
                        taken[kind] += 1
                    if count != 0:
                        raise ValueError(f"row {r}, columns {start}-{end}: the {key[:5]} tokens do not match whole "
                                         f"{key[:5]}s of {key}")
                    if taken[kind] > first:
                        kwargs[key] = grids[kind][first:taken[kind]]
                        if kind == 2 and self.uses_second_per_grid:
                            kwargs["second_per_grid_ts"] = torch.tensor(seconds[first:taken[kind]])
                positions, _ = self.model.get_rope_index(ids, mm_token_type_ids=types, **kwargs)
                out[:, r, start:end] = positions[:, 0]
        return torch.cat([position_ids[None].to(out.device), out], dim=0)

    # ------------------------------------------------------------------ forward
    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """transformers' generation computes the prompt's M-RoPE positions from ``mm_token_type_ids``; a caller
        that passes only ``input_ids`` (the collator's batches, the evaluator) gets them derived from the ids,
        as :meth:`forward` derives them, instead of text positions at the image and video tokens."""
        ids = model_kwargs.get("input_ids", inputs_tensor)
        if model_kwargs.get("mm_token_type_ids") is None and ids is not None and ids.dim() == 2 and \
                not ids.is_floating_point():
            model_kwargs["mm_token_type_ids"] = token_types(ids, self.config.video_token_id, self.config.image_token_id)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        video_num_frames: torch.Tensor | None = None,
        video_row: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> QwenVideoCausalLMOutput:
        """Forward on a collated batch (:class:`~lmms_engine.data.qwen_dataset.QwenVideoCollator`).

        Args:
            input_ids: ``[B, L]`` with ``<|video_pad|>`` / ``<|image_pad|>`` runs as transformers' processor
                expands them.
            attention_mask: ``[B, L]`` (left or right padding); None for packed rows.
            labels: ``[B, L]``, -100 = ignored (shifted inside).
            pixel_values: ``[sum h*w, 3*2*p*p]`` patches of every image, in token order; image_grid_thw:
                ``[I, 3]``. Images carry no autoregressive loss.
            pixel_values_videos: ``[sum t*h*w, 3*2*p*p]`` patches of every video, in token order.
            video_grid_thw: ``[V, 3]``. second_per_grid_ts: ``[V]`` (Qwen2.5-VL's temporal position scale).
            mm_token_type_ids: ``[B, L]``; None = derived from ``input_ids`` (2 at ``<|video_pad|>``, 1 at
                ``<|image_pad|>``).
            position_ids: None (the model's rope index, with the attention mask), or ``[R, L]`` text positions
                restarting at 0 per packed sample (M-RoPE then computed per sample), or ready 3-D/4-D ids.
            video_num_frames, video_row: the collator's bookkeeping (temporal groups per sample / video and
                the row of each packed video); not needed by the computation.

        Returns:
            :class:`QwenVideoCausalLMOutput`; nothing is scaled for gradient accumulation or ranks here.
        """
        if "num_items_in_batch" in kwargs:
            raise TypeError("num_items_in_batch is not taken: the forward returns raw loss sums and counts "
                            "(output.loss_terms); normalise them over the step with LossTerms.objective(units)")
        cache = cache if cache is not None else past_key_values
        if use_cache is None and labels is not None:
            use_cache = False
        if input_ids is not None and mm_token_type_ids is None:
            mm_token_type_ids = token_types(input_ids, self.config.video_token_id, self.config.image_token_id)
        has_video = pixel_values_videos is not None
        if has_video and (video_grid_thw is None or input_ids is None):
            raise ValueError("pixel_values_videos need video_grid_thw and input_ids (to find the <|video_pad|> tokens)")
        has_image = pixel_values is not None
        if has_image and (image_grid_thw is None or input_ids is None):
            raise ValueError("pixel_values need image_grid_thw and input_ids (to find the <|image_pad|> tokens)")
        if position_ids is not None and position_ids.dim() == 2 and input_ids is not None and attention_mask is None:
            position_ids = self.rope_positions(input_ids, mm_token_type_ids, position_ids,
                                               video_grid_thw if has_video else None,
                                               second_per_grid_ts if has_video else None,
                                               image_grid_thw if has_image else None)
        module = getattr(self, "autoregressive_module", None)
        encoder_outputs: dict[str, Any] = {}
        targets = None
        if has_video:
            video_out = self.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
            encoder_outputs["video"] = video_out
            if module is not None and labels is not None and module.target_encoder_mode == "shared":
                targets = [t.detach() for t in self.video_targets(video_out.last_hidden_state.detach(), video_grid_thw)]
        if has_image:
            encoder_outputs["image"] = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if not has_video and not has_image and input_ids is not None and inputs_embeds is None and \
                self._visual_trains():
            inputs_embeds = self._touch_visual_parameters(self.get_input_embeddings()(input_ids))
            if position_ids is None:  # what transformers gives text-only rows from input_ids
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        model_kwargs: dict[str, Any] = dict(
            input_ids=input_ids if inputs_embeds is None else None, inputs_embeds=inputs_embeds,
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
            video_grid_thw=video_grid_thw, image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=encoder_outputs or None, **kwargs)
        if self.uses_second_per_grid:
            model_kwargs["second_per_grid_ts"] = second_per_grid_ts
        outputs = self.model(**model_kwargs)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))

        loss = terms = components = positions = None
        if labels is not None:
            positions = self.video_token_positions(input_ids, video_grid_thw) if has_video else []
            terms = self._loss_terms(logits, labels, hidden, positions, targets, pixel_values_videos, video_grid_thw,
                                     module)
            loss = terms.objective()
            components = terms.components()
        return QwenVideoCausalLMOutput(loss=loss, logits=logits, cache=getattr(outputs, "cache", None),
                                       hidden_states=getattr(outputs, "hidden_states", None),
                                       attentions=getattr(outputs, "attentions", None),
                                       loss_terms=terms, loss_components=components,
                                       video_token_positions=positions,
                                       vision_targets=targets)

    def _loss_terms(self, logits: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor,
                    positions: list[torch.Tensor], targets: list[torch.Tensor] | None,
                    pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                    module: nn.Module | None) -> LossTerms:
        """The raw sums and counts of the loss contract (:mod:`lmms_engine.models.loss_terms`)."""
        ar_terms: dict[str, LossTerm] = {}
        if module is not None:
            if targets is None and pixel_values_videos is not None:
                targets = self._copy_targets(module, pixel_values_videos, video_grid_thw)
            ar_terms = self._autoregressive_output(module, hidden, positions, targets or [], video_grid_thw).terms
        return LossTerms(language_model=token_loss_sum(logits, labels), autoregressive=ar_terms,
                         autoregressive_weight=module.loss_weight if module is not None else 0.0)

    def count_loss_units(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Units of the loss terms ``forward`` returns for ``batch``, without running it: label tokens
        after the shift and, with the autoregressive module, supervised target tokens per stream (each
        video: its temporal groups on its own merged grid, from ``video_grid_thw``)."""
        labels = batch["labels"]
        module = getattr(self, "autoregressive_module", None)
        autoregressive: dict[str, int] = {}
        if module is not None:
            autoregressive = {name: 0 for name in module.stream_names()}
            grids = batch.get("video_grid_thw")
            merge = self.config.vision_config.spatial_merge_size
            for t, h, w in (grids.tolist() if grids is not None else []):
                counts = module.supervised_target_counts([int(t)], int(h * w) // merge ** 2)
                for name, count in counts.items():
                    autoregressive[name] += count
        return unit_counts(label_token_count(labels), autoregressive)

    @torch.no_grad()
    def reconstruction_errors(self, batch: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> dict:
        """Per-stream, per-offset next-frame error sums of one collated batch (the evaluate block's
        reconstruction metric, :func:`lmms_engine.eval.reconstruction.next_frame_errors`), each video on
        its own merged grid. ``mean_target_mse`` (a per-grid-position baseline) is not defined across
        videos of different grids and is left out (None)."""
        from lmms_engine.eval.reconstruction import OffsetSums, model_inputs, next_frame_errors

        module = module if module is not None else getattr(self, "autoregressive_module", None)
        if module is None:
            raise ValueError("the model has no autoregressive_module and no module was given")
        pixels, grid = batch.get("pixel_values_videos"), batch.get("video_grid_thw")
        if pixels is None:
            return {}
        store: dict[str, torch.Tensor] = {}
        handle = self.model.language_model.register_forward_hook(
            lambda _m, _a, output: store.__setitem__("hidden", output.last_hidden_state))
        try:
            self(**model_inputs(batch), logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        if module.target_encoder_mode == "shared":
            features = self.model.get_video_features(pixels, grid, return_dict=True).last_hidden_state
            targets = self.video_targets(features, grid)
        else:
            targets = self._copy_targets(module, pixels, grid)
        hidden = store["hidden"]
        flat = hidden.reshape(-1, hidden.shape[-1])
        merge = self.config.vision_config.spatial_merge_size
        causal = bool(module.config.use_frame_causal_mask)
        num_hist = int(module.config.num_hist)
        results: dict[str, dict[int, OffsetSums]] = {}
        for pos, target, (t, h, w) in zip(self.video_token_positions(batch["input_ids"], grid), targets,
                                          grid.tolist()):
            frames = flat[pos.reshape(-1)].view(1, pos.shape[0], pos.shape[1], -1)
            tokens = module.predictor.input_proj(frames.to(module.predictor.input_proj.weight.dtype))
            side = (int(h) // merge, int(w) // merge)
            valid = torch.ones(1, int(t), dtype=torch.bool, device=tokens.device)

            def predict(x: torch.Tensor, side: tuple[int, int] = side) -> torch.Tensor:
                return module.predictor(x, causal=causal, grid=side)

            for name, idx in module.frame_streams(int(t), tokens.device):
                errors = next_frame_errors(predict, tokens[:, idx], target[None, idx].float(), valid[:, idx], num_hist)
                table = results.setdefault(name, {k: OffsetSums() for k in range(1, num_hist + 1)})
                for k, sums in errors.items():
                    sums.target_sum = sums.target_sq_sum = None
                    table[k].add(sums)
        return results

    def _autoregressive_output(self, module: nn.Module, hidden: torch.Tensor, positions: list[torch.Tensor],
                               targets: list[torch.Tensor], video_grid_thw: torch.Tensor | None) -> Any:
        """The module's loss over every video: ``[1, t, h/2*w/2, hidden]`` states at each group's tokens,
        targets ``[1, t, h/2*w/2, D]``, on that video's merged grid."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        merge = self.config.vision_config.spatial_merge_size
        videos = []
        grids = video_grid_thw.tolist() if video_grid_thw is not None else []
        for pos, target, (_, h, w) in zip(positions, targets, grids):
            frames = flat[pos.reshape(-1)].view(1, pos.shape[0], pos.shape[1], -1)
            valid = torch.ones(1, pos.shape[0], dtype=torch.bool, device=hidden.device)
            videos.append((frames, target[None].to(hidden.device), valid, (int(h) // merge, int(w) // merge)))
        return module.compute_grid_loss(videos)


__all__ = [
    "QwenVideoCausalLMOutput",
    "QwenVideoMixin",
    "build_qwen_model",
    "check_qwen_autoregressive_keys",
    "check_qwen_model_config",
    "is_qwen_model",
    "merge_window_mean",
    "packed_segments",
    "qwen_model_class",
    "raster_merge_units",
    "register_weight_renaming",
    "vision_width",
]
