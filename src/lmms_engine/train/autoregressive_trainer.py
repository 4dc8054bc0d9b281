"""``AutoregressiveTrainer``: transformers' ``Trainer`` for video LLMs with the autoregressive loss.

Everything the HF Trainer does (DDP / FSDP / DeepSpeed through accelerate, gradient accumulation,
mixed precision, checkpoints and resume, ``report_to``, the progress bar) is inherited unchanged. What
this class adds:

- **The loss contract** (:mod:`lmms_engine.models.loss_terms`). A model that returns ``loss_terms``
  (raw sums and counts) and implements ``count_loss_units`` is trained on one objective per
  optimisation step: the step's units are counted before its first forward (all micro-batches,
  all-reduced over ranks) and each term is divided by them here, and only here, then weighted. The
  step's gradient does not depend on how its samples are split into micro-batches and ranks. Other
  models get HF's own loss.
- **Loss components.** ``main_loss``, ``autoregressive_loss``, ``total_loss`` (means over the logging
  window's steps of the step's objective parts: logged ``total_loss`` equals HF's ``loss`` and
  ``main_loss + autoregressive_loss == total_loss``) and the reconstruction metrics ``ar_mse``,
  ``ar_copy_last_mse``, ``ar_fast_loss``, ``ar_slow_loss`` (averaged over the steps that had targets),
  summed over ranks at logging time (:mod:`lmms_engine.train.loss_window`).
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmms_engine.models.loss_terms import METRIC_NAMES, OBJECTIVE_NAMES, SupportsLossTerms
from lmms_engine.train.callbacks import JsonlLogCallback, LossPlotCallback, NothingLoggedWarningCallback
from lmms_engine.train.checkpointing import (
    finished_run,
    load_checkpoint_weights,
    publish_checkpoint,
    remove_stale_staging,
    staging_parent,
)
from lmms_engine.train.arguments import check_fsdp, check_liger_kernel, limit_cpu_threads
from lmms_engine.train.loss_window import LossWindow
from lmms_engine.train.throughput import add_throughput_logging
from lmms_engine.utils.config import ConfigError

logger = logging.getLogger(__name__)

AR_MODULE_ATTR = "autoregressive_module"
#: Training samples whose target features calibrate the predictor's output (see FramePredictor).
CALIBRATION_SAMPLES = 16
#: Components in the order they are logged (any others follow, sorted).
COMPONENT_ORDER: tuple[str, ...] = OBJECTIVE_NAMES + METRIC_NAMES


@dataclass(frozen=True)
class StepUnits:
    """Unit counts of every loss term over one optimisation step (all micro-batches and ranks)."""

    units: dict[str, torch.Tensor]
    micro_batches: int


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
        if args is not None:
            check_fsdp(args)
            check_liger_kernel(args)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._step_units: StepUnits | None = None
        if self._model_counts_units():
            if self.args.label_smoothing_factor:
                raise ValueError(f"label_smoothing_factor={self.args.label_smoothing_factor} is not supported with "
                                 f"{type(self.model).__name__}, whose loss terms the trainer normalises: set it to 0")
            self.loss_is_scaled_for_ga = True  # compute_loss normalises over the whole step
        if limit_cpu_threads(self.args):  # the launcher's thread policy, for the Python API too
            logger.info("training on the CPU with 1 intra-op thread per process (set OMP_NUM_THREADS to change)")
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if model is not None and callable(getattr(tokenizer, "get_vocab", None)):
            from lmms_engine.eval.generation import set_chat_generation_config

            set_chat_generation_config(model, tokenizer)  # checkpoints stop generating where answers end
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
    def _model_counts_units(self) -> bool:
        return isinstance(self.model, SupportsLossTerms)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """HF's micro-batches of one optimisation step; for a model of the loss contract, also the step's
        unit counts of every loss term (all micro-batches, summed over ranks), counted before the step's
        first forward, as HF counts ``num_items_in_batch``."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_units = None
        if self._model_counts_units() and batch_samples and all("labels" in b for b in batch_samples):
            totals: dict[str, torch.Tensor] = {}
            for batch in batch_samples:
                for key, count in self.model.count_loss_units(batch).items():
                    totals[key] = totals.get(key, 0) + count.to(device)
            keys = sorted(totals)
            stacked = torch.stack([totals[k].to(torch.int64) for k in keys])
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.reduce(stacked, reduction="sum")
            self._step_units = StepUnits(dict(zip(keys, stacked.unbind(0))), len(batch_samples))
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The step's objective from the model's ``loss_terms``, and the logged components.

        In training each term is normalised by its units over the whole optimisation step (counted in
        :meth:`get_batch_samples`) and multiplied by the number of processes, which the gradient
        averaging of DDP / FSDP divides out again: the step's gradient is that of the objective over
        all its micro-batches and ranks however they split it. In evaluation a batch is normalised by
        its own counts. Models without ``count_loss_units`` get HF's loss unchanged.
        """
        if not self._model_counts_units():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs)
        terms = outputs["loss_terms"] if isinstance(outputs, dict) else outputs.loss_terms
        if terms is None:
            raise ValueError("the model returned no loss_terms: the batch needs labels")
        step = self._step_units if model.training else None
        if step is None:
            if model.training:  # a micro-batch outside HF's loop: treat it as its own step
                step = StepUnits(terms.counts(), 1)
            else:
                ids = inputs.get("input_ids")
                samples = float(ids.shape[0]) if isinstance(ids, torch.Tensor) else 1.0  # HF weighs eval by samples
                self._eval_window.add(terms.components(), samples)
                loss = terms.objective()
                return (loss, outputs) if return_outputs else loss
        world = self.accelerator.num_processes
        parts = terms.parts(step.units)
        loss = (parts["main_loss"] + parts["autoregressive_loss"]) * world
        share = 1.0 / (step.micro_batches * world)  # every step weighs 1 in the logging window
        logged = {"main_loss": parts["main_loss"], "total_loss": parts["main_loss"] + parts["autoregressive_loss"]}
        if terms.autoregressive:
            logged["autoregressive_loss"] = parts["autoregressive_loss"]
        for name, value in logged.items():
            self._train_window.add_sum(name, value, share)
        for name, (value, weight) in terms.metric_parts(step.units).items():
            self._train_window.add_sum(name, value, weight)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' optimizer with one parameter group per model part and weight-decay setting, each at
        its part's learning rate (``vision_tower_lr``, ``projector_lr``, ``language_model_lr``,
        ``autoregressive_lr``; ``lmms_engine.train.param_groups``); the parts are logged. Without any part
        rate set (or for a model family without a part description), transformers' own two groups."""
        from lmms_engine.train.param_groups import LR_KEYS, build_param_groups, describe_parts

        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        wanted = [key for key in LR_KEYS.values() if getattr(self.args, key, None) is not None]
        try:
            groups, summary = build_param_groups(opt_model, self.args, self.get_decay_parameter_names(opt_model))
        except ConfigError:
            if wanted:
                raise
            return super().create_optimizer(model)
        logger.info(describe_parts(summary))
        if not wanted:
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs:
            raise ConfigError(f"{', '.join(wanted)}: optim={self.args.optim!r} builds its own parameter groups; "
                              "per-part learning rates need a standard optimizer (adamw_torch, sgd, ...)")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

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
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            done = finished_run(resume_from_checkpoint, self.args)
            if done is not None:
                return self._finished(str(resume_from_checkpoint), done)
        if not resume_from_checkpoint:  # a resumed run restores the calibration with the weights
            self.calibrate_autoregressive_targets()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _finished(self, checkpoint: str, step: int) -> Any:
        """Resuming a run that already reached its end: train nothing, restore the checkpoint's weights
        and state (so the final save is of the trained model, also after a kill during the final save)."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        logger.warning("%s: the run already finished (step %d of max_steps %s): nothing to train; raise "
                       "max_steps or num_train_epochs to train further", checkpoint, step,
                       self.args.max_steps if self.args.max_steps > 0 else "by epochs")
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        return TrainOutput(self.state.global_step, 0.0, {"train_runtime": 0.0})

    def calibrate_autoregressive_targets(self, num_samples: int = CALIBRATION_SAMPLES) -> int:
        """Before the first step: set the predictor's output affine to the target features of the first
        ``num_samples`` training samples (dataset order, so every rank and every batch split gets the
        same values); a no-op when already calibrated (e.g. a fine-tuned checkpoint), without the
        autoregressive loss, or for datasets without random access. Returns the frames used."""
        model = self.model
        module = getattr(model, AR_MODULE_ATTR, None)
        dataset = self.train_dataset
        if (not self.enable_autoregressive or module is None or bool(module.predictor.calibrated)
                or not callable(getattr(model, "calibrate_autoregressive_targets", None))
                or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__")):
            return 0
        count = min(num_samples, len(dataset))
        frames = calibrate_autoregressive_targets(model, [dataset[i] for i in range(count)])
        if not frames:
            logger.info("autoregressive predictor: no video among the first %d samples, output left uncalibrated",
                        count)
            return 0
        logger.info("autoregressive predictor: output calibrated to the target features of %d frames "
                    "(per-channel std %.3g..%.3g)", frames, float(module.predictor.target_std.min()),
                    float(module.predictor.target_std.max()))
        return frames

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


def calibrate_autoregressive_targets(model: nn.Module, samples: list[Any]) -> int:
    """Calibrate ``model``'s predictor output to the target features of the real frames (the first
    ``video_num_frames``) of ``samples`` (dataset items with ``pixel_values_videos`` ``[T, 3, H, W]``);
    return the frames used (0: no video, nothing changed). What the trainer does before its first step."""
    videos = []
    for sample in samples:
        pixels = sample.get("pixel_values_videos") if isinstance(sample, dict) else None
        counts = sample.get("video_num_frames") if isinstance(sample, dict) else None
        if isinstance(pixels, torch.Tensor):  # one video; else a list, one [T, 3, H, W] per video
            pixels, counts = [pixels], [counts]
        if not isinstance(pixels, (list, tuple)):
            continue
        if not isinstance(counts, (list, tuple)) or len(counts) != len(pixels):
            counts = [None] * len(pixels)
        for clip, real in zip(pixels, counts):
            if isinstance(clip, torch.Tensor) and clip.dim() == 4:
                count = clip.shape[0] if real is None else int(real)
                if count:
                    videos.append(clip[:count])
    if not videos:
        return 0
    # Targets are per frame: the videos' frames side by side as one [1, sum T, 3, H, W] clip.
    return model.calibrate_autoregressive_targets(torch.cat(videos)[None])


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


__all__ = ["AutoregressiveTrainer", "calibrate_autoregressive_targets", "configure_autoregressive"]
