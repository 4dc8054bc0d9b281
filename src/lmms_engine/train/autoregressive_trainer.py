"""``AutoregressiveTrainer``: transformers' ``Trainer`` for video LLMs with the autoregressive loss.

Everything the HF Trainer does (DDP / FSDP / DeepSpeed through accelerate, gradient accumulation,
mixed precision, checkpoints and resume, ``report_to``, the progress bar) is inherited unchanged. What
this class adds:

- **Loss components.** The model's forward returns ``.loss`` (the total, what is back-propagated) and
  ``.loss_components`` (detached per-batch means: ``main_loss``, ``autoregressive_loss``,
  ``total_loss``, and ``ar_mse``, ``ar_copy_last_mse``, ``ar_fast_loss``, ``ar_slow_loss`` where the
  module reports them). Every component is logged, averaged over the logging window with the weights
  of the objective (see :mod:`lmms_engine.train.loss_window`), correct under gradient accumulation and
  summed over ranks at logging time. Logged ``total_loss`` equals HF's ``loss``, and
  ``main_loss + autoregressive_loss == total_loss`` per logged step (to float rounding).
- **enable_autoregressive.** ``True`` requires the model to carry ``autoregressive_module``.
  ``False`` trains plain SFT through the same code path: a model built with the module has it removed
  before the optimiser and the DDP wrapper are created (warning logged), so the run has no
  autoregressive parameters, no autoregressive compute, and its checkpoints hold none.
- **FSDP** comes from transformers/accelerate (``fsdp`` / ``fsdp_config``); accelerate enables it only
  on accelerators, so on CPU processes a requested ``fsdp`` is an error instead of a silent DDP run.
- **Atomic checkpoints** (:mod:`lmms_engine.train.checkpointing`): ``checkpoint-N`` appears only once
  complete; ``resume_from_checkpoint`` continues with HF's exact step, LR-schedule, RNG and data-order
  restore.
- **Throughput**: tokens/s per device, samples/s, vision tokens per sample and MFU in every training
  log (:mod:`lmms_engine.train.throughput`).
- **Length-grouped data order** without decoding: ``train_sampling_strategy: group_by_length`` or
  ``batch_rebalance`` use the dataset's lengths estimated from container metadata.
- After training, ``output_dir/loss_curve.png`` and, all along, ``output_dir/train_log.jsonl``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmms_engine.train.callbacks import JsonlLogCallback, LossPlotCallback, NothingLoggedWarningCallback
from lmms_engine.train.checkpointing import (
    load_checkpoint_weights,
    publish_checkpoint,
    remove_stale_staging,
    staging_parent,
)
from lmms_engine.train.loss_window import LossWindow
from lmms_engine.train.throughput import add_throughput_logging

logger = logging.getLogger(__name__)

AR_MODULE_ATTR = "autoregressive_module"
#: Model keyword with the step's number of videos the autoregressive loss supervises (all micro-batches, ranks).
AR_VIDEOS_KWARG = "num_videos_in_batch"
IGNORE_INDEX = -100
#: Components in the order they are logged (any others follow, sorted).
COMPONENT_ORDER: tuple[str, ...] = ("main_loss", "autoregressive_loss", "total_loss", "ar_mse",
                                    "ar_copy_last_mse", "ar_fast_loss", "ar_slow_loss")


def _ordered(values: dict[str, float]) -> dict[str, float]:
    rank = {name: i for i, name in enumerate(COMPONENT_ORDER)}
    return dict(sorted(values.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


class AutoregressiveTrainer(Trainer):
    """transformers' ``Trainer`` that logs the loss components and saves checkpoints atomically.

    Args:
        model, args, and every other positional / keyword argument: as ``transformers.Trainer``. With a
            :class:`~lmms_engine.data.dataset.VideoSFTDataset` as ``train_dataset`` (by keyword), the
            ``data_collator`` and ``processing_class`` default to its collator and its tokenizer with the
            processor files (:func:`lmms_engine.export.build_processing_class`).
        enable_autoregressive: train with the model's autoregressive loss (the model must have
            ``autoregressive_module``); ``False`` removes that module and trains plain SFT.
        plot_loss: draw ``output_dir/loss_curve.png`` at the end of training.
        log_file: name of the JSON-lines log in ``output_dir`` (None: no file).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *trainer_args: Any,
        enable_autoregressive: bool = True,
        plot_loss: bool = True,
        log_file: str | None = "train_log.jsonl",
        **trainer_kwargs: Any,
    ) -> None:
        if not isinstance(enable_autoregressive, bool):
            raise TypeError(f"enable_autoregressive must be True or False, got {enable_autoregressive!r}")
        self.enable_autoregressive = enable_autoregressive
        if model is not None:
            configure_autoregressive(model, enable_autoregressive)
        self._train_window = LossWindow()
        self._eval_window = LossWindow()
        self._staging_run_dir: str | None = None
        self._pending_push = False
        self._eval_prefix: str | None = None
        if not trainer_args:  # everything after args passed by keyword (as the guide does)
            _default_data_arguments(trainer_kwargs, model)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.args.fsdp and not (self.is_fsdp_enabled or self.is_fsdp_xla_enabled):
            # accelerate enables FSDP only for accelerator backends (multi-GPU/XPU/NPU/...); on CPU
            # processes it would silently train plain DDP instead.
            raise ValueError(
                f"fsdp={self.args.fsdp!r} was requested but accelerate did not enable FSDP on "
                f"{self.args.device.type!r} ({self.accelerator.distributed_type}); FSDP through the Trainer "
                "needs GPUs (or another accelerator): remove fsdp/fsdp_config to train with DDP"
            )
        add_throughput_logging(self)
        self.add_callback(NothingLoggedWarningCallback())
        if log_file:
            self.add_callback(JsonlLogCallback(log_file))
        if plot_loss:
            self.add_callback(LossPlotCallback())

    # ------------------------------------------------------------------ data order
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """HF's sampler; for ``group_by_length`` / ``batch_rebalance`` over a dataset that estimates its
        lengths from metadata (``estimated_lengths()``), HF's samplers get those lengths: HF itself would
        load (decode) every sample once to measure it."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        estimate = getattr(dataset, "estimated_lengths", None)
        if strategy not in ("group_by_length", "batch_rebalance") or not callable(estimate):
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

        lengths = list(estimate())
        accumulation = self.args.gradient_accumulation_steps
        if strategy == "group_by_length":
            return LengthGroupedSampler(self.args.train_batch_size * accumulation, lengths=lengths)
        world = max(1, self.args.world_size)
        return BatchRebalanceSampler(
            lengths=lengths, effective_batch_size=self.args.train_batch_size * accumulation * world, dp_size=world,
            grad_accum=accumulation, seed=self.args.seed, rank=self.args.process_index if world > 1 else 0,
            drop_last=self.args.dataloader_drop_last,
        )

    # ------------------------------------------------------------------ loss
    def _label_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Label tokens the loss averages over (shifted labels for causal LMs, as HF counts them)."""
        counted = labels[..., 1:] if self._loss_shifts_labels else labels
        return (counted != IGNORE_INDEX).sum()

    def _micro_batch_share(self, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor | float:
        """This micro-batch's weight in the step's objective; shares of all ranks sum to 1 per step."""
        world = max(self.args.world_size, 1)
        labels = inputs.get("labels")
        if num_items_in_batch is not None and isinstance(labels, torch.Tensor):
            share = self._label_tokens(labels).float() / torch.as_tensor(
                num_items_in_batch, dtype=torch.float32, device=labels.device).clamp(min=1)
            # num_items_in_batch counts every rank's tokens only when averaging across devices.
            if not (self.args.average_tokens_across_devices and world > 1):
                share = share / world
            return share
        return 1.0 / (max(getattr(self, "current_gradient_accumulation_steps", 1), 1) * world)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """HF's micro-batches of one step and their label-token count; with the autoregressive loss, each
        micro-batch also gets the step's number of videos it supervises (all micro-batches and ranks) as
        ``num_videos_in_batch``, so the model averages that term over the step's videos however they are
        split into ranks and micro-batches (weighted by label tokens, a text-only rank would dilute the
        video ranks' term)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        world = max(self.args.world_size, 1)
        if not (self.enable_autoregressive and batch_samples and (world == 1 or self.args.average_tokens_across_devices)
                and all(isinstance(b, dict) and "video_num_frames" in b for b in batch_samples)):
            return batch_samples, num_items_in_batch
        from lmms_engine.models.llava_video import autoregressive_videos

        videos = sum(autoregressive_videos(b["video_num_frames"], b.get("pixel_values_videos")) for b in batch_samples)
        videos = torch.as_tensor(videos, device=device)
        if world > 1:
            videos = self.accelerator.gather(videos).sum()
        videos = int(videos)
        if videos:  # none: the autoregressive term is an exact zero, weighted as the language-model loss
            for batch in batch_samples:
                batch[AR_VIDEOS_KWARG] = videos
        return batch_samples, num_items_in_batch

    def _video_share(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """This micro-batch's share of the step's supervised videos (None without ``num_videos_in_batch``)."""
        total = inputs.get(AR_VIDEOS_KWARG)
        if total is None:
            return None
        from lmms_engine.models.llava_video import autoregressive_videos

        return autoregressive_videos(inputs.get("video_num_frames"), inputs.get("pixel_values_videos")).float() / total

    def _components(self, outputs: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> dict[str, torch.Tensor]:
        """The model's ``loss_components``; for a model without them, its loss as main = total."""
        components = outputs.get("loss_components") if isinstance(outputs, dict) else \
            getattr(outputs, "loss_components", None)
        if components:
            return dict(components)
        raw = outputs.get("loss") if isinstance(outputs, dict) else None
        if raw is None:
            return {}
        raw = raw.detach()
        labels = inputs.get("labels")
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs and isinstance(labels, torch.Tensor):
            # HF's loss is sum / num_items_in_batch; the per-batch mean is sum / local tokens.
            raw = raw * torch.as_tensor(num_items_in_batch, dtype=raw.dtype, device=raw.device) \
                / self._label_tokens(labels).clamp(min=1).to(raw.dtype)
        return {"main_loss": raw, "total_loss": raw}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """HF's loss (``outputs.loss``, the total), plus recording of ``outputs.loss_components``."""
        training = model.training
        if training:
            weight: torch.Tensor | float = self._micro_batch_share(inputs, num_items_in_batch)
        else:
            ids = inputs.get("input_ids")
            weight = float(ids.shape[0]) if isinstance(ids, torch.Tensor) else 1.0  # HF weighs eval by samples
        visible = dict(inputs)  # HF may pop labels (label smoothing); keep them for the share above
        loss, outputs = super().compute_loss(model, visible, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        components = self._components(outputs, inputs, num_items_in_batch)
        if components and training and "autoregressive_loss" in components:
            # Each term weighted by its own share of the step: logged total_loss is main + autoregressive.
            video_share = self._video_share(inputs)
            autoregressive = {k: v for k, v in components.items() if k == "autoregressive_loss" or k.startswith("ar_")}
            self._train_window.add(autoregressive, weight if video_share is None else video_share)
            self._train_window.add({k: v for k, v in components.items()
                                    if k not in autoregressive and k != "total_loss"}, weight)
        elif components:
            (self._train_window if training else self._eval_window).add(components, weight)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged loss components to HF's training (``loss``) and evaluation logs.

        Called by HF on every rank for these logs, so the cross-rank reduction is safe here.
        """
        if "loss" in logs:
            averaged = self._train_window.reduce(self.args.device)
            if "total_loss" not in averaged and "main_loss" in averaged:
                averaged["total_loss"] = averaged["main_loss"] + averaged.get("autoregressive_loss", 0.0)
            logs.update(_ordered(averaged))
        elif self._eval_prefix is not None and f"{self._eval_prefix}_loss" in logs:
            averaged = _ordered(self._eval_window.reduce(self.args.device))
            logs.update({f"{self._eval_prefix}_{k}": v for k, v in averaged.items()})
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """HF's ``evaluate``; its log also holds ``<prefix>_main_loss`` etc., averaged over samples."""
        if isinstance(eval_dataset, dict) or (eval_dataset is None and isinstance(self.eval_dataset, dict)):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # recurses per dataset
        self._eval_window.reset()
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = None

    # ------------------------------------------------------------------ train / checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """HF's ``train``; stale staging folders of killed saves are removed first."""
        self._train_window.reset()
        if self.args.should_save:
            for path in remove_stale_staging(self.args.output_dir):
                logger.warning("removed %s: a checkpoint save that never finished", path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _plain_weights_load(self) -> bool:
        """Whether weights load with ``load_state_dict`` (no FSDP, DeepSpeed, SageMaker MP or PEFT)."""
        from transformers import PreTrainedModel
        from transformers.trainer import is_sagemaker_mp_enabled

        return (isinstance(self.model, PreTrainedModel) and not self.is_fsdp_enabled
                and not self.is_deepspeed_enabled and not is_sagemaker_mp_enabled()
                and not getattr(self.model, "_hf_peft_config_loaded", False))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """HF's weight restore, with the model's checkpoint key renaming applied (see
        :func:`~lmms_engine.train.checkpointing.load_checkpoint_weights`)."""
        target = self.model if model is None else model
        if target is self.model and self._plain_weights_load():
            result = load_checkpoint_weights(target, resume_from_checkpoint)
            if result is not None:
                self._issue_warnings_after_load(result)
                return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and self._plain_weights_load():
            result = load_checkpoint_weights(self.model, best)
            if result is not None:
                self._issue_warnings_after_load(result)
                return
        super()._load_best_model()

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_run_dir is not None:  # pushed from the published folder once it exists
            self._pending_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """HF's checkpoint save, written under a staging folder and renamed when complete."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = staging_parent(run_dir, name)
        if self.args.should_save:
            remove_stale_staging(run_dir, name)
        self.accelerator.wait_for_everyone()
        # HF writes <run_dir>/<name>; with the run dir redirected that is <staging>/<name>. Its
        # checkpoint rotation then sees only this folder (a no-op) and is redone below on run_dir; a hub
        # push waits for the published folder.
        self._staging_run_dir = str(staging)
        self._pending_push = False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        staged = staging / name
        if self.state.best_model_checkpoint and os.path.abspath(self.state.best_model_checkpoint) == \
                os.path.abspath(staged):
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are written
        if self.args.should_save:
            publish_checkpoint(staged, final)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_local_main_process and staged.is_dir():
            publish_checkpoint(staged, final)  # a node without a shared filesystem publishes its own copy
        if self._pending_push:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def _default_data_arguments(kwargs: dict[str, Any], model: nn.Module | None) -> None:
    """For a :class:`~lmms_engine.data.dataset.VideoSFTDataset` without an explicit collator or
    tokenizer: its collator (HF's default one cannot pad) and its tokenizer with the model's processor
    files as ``processing_class`` (saved in every checkpoint, see :mod:`lmms_engine.export.processor`)."""
    dataset = kwargs.get("train_dataset")
    if dataset is None or not hasattr(dataset, "bad_record_report"):
        return
    from lmms_engine.data.collator import build_collator
    from lmms_engine.data.dataset import VideoSFTDataset

    if not isinstance(dataset, VideoSFTDataset):
        return
    if kwargs.get("data_collator") is None:
        kwargs["data_collator"] = build_collator(dataset.config, dataset.tokenizer)
    if kwargs.get("processing_class") is None:
        if model is not None and hasattr(model, "video_layout"):
            from lmms_engine.export.processor import build_processing_class

            kwargs["processing_class"] = build_processing_class(dataset.tokenizer, model,
                                                                getattr(model, "name_or_path", None) or None)
        else:
            kwargs["processing_class"] = dataset.tokenizer


def configure_autoregressive(model: nn.Module, enable_autoregressive: bool) -> None:
    """Check or apply ``enable_autoregressive`` on ``model`` (see :class:`AutoregressiveTrainer`)."""
    module = getattr(model, AR_MODULE_ATTR, None)
    if enable_autoregressive and module is None:
        raise ValueError(
            f"enable_autoregressive=True but {type(model).__name__} has no {AR_MODULE_ATTR}: build the model "
            "with model_config.enable_autoregressive: true (lmms_engine.models.builder.build_model) or call "
            "model.attach_autoregressive_module({...}); or pass enable_autoregressive=False for plain SFT"
        )
    if not enable_autoregressive and module is not None:
        count = sum(p.numel() for p in module.parameters() if p.requires_grad)
        logger.warning("enable_autoregressive=False: removing the model's %s (%d trainable parameters); "
                       "training plain SFT, checkpoints will not contain it", AR_MODULE_ATTR, count)
        delattr(model, AR_MODULE_ATTR)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "enable_autoregressive"):
            config.enable_autoregressive = False
            config.autoregressive_config = None


__all__ = ["AutoregressiveTrainer", "configure_autoregressive"]
