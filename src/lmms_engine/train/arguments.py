"""``TrainingArguments``: transformers' own, with per-module learning rates and one change for machines
without an accelerator.

Added fields: ``vision_tower_lr``, ``projector_lr``, ``language_model_lr``, ``autoregressive_lr`` (each a
part's learning rate; None = ``learning_rate``; ``lmms_engine.train.param_groups``).

On a machine with no accelerator at all (no CUDA, XPU, MPS, NPU, HPU, ... device), transformers 5:

- refuses ``bf16=True`` unless ``use_cpu=True`` is also given ("Your setup doesn't support bf16/gpu"),
  while the user's guide sets ``bf16=True``;
- under ``torchrun`` initialises the process group but stays in ``ParallelMode.NOT_PARALLEL`` unless
  ``use_cpu=True`` (every rank then trains alone and they overwrite each other's checkpoints).

So there ``use_cpu`` is set to True (multi-process runs use gloo; bf16 becomes bfloat16 autocast on the
CPU, with a warning) and ``dataloader_pin_memory`` is turned off (pinning needs an accelerator). A
machine with a GPU that lacks bf16 still gets transformers' error: falling back to the CPU there would
hide a real problem.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import transformers

from lmms_engine.utils.config import ConfigError

logger = logging.getLogger(__name__)

_ACCELERATOR_PROBES: tuple[str, ...] = (
    "is_torch_cuda_available",
    "is_torch_xpu_available",
    "is_torch_mps_available",
    "is_torch_npu_available",
    "is_torch_hpu_available",
    "is_torch_mlu_available",
    "is_torch_musa_available",
    "is_torch_xla_available",
)


def has_accelerator() -> bool:
    """Whether torch sees any accelerator transformers can train on (CUDA, XPU, MPS, NPU, HPU, ...)."""
    from transformers import utils

    return any(getattr(utils, probe, lambda: False)() for probe in _ACCELERATOR_PROBES)


def _part_lr(part: str, example: str) -> float | None:
    return field(default=None, metadata={"help": (
        f"Learning rate of the {part} (null = learning_rate); the scheduler scales it like every other group. "
        f"{example}")})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' ``TrainingArguments`` (every field, default and check is theirs), plus per-part
    learning rates (module docstring).

    Difference, only on a machine without any accelerator (module docstring): ``use_cpu`` is set to
    True and ``dataloader_pin_memory`` to False.
    """

    vision_tower_lr: float | None = _part_lr("vision tower (SigLIP; Qwen's ViT without its merger)",
                                             "LLaVA-NeXT's mm_vision_tower_lr, often learning_rate / 5 to / 10.")
    projector_lr: float | None = _part_lr("projector (with image_newline and faster_token; Qwen's merger)",
                                          "LLaVA-NeXT's mm_projector_lr.")
    language_model_lr: float | None = _part_lr("language model and lm_head", "")
    autoregressive_lr: float | None = _part_lr("autoregressive predictor", "A new module often takes a larger one.")

    def __post_init__(self) -> None:
        if self.use_cpu or not has_accelerator():
            if (self.bf16 or self.bf16_full_eval) and not self.use_cpu:
                logger.warning("bf16=True but no GPU is available: training on the CPU with bfloat16 autocast, "
                               "which CPUs run slowly (the guide's TrainingArguments example took 19 s per step "
                               "in bf16 against 0.9 s in float32 here); set bf16=False on a CPU")
            self.use_cpu = True
            self.dataloader_pin_memory = False
        super().__post_init__()


def check_fsdp(args: Any, where: str = "fsdp") -> None:
    """The one check that requested FSDP (``args.fsdp``) can run, for the launcher's config check and the
    trainer alike: accelerate enables FSDP only for accelerator backends, so CPU processes would silently
    train plain DDP instead (or, in one process, fail in transformers with a less telling message).
    Raises :class:`~lmms_engine.utils.config.ConfigError` naming ``where``."""
    if args.fsdp and not has_accelerator():
        raise ConfigError(f"{where}: FSDP through the Trainer needs GPUs (or another accelerator; accelerate does not "
                          f"enable it for CPU processes, which would silently train with DDP); remove fsdp/fsdp_config "
                          f"to train with DDP")


def check_liger_kernel(args: Any, where: str = "use_liger_kernel") -> None:
    """The one check that requested Liger kernels (``args.use_liger_kernel``) can run, for the launcher's
    config check and the trainer alike: they are Triton GPU kernels, which fail at the first step on CPU
    processes (or, without liger-kernel installed, in transformers with an install hint that would not help).
    Raises :class:`~lmms_engine.utils.config.ConfigError` naming ``where``."""
    if args.use_liger_kernel and not has_accelerator():
        raise ConfigError(f"{where}: Liger kernels are Triton GPU kernels; on this machine (no GPU) they would fail "
                          f"at the first step: remove use_liger_kernel or set it to false")


def limit_cpu_threads(args: Any) -> int | None:
    """On a CPU run with ``OMP_NUM_THREADS`` unset, use one intra-op thread per process; return it.

    Small models gain nothing from more, and OpenMP threads that spin-wait slow down many times when
    the cores are shared (with DataLoader workers, other ranks or other jobs): measured 0.07 s per
    step of the tiny model with 1 thread against 0.4-2 s with 2 threads on a busy 2-core machine.
    """
    import torch

    if args.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    torch.set_num_threads(1)
    return 1


__all__ = ["TrainingArguments", "check_fsdp", "check_liger_kernel", "has_accelerator", "limit_cpu_threads"]
