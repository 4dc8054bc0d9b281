"""The ``evaluate`` block: its config (:class:`EvaluateConfig`) and its entry point (:func:`run_evaluate`).

In a pipeline config::

    - type: evaluate
      config:
        checkpoint: output/quickstart          # a saved model folder (final model or checkpoint-N)
        data_path: output/quickstart/data/eval.json
        batch_size: 8
        max_new_tokens: 16
        output_dir: output/quickstart/eval

``run_evaluate`` loads the checkpoint and its tokenizer, builds the held-out split, then in one pass
over it (progress bar) generates answers greedily in batches and, when the checkpoint has the
autoregressive module, measures the predictor's next-frame reconstruction per frame offset. It writes
``eval_results.json``, ``eval_results.md`` and ``predictions.jsonl`` to ``output_dir`` and returns the
JSON's content. Scoring and normalisation: :mod:`lmms_engine.eval.accuracy`; the reconstruction
metric: :mod:`lmms_engine.eval.reconstruction`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from lmms_engine.utils.config import ConfigError, from_mapping

logger = logging.getLogger(__name__)

Metric = Literal["accuracy", "reconstruction"]
METRICS: tuple[str, ...] = ("accuracy", "reconstruction")
RESULTS_JSON = "eval_results.json"
RESULTS_MARKDOWN = "eval_results.md"
PREDICTIONS_FILE = "predictions.jsonl"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class EvaluateConfig:
    """The ``config:`` mapping of a ``- type: evaluate`` block.

    Attributes:
        checkpoint: model folder written by training (``output_dir`` or a ``checkpoint-N`` inside
            it), or any LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint in HF format.
        data_path: held-out records (JSON list or JSONL, LLaVA ``conversations`` or OpenAI ``messages``;
            the last assistant turn is the reference, metadata ``question_type``/``options`` are used
            when present). With ``dataset_config`` it replaces that block's ``eval_data_path``.
        dataset_config: a ``dataset_config`` block (the trainer's, typically) for frame sampling
            (``max_frames``, ``fps``, ...); its ``eval_data_path`` is evaluated. Give this, ``data_path``,
            or both.
        output_dir: where the results go; default ``<checkpoint>/eval``.
        tokenizer_path: default: the checkpoint folder (the trainer saves the tokenizer there).
        metrics: ``accuracy`` (generation + scoring) and/or ``reconstruction`` (skipped, with a note in
            the results, when the checkpoint has no autoregressive module).
        batch_size: prompts per ``generate`` call (and per reconstruction forward).
        max_new_tokens: generation length cap per answer.
        max_samples: evaluate only the first N records (None: all).
        scoring: ``auto`` (multiple choice when a record has ``options``, else exact match),
            ``exact_match`` or ``multiple_choice``.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        torch_dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: e.g. ``sdpa``, ``flash_attention_2``; None = transformers' default.
        dataloader_num_workers: processes decoding videos (0 = in the main process).
        save_predictions: also write ``predictions.jsonl`` (one scored answer per line).
        progress: show a progress bar.

    ``__post_init__`` checks keys, types and values but no files: a checkpoint written by an earlier
    block of the same pipeline does not exist yet when the pipeline is checked. :func:`run_evaluate`
    checks the files before loading anything.
    """

    checkpoint: str
    data_path: str | None = None
    dataset_config: dict | None = None
    output_dir: str | None = None
    tokenizer_path: str | None = None
    metrics: list[Metric] = field(default_factory=lambda: list(METRICS))
    batch_size: int = 8
    max_new_tokens: int = 16
    max_samples: int | None = None
    scoring: Literal["auto", "exact_match", "multiple_choice"] = "auto"
    device: str = "auto"
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    dataloader_num_workers: int = 0
    save_predictions: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint must name a model folder")
        if self.data_path is None and self.dataset_config is None:
            raise ValueError("give data_path (a held-out records file) or dataset_config (with eval_data_path)")
        if not self.metrics:
            raise ValueError(f"metrics must name at least one of {', '.join(METRICS)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics lists a metric twice: {self.metrics}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or null (all), got {self.max_samples}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if not _DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        try:  # keys and types of dataset_config, now rather than after the model has loaded
            self.dataset()
        except ConfigError as err:  # re-raised by from_mapping with the block's name in front
            raise ValueError(str(err)) from None

    def dataset(self) -> Any:
        """The :class:`~lmms_engine.data.DatasetConfig` whose ``eval_data_path`` is evaluated."""
        from lmms_engine.data.dataset import DatasetConfig

        raw = dict(self.dataset_config or {})
        if self.data_path is not None:
            raw["eval_data_path"] = self.data_path
        if raw.get("eval_data_path") is None:
            raise ValueError("dataset_config has no eval_data_path; set it, or set data_path")
        raw.setdefault("data_path", raw["eval_data_path"])  # the training file is not read here
        return from_mapping(DatasetConfig, raw, "dataset_config")

    @property
    def results_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir is not None else Path(self.checkpoint) / "eval"


def _check_files(config: EvaluateConfig, dataset: Any, where: str) -> None:
    folder = Path(config.checkpoint)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "holds no config.json"
        raise ConfigError(f"{where}.checkpoint: {config.checkpoint!r} {what}; give a model folder saved by "
                          f"training (its output_dir or a checkpoint-N inside it)")
    named = {"eval_data_path": f"{where}.data_path"} if config.data_path is not None else None
    dataset.check_files(f"{where}.dataset_config", keys=("eval_data_path",), named=named)


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine; use device: cpu or auto")
    return device


def _load_tokenizer(config: EvaluateConfig, where: str) -> Any:
    from transformers import AutoTokenizer

    path = config.tokenizer_path or config.checkpoint
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        key = "tokenizer_path" if config.tokenizer_path else "checkpoint"
        raise ConfigError(f"{where}.{key}: no tokenizer could be loaded from {path!r} ({err}); set tokenizer_path "
                          f"to the folder of the tokenizer the model was trained with") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_config(config: EvaluateConfig) -> Any:
    from lmms_engine.models.builder import ModelConfig

    return ModelConfig(model_name_or_path=config.checkpoint, torch_dtype=config.torch_dtype,
                       attn_implementation=config.attn_implementation)  # type: ignore[arg-type]


def load_model(config: EvaluateConfig, tokenizer: Any) -> Any:
    """The checkpoint as a :class:`~lmms_engine.models.llava_video.LlavaVideoForConditionalGeneration`
    in eval mode on the configured device (its autoregressive module restored when it has one)."""
    from lmms_engine.models.builder import build_model

    device = _resolve_device(config.device)  # before loading: a missing GPU fails fast
    return _for_evaluation(build_model(_model_config(config), tokenizer), device)


def _for_evaluation(model: Any, device: Any) -> Any:
    model.requires_grad_(False)
    return model.eval().to(device)


def results_markdown(results: Mapping[str, Any]) -> str:
    """The markdown report of :func:`run_evaluate`'s results."""
    from lmms_engine.eval.accuracy import accuracy_markdown
    from lmms_engine.eval.reconstruction import reconstruction_markdown

    lines = [
        f"# Evaluation of `{results['checkpoint']}`",
        "",
        f"Data: `{results['data_path']}`, {results['num_samples']} samples; device {results['device']}, "
        f"dtype {results['dtype']}.",
    ]
    if "accuracy" in results:
        lines += ["", "## Accuracy", "",
                  "Greedy answers; normalisation: NFKC, lower case, non-alphanumerics to spaces, articles "
                  "dropped. Multiple choice when the record has options (an answer naming no single "
                  "option is unmatched and wrong), else exact match. `chance`: uniform guessing among "
                  "the options; `majority answer`: always giving the group's most frequent reference.",
                  "", accuracy_markdown(results["accuracy"])]
    if "reconstruction" in results:
        recon = results["reconstruction"]
        lines += ["", "## Next-frame reconstruction", ""]
        if "skipped" in recon:
            lines.append(f"Skipped: {recon['skipped']}.")
        else:
            lines += ["MSE of the predicted vision embeddings of frame s+k from the LLM's hidden states of "
                      "frames s..s+k-1 (k = frame offset), against copying frame s+k-1 (ratio < 1 beats "
                      "copying) and against the best constant prediction (mean-target MSE: the mean target "
                      "at each grid position).", "", reconstruction_markdown(recon)]
    return "\n".join(lines) + "\n"


def run_evaluate(config: EvaluateConfig | Mapping[str, Any], where: str = "evaluate") -> dict[str, Any]:
    """Evaluate a checkpoint on a held-out split (module docstring); return the results.

    Args:
        config: an :class:`EvaluateConfig` or its mapping (the block's ``config:``; checked, unknown
            keys and wrong types raise ConfigError naming ``where``).
        where: how messages name the block.

    Returns:
        The content of ``eval_results.json``: ``checkpoint``, ``data_path``, ``num_samples``, ``device``,
        ``dtype``, ``config``, ``accuracy`` (:class:`~lmms_engine.eval.accuracy.AccuracyReport` as a
        dict) when asked, ``reconstruction`` (per-offset summary, or ``{"skipped": reason}``) when
        asked, ``seconds`` and ``files``.
    """
    import torch
    from tqdm.auto import tqdm

    from lmms_engine.eval.accuracy import score_predictions, write_predictions
    from lmms_engine.eval.generation import generate_answers, prompt_loader, stop_token_ids, to_predictions
    from lmms_engine.eval.reconstruction import (
        ReconstructionAccumulator,
        batch_reconstruction_errors,
        batch_video_count,
    )
    from lmms_engine.parts import build_parts

    cfg = config if isinstance(config, EvaluateConfig) else from_mapping(EvaluateConfig, config, where)
    try:
        dataset_config = cfg.dataset()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err
    _check_files(cfg, dataset_config, where)
    start = time.time()
    tokenizer = _load_tokenizer(cfg, where)
    device = _resolve_device(cfg.device)  # before loading: a missing GPU fails fast
    parts = build_parts(_model_config(cfg), dataset_config, with_train=False, with_eval=True, tokenizer=tokenizer,
                        where=where)
    model = _for_evaluation(parts.model, device)
    dataset, collator_cls = parts.eval_dataset, type(parts.collator)
    loader = prompt_loader(dataset, tokenizer, cfg.batch_size, limit=cfg.max_samples,
                           num_workers=cfg.dataloader_num_workers, collator_cls=collator_cls)
    num_samples = len(loader.dataset)

    want_accuracy = "accuracy" in cfg.metrics
    module = getattr(model, "autoregressive_module", None)
    want_recon = "reconstruction" in cfg.metrics and module is not None
    skipped = None
    if "reconstruction" in cfg.metrics and module is None:
        skipped = "the checkpoint has no autoregressive module (enable_autoregressive is false in its config.json)"
        logger.warning("reconstruction metric skipped: %s", skipped)
    accumulator = ReconstructionAccumulator(module) if want_recon else None
    stop_ids = stop_token_ids(tokenizer, model) if want_accuracy else []

    predictions = []
    timing = {"load": time.time() - start, "generation": 0.0, "reconstruction": 0.0}
    with torch.inference_mode():
        batches = loader if (want_accuracy or accumulator is not None) else []  # nothing left to measure
        for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not cfg.progress):
            batch = batch.to(device)
            if want_accuracy:
                tick = time.time()
                answers = generate_answers(model, tokenizer, batch, max_new_tokens=cfg.max_new_tokens,
                                           stop_ids=stop_ids)
                predictions.extend(to_predictions(batch, answers))
                timing["generation"] += time.time() - tick
            if accumulator is not None:
                tick = time.time()
                accumulator.add_batch(batch_reconstruction_errors(model, batch.inputs, module),
                                      batch_video_count(batch.inputs))
                timing["reconstruction"] += time.time() - tick

    out_dir = cfg.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "checkpoint": cfg.checkpoint,
        "data_path": dataset_config.eval_data_path,
        "num_samples": num_samples,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "config": asdict(cfg),
    }
    files = {"json": str(out_dir / RESULTS_JSON), "markdown": str(out_dir / RESULTS_MARKDOWN)}
    if want_accuracy:
        scored, report = score_predictions(predictions, cfg.scoring)
        results["accuracy"] = report.to_dict()
        if cfg.save_predictions:
            files["predictions"] = str(write_predictions(out_dir / PREDICTIONS_FILE, scored))
    if "reconstruction" in cfg.metrics:
        results["reconstruction"] = accumulator.summary() if accumulator is not None else {"skipped": skipped}
    results["seconds"] = {k: round(v, 3) for k, v in timing.items()}
    results["files"] = files
    (out_dir / RESULTS_JSON).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out_dir / RESULTS_MARKDOWN).write_text(results_markdown(results), encoding="utf-8")
    if want_accuracy:
        logger.info("accuracy %.4f on %d samples", results["accuracy"]["overall"]["accuracy"], num_samples)
    logger.info("evaluation written to %s", out_dir)
    return results


__all__ = ["EvaluateConfig", "METRICS", "PREDICTIONS_FILE", "RESULTS_JSON", "RESULTS_MARKDOWN", "load_model",
           "results_markdown", "run_evaluate"]
