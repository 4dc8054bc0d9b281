"""Video-token layouts of LLaVA-NeXT / LLaVA-Video, and where each frame's tokens land.

One video of ``T`` frames, each a square grid of ``s x s`` vision patches, becomes a run of tokens:

- every frame is spatially pooled (``mm_spatial_pool_mode``, ``mm_spatial_pool_stride``) to ``h x w``;
- ``mm_newline_position`` adds separator ("newline") tokens:
  ``grid``: one after every row -> ``T*h*(w+1)``; ``frame``: one after each frame -> ``T*(h*w+1)``;
  ``one_token``: one after the whole video -> ``T*h*w + 1`` (HF LLaVA-OneVision); ``no_token``: ``T*h*w``;
- ``add_faster_video`` (LLaVA-Video): frames ``0, k, 2k, ...`` (``k = faster_token_stride``) are slow
  frames pooled at the stride; all others are fast frames pooled at twice the stride; a learned
  ``faster_token`` follows every frame (after that frame's newline tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from lmms_engine.video.pooling import POOL_MODES, check_pool_args, pooled_side

NEWLINE_POSITIONS: tuple[str, ...] = ("grid", "frame", "one_token", "no_token")

# Roles of the tokens of a video run (``VideoTokenTemplate.role``).
ROLE_PATCH = 0
ROLE_NEWLINE = 1
ROLE_FASTER = 2


@dataclass(frozen=True)
class VideoLayoutConfig:
    """How a video becomes tokens. The defaults are HF LLaVA-OneVision's own layout."""

    mm_spatial_pool_stride: int = 2
    mm_spatial_pool_mode: str = "bilinear"
    mm_newline_position: str = "one_token"
    add_faster_video: bool = False
    faster_token_stride: int = 10

    def __post_init__(self) -> None:
        check_pool_args(self.mm_spatial_pool_stride, self.mm_spatial_pool_mode)
        if self.mm_newline_position not in NEWLINE_POSITIONS:
            raise ValueError(
                f"unknown mm_newline_position {self.mm_newline_position!r}; "
                f"valid: {', '.join(NEWLINE_POSITIONS)}"
            )
        if isinstance(self.faster_token_stride, bool) or not isinstance(self.faster_token_stride, int) \
                or self.faster_token_stride < 1:
            raise ValueError(f"faster_token_stride must be an integer >= 1, got {self.faster_token_stride!r}")

    @property
    def is_hf_native(self) -> bool:
        """True when plain transformers' LlavaOnevisionForConditionalGeneration produces this layout."""
        return (
            self.mm_spatial_pool_stride == 2
            and self.mm_spatial_pool_mode == "bilinear"
            and self.mm_newline_position == "one_token"
            and not self.add_faster_video
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def is_slow_frame(self, frame_index: int) -> bool:
        """Slow frames are pooled at the stride; fast frames (faster video only) at twice it."""
        return not self.add_faster_video or frame_index % self.faster_token_stride == 0

    @property
    def fast_pool_stride(self) -> int:
        """Pool stride of fast frames (faster video): twice ``mm_spatial_pool_stride`` (LLaVA-Video)."""
        return 2 * self.mm_spatial_pool_stride

    def frame_stride(self, frame_index: int) -> int:
        return self.mm_spatial_pool_stride if self.is_slow_frame(frame_index) else self.fast_pool_stride

    def uniform_grid_side(self, patch_side: int) -> int:
        """The one grid every frame can be pooled to: the fast frames' with faster video, else the grid
        of every frame (the autoregressive predictor's grid)."""
        stride = self.fast_pool_stride if self.add_faster_video else self.mm_spatial_pool_stride
        return pooled_side(patch_side, stride, self.mm_spatial_pool_mode)

    def frame_grid_side(self, patch_side: int, frame_index: int) -> int:
        """Pooled grid side of frame ``frame_index`` for a tower with ``patch_side x patch_side`` patches."""
        return pooled_side(patch_side, self.frame_stride(frame_index), self.mm_spatial_pool_mode)

    def frame_token_count(self, patch_side: int, frame_index: int) -> int:
        """Tokens that frame ``frame_index`` contributes (patches, its newlines, its faster token)."""
        side = self.frame_grid_side(patch_side, frame_index)
        count = side * side
        if self.mm_newline_position == "grid":
            count += side
        elif self.mm_newline_position == "frame":
            count += 1
        return count + (1 if self.add_faster_video else 0)

    def video_token_count(self, num_frames: int, patch_side: int) -> int:
        """Number of tokens a ``<video>`` placeholder of ``num_frames`` frames expands to."""
        if num_frames < 1:
            raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
        total = sum(self.frame_token_count(patch_side, t) for t in range(num_frames))
        return total + (1 if self.mm_newline_position == "one_token" else 0)



#: The layout keys (``model_config`` and ``config.json``'s ``video_layout`` take these names).
LAYOUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(VideoLayoutConfig))

@dataclass(frozen=True)
class VideoTokenTemplate:
    """Token-by-token plan of one video run (length ``N = video_token_count``).

    Attributes:
        role: ``[N]`` ROLE_PATCH / ROLE_NEWLINE / ROLE_FASTER.
        frame: ``[N]`` frame index of each token (-1 for the ``one_token`` newline).
        patch: ``[N]`` row-major index inside the frame's pooled grid for patch tokens, else -1.
        grid_sides: pooled grid side of each frame (``T`` ints).
    """

    role: torch.Tensor
    frame: torch.Tensor
    patch: torch.Tensor
    grid_sides: tuple[int, ...] = field(default_factory=tuple)


def build_video_template(num_frames: int, patch_side: int, layout: VideoLayoutConfig) -> VideoTokenTemplate:
    """The order in which a video's tokens are laid out (see the module docstring)."""
    roles: list[int] = []
    frames: list[int] = []
    patches: list[int] = []
    sides: list[int] = []
    for t in range(num_frames):
        side = layout.frame_grid_side(patch_side, t)
        sides.append(side)
        for row in range(side):
            for col in range(side):
                roles.append(ROLE_PATCH)
                frames.append(t)
                patches.append(row * side + col)
            if layout.mm_newline_position == "grid":
                roles.append(ROLE_NEWLINE)
                frames.append(t)
                patches.append(-1)
        if layout.mm_newline_position == "frame":
            roles.append(ROLE_NEWLINE)
            frames.append(t)
            patches.append(-1)
        if layout.add_faster_video:
            roles.append(ROLE_FASTER)
            frames.append(t)
            patches.append(-1)
    if layout.mm_newline_position == "one_token":
        roles.append(ROLE_NEWLINE)
        frames.append(-1)
        patches.append(-1)
    return VideoTokenTemplate(
        role=torch.tensor(roles, dtype=torch.long),
        frame=torch.tensor(frames, dtype=torch.long),
        patch=torch.tensor(patches, dtype=torch.long),
        grid_sides=tuple(sides),
    )


@dataclass
class FrameTokenIndex:
    """Where the patch tokens of each frame sit in a batch of sequences, for frames of one grid.

    Attributes:
        positions: ``[B, T, h*w]`` sequence index of each pooled patch token (row-major), -1 where the
            token is absent: the sample has no video / fewer frames, or the frame is at another scale
            (faster video). Video tokens are never cut (the model rejects a cut video, see
            docs/design.md).
        frame_mask: ``[B, T]`` True where every patch token of that frame is present.
        grid_side: the pooled grid side ``h = w`` of the frames indexed here.
        pool_stride: the spatial pool stride that produced that grid.
    """

    positions: torch.Tensor
    frame_mask: torch.Tensor
    grid_side: int
    pool_stride: int


@dataclass
class VideoTokenLayout:
    """The video-token layout of a batch, as the model returns it.

    ``slow`` indexes the frames pooled at ``mm_spatial_pool_stride`` (all frames without faster
    video); ``fast`` the frames pooled at twice that stride (None without faster video).
    ``separator_mask`` ``[B, L]`` marks newline and faster tokens. ``pool_mode`` is the pool mode.
    """

    slow: FrameTokenIndex
    fast: FrameTokenIndex | None
    separator_mask: torch.Tensor
    pool_mode: str
    num_frames: torch.Tensor  # [B] frames of each sample's video (0 = no video)


__all__ = [
    "NEWLINE_POSITIONS",
    "POOL_MODES",
    "ROLE_FASTER",
    "ROLE_NEWLINE",
    "ROLE_PATCH",
    "FrameTokenIndex",
    "VideoLayoutConfig",
    "VideoTokenLayout",
    "VideoTokenTemplate",
    "build_video_template",
]
