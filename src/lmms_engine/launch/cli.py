"""Command line: ``python -m lmms_engine.launch.cli --config X.yaml`` (also under ``torchrun``; the
``lmms-video`` console script is the same entry point).

Imports stay light until a config has been checked: ``--help`` and config errors never load torch
models.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

DESCRIPTION = """\
Train (and evaluate) a video LLM from a pipeline config: a YAML (or JSON) list of blocks, run in order.

  - type: demo_data          # optional: generate the demo dataset if missing
    config: {output_dir: output/quickstart/data, num_train: 64, num_eval: 16}
  - type: trainer
    config:
      trainer_type: autoregressive_trainer   # or hf_trainer / sft (no autoregressive loss)
      model_config:                          # model_name_or_path (omit: the tiny offline model),
        enable_autoregressive: true          # layout keys, freezing, autoregressive_config ...
        autoregressive_config: {loss_weight: 0.1, use_frame_causal_mask: true}
      dataset_config: {data_path: data/train.json, max_frames: 8}
      output_dir: ./output/run               # + any transformers.TrainingArguments field,
      per_device_train_batch_size: 2         #   flattened beside the keys above
      resume_from_checkpoint: true           # newest complete checkpoint in output_dir (or a path)
  - type: evaluate                           # optional: held-out accuracy + reconstruction MSE
    config: {checkpoint: ./output/run, data_path: data/eval.json}

The whole config is checked before anything is built: unknown keys (with the nearest valid name),
wrong types, missing files, conflicting layout keys. Every key, type and default: docs/config.md.
"""

EPILOG = """\
examples (`lmms-video` is the same command as `python -m lmms_engine.launch.cli`):
  python -m lmms_engine.launch.cli --config examples/quickstart.yaml
  python -m lmms_engine.launch.cli --config examples/config_basic_autoregressive.yaml \\
      --set max_steps=20 --set model_config.autoregressive_config.loss_weight=0.05
  torchrun --nproc_per_node=8 -m lmms_engine.launch.cli --config examples/config_llava_next_autoregressive.yaml

exit status: 0 trained, 2 config error (message on stderr), 1 any other failure.
"""

logger = logging.getLogger("lmms_engine.launch")


def _prog() -> str:
    """The name the user typed: ``lmms-video`` for the console script, else the module form."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "lmms-video" if name.startswith("lmms-video") else "python -m lmms_engine.launch.cli"


def build_parser() -> argparse.ArgumentParser:
    from lmms_engine import __version__

    parser = argparse.ArgumentParser(
        prog=_prog(),
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lmms-video {__version__}")
    parser.add_argument("--config", required=True, metavar="PATH", help="pipeline config (.yaml, .yml or .json)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a key of every trainer block's config (dotted path, value read as YAML), e.g. "
             "--set max_steps=10 --set dataset_config.max_frames=4; 'demo_data.KEY=VALUE' targets the "
             "demo_data block. Repeatable.",
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, print the resolved blocks and exit without training")
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _setup_logging() -> None:
    level = logging.INFO if _rank() == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("lmms_engine")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _describe(pipeline) -> str:  # noqa: ANN001 - PipelineConfig, imported lazily
    from dataclasses import asdict, is_dataclass

    lines = [f"{pipeline.source}: {len(pipeline.blocks)} block(s), config OK"]
    for block in pipeline.blocks:
        cfg = block.config
        if block.type == "trainer":
            lines.append(f"- trainer ({cfg.trainer_type}, autoregressive loss: "
                         f"{'on' if cfg.trains_autoregressive else 'off'})")
            lines.append(f"    model_config: {asdict(cfg.model_config)}")
            lines.append(f"    dataset_config: {asdict(cfg.dataset_config)}")
            lines.append(f"    training arguments: {cfg.training_args}")
            if cfg.resume_from_checkpoint:
                lines.append(f"    resume_from_checkpoint: {cfg.resume_from_checkpoint}")
        else:
            lines.append(f"- {block.type}: {asdict(cfg) if is_dataclass(cfg) else cfg}")
    return "\n".join(lines)


def finish_distributed() -> None:
    """Tear the process group down without letting a teardown failure fail a finished run.

    A barrier first, so no rank closes its connections while another still uses them (gloo can abort
    in ``destroy_process_group`` when a peer has already gone).
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - training already finished and was saved
        logger.warning("ignoring an error while shutting the process group down: %s", err)


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _fail(code: int, message: str) -> int:
    """Report an error and end this process; return ``code`` outside a process group.

    In a multi-process job the other ranks may be waiting in a collective this rank will never join: a
    barrier or an orderly teardown would wait forever. The process exits at once instead (its peers'
    collectives then fail on the closed connections, and torchrun stops the job with a non-zero status).
    """
    print(message, file=sys.stderr, flush=True)
    if not _in_process_group():
        return code
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _die_with_the_launcher() -> None:
    """Under torchrun, end this rank when the launcher process dies (even by SIGKILL), so no rank is
    left running or waiting after its job is gone (Linux; elsewhere nothing is done)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the launcher is already gone
            os._exit(1)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lmms_engine.launch.cli`` and of the ``lmms-video`` script."""
    args = build_parser().parse_args(argv)
    _die_with_the_launcher()
    _setup_logging()
    from lmms_engine.data.records import BadRecordError, DataFileError
    from lmms_engine.launch.config import load_pipeline_config
    from lmms_engine.utils.config import ConfigError

    try:
        pipeline = load_pipeline_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (BadRecordError, DataFileError) as err:  # data files are read up to a first usable record
        print(f"data error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if _rank() == 0:
            print(_describe(pipeline))
        return 0

    from lmms_engine.data.dataset import BadRecordBudgetError
    from lmms_engine.launch.pipeline import run_pipeline
    from lmms_engine.video.decode import VideoReadError

    try:
        summaries = run_pipeline(pipeline)
    except ConfigError as err:
        return _fail(2, f"config error: {err}")
    except (BadRecordError, DataFileError, BadRecordBudgetError, VideoReadError) as err:
        # Bad data (while building the dataset, or a record that stopped training under
        # on_bad_record: raise): the message names the record, file and cause.
        return _fail(2, f"data error: {err}")
    except BaseException:
        if not _in_process_group():
            raise
        import traceback

        return _fail(1, traceback.format_exc().rstrip())
    if _rank() == 0:
        for summary in summaries:
            print(summary.describe(), flush=True)
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
