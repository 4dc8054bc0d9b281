"""Typed config of the autoregressive reconstruction module (the YAML ``autoregressive_config`` block).

Holds every key of the user's three parameter tables (autoregressive reconstruction, fast/slow frames,
LLaVA-NeXT multi-scale) with the documented defaults, plus the keys the design needs (target encoder,
dropout, MLP ratio, window selection, vision feature layer/strategy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Mapping, get_type_hints

from lmms_engine.models.layout import LAYOUT_FIELDS
from lmms_engine.utils.config import ConfigError, coerce, from_mapping
from lmms_engine.video.pooling import POOL_MODES, check_pool_args

TargetEncoderMode = Literal["auto", "shared", "copy"]
WindowMode = Literal["sliding", "all", "random"]
FeatureSelectStrategy = Literal["default", "full"]



@dataclass
class AutoregressiveConfig:
    """Config of :class:`~lmms_engine.models.autoregressive_reconstruction.AutoregressiveReconstructionModule`.

    Autoregressive reconstruction:
        embedding_dim: width of the target embeddings; must equal the vision tower's feature size
            (1152 for SigLIP-so400m).
        num_hist: history frames per window; a window holds ``num_hist + 1`` frames.
        loss_weight: the returned loss is ``loss_weight * mse`` (0 = ablation baseline).
        num_heads, num_layers: predictor transformer size.
        use_frame_causal_mask: block lower-triangular attention over frames; every window position is
            supervised. Off: full attention inside the window, only the last position is supervised.

    Fast/slow frames (``use_fast_slow_frames``): a fast stream of ``num_fast`` frames ``fast_stride``
    apart and a slow stream of ``num_slow`` frames ``slow_stride`` apart, both starting at frame 0 of
    the frames the LLM saw; the loss is the mean of the two streams' losses.

    LLaVA-NeXT multi-scale: ``mm_spatial_pool_stride`` / ``mm_spatial_pool_mode`` pool the targets
    when ``enable_multiscale_pooling`` is set and no video-token layout is given; with
    ``enable_multiscale_pooling`` these keys and ``add_faster_video`` also set the model's layout
    (``layout_overrides``). A layout given at loss time always wins.

    Design keys:
        target_encoder: ``shared`` (reuse the model's frozen tower and its features), ``copy`` (a
            frozen snapshot of the tower, for a tower that trains), ``auto`` (shared when every tower
            parameter is frozen at creation, else copy).
        dropout: attention/residual dropout of the predictor. mlp_ratio: MLP width / embedding_dim.
        window: ``sliding`` (default) runs the predictor once over each video, every frame ``t >= 1``
            predicted from frames ``max(0, t - num_hist) .. t - 1`` through a banded frame-causal mask
            (every frame supervised once; needs ``use_frame_causal_mask``); ``all`` trains on every
            window of ``num_hist + 1`` frames (unfold), ``random`` on one random window per sample.
        vision_feature_layer, vision_feature_select_strategy: where targets are read from the tower
            (``hidden_states[vision_feature_layer]``, a list of layers concatenated as the model reads
            them; ``default`` drops the first token, ``full`` keeps all); the model sets them from its
            own config.
    """

    embedding_dim: int = 1152
    num_hist: int = 3
    loss_weight: float = 0.1
    num_heads: int = 8
    num_layers: int = 3
    use_frame_causal_mask: bool = True
    use_fast_slow_frames: bool = False
    fast_stride: int = 1
    slow_stride: int = 4
    num_fast: int = 8
    num_slow: int = 8
    enable_multiscale_pooling: bool = False
    mm_spatial_pool_stride: int = 2
    mm_spatial_pool_mode: str = "average"
    add_faster_video: bool = False
    target_encoder: TargetEncoderMode = "auto"
    dropout: float = 0.0
    mlp_ratio: float = 4.0
    window: WindowMode = "sliding"
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: FeatureSelectStrategy = "full"

    def __post_init__(self) -> None:
        _check_field_types(self)
        positive = ("embedding_dim", "num_hist", "num_heads", "num_layers", "fast_stride", "slow_stride")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_fast", "num_slow"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (one frame has no next frame to predict), "
                                 f"got {getattr(self, name)}")
        if self.embedding_dim % self.num_heads:
            raise ValueError(f"embedding_dim ({self.embedding_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if not math.isfinite(self.loss_weight) or self.loss_weight < 0:
            raise ValueError(f"loss_weight must be a finite number >= 0, got {self.loss_weight}")
        if self.window == "sliding" and not self.use_frame_causal_mask:
            raise ValueError("window: sliding (the default) predicts every frame in one pass, which needs "
                             "use_frame_causal_mask: true (without the mask a position would see the frame it "
                             "predicts); set window: all or random to train with full attention inside windows")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        try:
            check_pool_args(self.mm_spatial_pool_stride, self.mm_spatial_pool_mode)
        except ValueError as err:
            key = "mm_spatial_pool_mode" if self.mm_spatial_pool_mode not in POOL_MODES else "mm_spatial_pool_stride"
            raise ValueError(f"{key}: {err}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "autoregressive_config") -> "AutoregressiveConfig":
        """Build from a plain dict (YAML/JSON). Unknown key, wrong type or impossible value ->
        :class:`~lmms_engine.utils.config.ConfigError` (a ``ValueError``) naming ``where`` and the key."""
        return from_mapping(cls, data, where)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_against_tower(self, width: int, where: str = "autoregressive_config", tower: str = "") -> None:
        """The one check of ``embedding_dim`` against the vision tower's feature size ``width`` (the
        targets are the tower's features), for the launcher's config check and the module alike.

        ``tower`` describes the tower in the message (``"of the tiny model"``). Raises
        :class:`~lmms_engine.utils.config.ConfigError` naming ``where.embedding_dim``, both numbers and the fix.
        """
        if self.embedding_dim != width:
            raise ConfigError(
                f"{where}.embedding_dim={self.embedding_dim} differs from the vision tower's feature size {width}"
                f"{' ' + tower if tower else ''}: the targets are the tower's features; set embedding_dim: {width} "
                f"or remove the key (it defaults to the tower's width)"
            )

    def layout_overrides(self) -> dict:
        """Layout keys this block sets for the model: ``mm_spatial_pool_stride``,
        ``mm_spatial_pool_mode``, ``add_faster_video`` when ``enable_multiscale_pooling``, else ``{}``."""
        if not self.enable_multiscale_pooling:
            return {}
        return {key: getattr(self, key) for key in LAYOUT_KEYS}


#: The video-layout keys this block may also hold (LLaVA-NeXT's names; owned by the model's layout, see
#: ``layout_overrides``): the fields it shares with :class:`~lmms_engine.models.layout.VideoLayoutConfig`.
LAYOUT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(AutoregressiveConfig) if f.name in LAYOUT_FIELDS)


#: Keys the models add to the HF config (``config.json``): whether the module exists, and its resolved
#: config (``target_encoder`` always ``shared`` or ``copy``), so a checkpoint rebuilds the same module.
CONFIG_AR_ENABLE_KEY = "enable_autoregressive"
CONFIG_AR_KEY = "autoregressive_config"


def restore_autoregressive_module(model: Any, config: Any, freeze_tower: Callable[[], None]) -> None:
    """In a model's ``__init__``: rebuild the autoregressive module ``config`` (an HF config) records, via
    ``model.attach_autoregressive_module``, or record that there is none. A ``shared`` target encoder is
    only valid over a frozen tower (targets must stay fixed), so ``freeze_tower()`` runs first then."""
    if getattr(config, CONFIG_AR_ENABLE_KEY, False):
        stored = dict(getattr(config, CONFIG_AR_KEY, None) or {})
        if stored.get("target_encoder") == "shared":
            freeze_tower()
        model.attach_autoregressive_module(stored)
    else:
        setattr(config, CONFIG_AR_ENABLE_KEY, False)
        setattr(config, CONFIG_AR_KEY, None)


def _check_field_types(config: AutoregressiveConfig) -> None:
    """Type-check direct construction too (``from_dict`` already checks dict input), with the rules
    ``from_mapping`` applies (:func:`~lmms_engine.utils.config.coerce`)."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        setattr(config, f.name, coerce(getattr(config, f.name), hints[f.name], f.name))


__all__ = ["AutoregressiveConfig", "CONFIG_AR_ENABLE_KEY", "CONFIG_AR_KEY", "ConfigError", "LAYOUT_KEYS", "TargetEncoderMode", "WindowMode",
           "restore_autoregressive_module"]
