"""Images for LLaVA-OneVision: decoding, anyres tiling and token counts, as transformers does them.

Pixels come from transformers' own PIL image processor (``LlavaOnevisionImageProcessorPil``: no
torchvision), built with the model's image size, grid pinpoints and the engine's mean/std:

- a record with **one** image is tiled ("anyres"): the best grid pinpoint for the image's size
  (``select_best_resolution``), the image resized into it and cut into ``image_size`` tiles, plus the
  whole image resized as the base tile: ``pixel_values [1 + tiles, 3, S, S]``;
- a record with **several** images: each is padded to a square (with the mean colour) and resized, one
  tile each (``[1, 3, S, S]``), as transformers' processor does for multi-image prompts.

Tokens per image (:func:`image_token_count`): the base tile's ``side**2`` features plus, when tiled, the
tiles' grid of features with the padding cropped away (``unpad``), downsampled when it exceeds
``anyres_max_N`` tiles' worth by more than 10%, with one newline token per row; untiled: ``side**2 + 1``
(the newline). ``vision_feature_select_strategy: default`` drops one. These are the counts
transformers' LLaVA-OneVision processor writes and its ``pack_image_features`` produces (tested).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import torch


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the cause."""


def load_image(path: str) -> Any:
    """The image at ``path`` as an RGB ``PIL.Image`` (fully decoded, so truncated files fail here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return height, width


def _features_of_tiles(height: int, width: int, side: int, scale_h: int, scale_w: int, max_tiles: int) -> int:
    """Unpadded tile features plus one newline per row (transformers' ``_get_unpadded_features``)."""
    current_h, current_w = side * scale_h, side * scale_w
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        current_h -= 2 * ((current_h - new_h) // 2)
    else:
        new_w = int(round(width * (current_h / height), 7))
        current_w -= 2 * ((current_w - new_w) // 2)
    features, newlines = current_h * current_w, current_h
    ratio = math.sqrt(current_h * current_w / (max_tiles * side ** 2))
    if ratio > 1.1:
        features = int(current_h // ratio) * int(current_w // ratio)
        newlines = int(current_h // ratio)
    return features + newlines


def _tile_grid(height: int, width: int, image_size: int, grid_pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(rows, columns) of ``image_size`` tiles of the best grid pinpoint for a ``height x width`` image."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([height, width], [list(p) for p in grid_pinpoints])
    return best_h // image_size, best_w // image_size


def image_tile_count(height: int, width: int, *, tiled: bool, image_size: int,
                     grid_pinpoints: Sequence[Sequence[int]]) -> int:
    """Tiles the vision tower runs on for a ``height x width`` image: the base tile plus, when tiled (the
    only image of its sample), the best pinpoint's grid of tiles (module docstring)."""
    if not tiled:
        return 1
    rows, cols = _tile_grid(height, width, image_size, grid_pinpoints)
    return 1 + rows * cols


def image_token_count(height: int, width: int, *, tiled: bool, image_size: int, patch_size: int,
                      grid_pinpoints: Sequence[Sequence[int]], vision_aspect_ratio: str = "anyres_max_9",
                      select_strategy: str = "full") -> int:
    """``<image>`` tokens of a ``height x width`` image (module docstring)."""
    side = image_size // patch_size
    if tiled:
        rows, cols = _tile_grid(height, width, image_size, grid_pinpoints)
        max_tiles = int(vision_aspect_ratio.removeprefix("anyres_max_"))
        count = side * side + _features_of_tiles(height, width, side, rows, cols, max_tiles)
    else:
        count = side * side + 1
    return count - 1 if select_strategy == "default" else count


@lru_cache(maxsize=8)
def _processor(image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
               pinpoints: tuple[tuple[int, int], ...]) -> Any:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                                           image_std=list(std), image_grid_pinpoints=[list(p) for p in pinpoints])


def images_to_pixel_values(images: Sequence[Any], *, image_size: int, mean: Sequence[float], std: Sequence[float],
                           grid_pinpoints: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """One record's RGB images -> per image ``(pixel_values [tiles, 3, S, S] float32, (height, width))``.

    One image is tiled (anyres), several are one padded tile each (module docstring).
    """
    processor = _processor(image_size, tuple(mean), tuple(std), tuple(tuple(int(v) for v in p) for p in grid_pinpoints))
    batch = [list(images)] if len(images) > 1 else list(images)
    out = processor(batch, return_tensors="pt")
    pixels, sizes = out["pixel_values"], out["image_sizes"]
    result = []
    for k in range(len(images)):
        tiles = pixels[k] if len(images) == 1 else pixels[k, :1]
        result.append((tiles.float().contiguous(), (int(sizes[k][0]), int(sizes[k][1]))))
    return result


__all__ = ["ImageReadError", "image_size", "image_tile_count", "image_token_count", "images_to_pixel_values", "load_image"]
