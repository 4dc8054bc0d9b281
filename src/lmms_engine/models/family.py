"""What every model family of the engine does alike around transformers' loading and saving.

:class:`VideoFamilyMixin` comes first in the bases of each family's model class
(:class:`~lmms_engine.models.llava_video.LlavaVideoForConditionalGeneration`, and the Qwen-VL classes
through :class:`~lmms_engine.models.qwen_vl_common.QwenVideoMixin`), before transformers' own class:

- ``__init__`` ends with :meth:`_restore_trained_modules`: the autoregressive module and the LoRA adapters
  that ``config.json`` records are created before a checkpoint's weights load into them;
- ``from_pretrained`` freezes again what loading unfroze (:meth:`_refreeze`);
- ``save_pretrained`` writes the names of ``state_dict()`` and, with LoRA, ``adapter_model.safetensors``;
- the Trainer passes no ``num_items_in_batch`` (``accepts_loss_kwargs``), and the predictor and the LoRA
  adapters keep float32 weights in a half-precision model (``_keep_in_fp32_modules_strict``).

A family supplies :meth:`_freeze_vision_tower` and, where it has some, :meth:`_unused_vision_parameters`.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from lmms_engine.models.autoregressive_config import restore_autoregressive_module
from lmms_engine.models.lora import (CONFIG_LORA_KEY, FP32_ADAPTER_PATTERNS, freeze_for_lora, inject_lora,
                                     save_trained_tensors)


class VideoFamilyMixin:
    """Loading, saving and freezing rules shared by the engine's model families (module docstring)."""

    #: transformers' Trainer passes no ``num_items_in_batch``: the loss terms are raw sums and counts.
    accepts_loss_kwargs = False
    #: The autoregressive predictor and the LoRA adapters keep float32 weights in a half-precision model:
    #: they are created in float32 beside a bf16/fp16 model, so a reload must not round them (transformers'
    #: load-time rule).
    _keep_in_fp32_modules_strict = ["autoregressive_module.predictor", *FP32_ADAPTER_PATTERNS]

    def _freeze_vision_tower(self) -> None:
        """Freeze the vision tower (a ``shared`` target encoder must stay fixed)."""
        raise NotImplementedError

    def _unused_vision_parameters(self) -> Iterator[nn.Parameter]:
        """Tower parameters the LLM never reads (always frozen; DDP rejects parameters without a gradient)."""
        return iter(())

    def _restore_trained_modules(self) -> None:
        """End of ``__init__``: the autoregressive module and LoRA adapters ``config`` records, so a
        checkpoint's weights (and the Trainer's resume) find them."""
        restore_autoregressive_module(self, self.config, self._freeze_vision_tower)
        if getattr(self.config, CONFIG_LORA_KEY, None):
            inject_lora(self, getattr(self.config, CONFIG_LORA_KEY))

    @classmethod
    def _prepare_load(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Adjust ``from_pretrained``'s keyword arguments in place before loading (default: nothing)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, then the frozen parts frozen again.

        Loading materialises fresh parameters (``requires_grad=True``), which would unfreeze what
        ``__init__`` froze: the tower's unused parameters, a copy-mode target encoder, a tower shared as
        target encoder, the LoRA-frozen language model.
        """
        cls._prepare_load(args, kwargs)
        loaded = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._refreeze()
        return loaded

    def save_pretrained(self, save_directory: Any, *args: Any, save_original_format: bool = False,
                        **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``, writing parameter names exactly as in ``state_dict()``.

        transformers 5 by default renames keys back to a family's legacy layout on save; the Trainer's
        ``resume_from_checkpoint`` then loads the file with a plain ``load_state_dict`` and matches no
        key. The native names load everywhere (transformers' own loader reads both forms). With LoRA the
        trained tensors are also written on their own (:func:`~lmms_engine.models.lora.save_trained_tensors`).
        """
        result = super().save_pretrained(  # type: ignore[misc]
            save_directory, *args, save_original_format=save_original_format, **kwargs)
        if getattr(self.config, CONFIG_LORA_KEY, None) and kwargs.get("is_main_process", True):
            save_trained_tensors(self, save_directory)
        return result

    def _refreeze(self) -> None:
        if getattr(self.config, CONFIG_LORA_KEY, None):
            freeze_for_lora(self)
        for param in self._unused_vision_parameters():
            param.requires_grad_(False)
        module = getattr(self, "autoregressive_module", None)
        if module is None:
            return
        if module.target_encoder is not None:
            module.target_encoder.requires_grad_(False)
        if module.target_encoder_mode == "shared":
            self._freeze_vision_tower()


__all__ = ["VideoFamilyMixin"]
