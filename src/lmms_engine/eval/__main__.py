"""``python -m lmms_engine.eval``: evaluate a saved checkpoint (the ``evaluate`` block from the shell).

Either flags (``--checkpoint`` and ``--data-path`` at least) or ``--config FILE`` holding the block's
``config:`` mapping, or a pipeline list whose ``- type: evaluate`` blocks are run in order. ``--set
KEY=VALUE`` overrides keys of the mapping (value read as YAML). Exit status: 0 done, 2 config error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

_FLAGS: tuple[tuple[str, str], ...] = (
    ("checkpoint", "model folder saved by training (output_dir or checkpoint-N)"),
    ("data_path", "held-out records (JSON/JSONL, LLaVA or OpenAI format)"),
    ("output_dir", "results folder (default: CHECKPOINT/eval)"),
    ("tokenizer_path", "tokenizer folder (default: the checkpoint)"),
    ("batch_size", "prompts per generate call (default 8)"),
    ("max_new_tokens", "answer length cap (default 16)"),
    ("max_samples", "only the first N records"),
    ("scoring", "auto | exact_match | multiple_choice"),
    ("device", "auto | cpu | cuda | cuda:N | mps"),
    ("torch_dtype", "auto | float32 | bfloat16 | float16"),
    ("dataloader_num_workers", "video decoding processes (default 0)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_engine.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH", help="YAML/JSON: the evaluate mapping or a pipeline list")
    for name, text in _FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=text)
    parser.add_argument("--metrics", nargs="+", choices=("accuracy", "reconstruction"), help="default: both")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the evaluate mapping (value read as YAML); repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _blocks(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lmms_engine.utils.config import parse_value, read_config_file
    from lmms_engine.utils.config import ConfigError

    if args.config:
        raw = read_config_file(args.config)
        if isinstance(raw, list):
            blocks = [dict(b.get("config") or {}) for b in raw if isinstance(b, dict) and b.get("type") == "evaluate"]
            if not blocks:
                raise ConfigError(f"{args.config}: the list holds no '- type: evaluate' block")
        elif isinstance(raw, dict):
            blocks = [dict(raw)]
        else:
            raise ConfigError(f"{args.config}: expected the evaluate mapping or a list of blocks")
    else:
        blocks = [{}]
    for block in blocks:
        for name, _ in _FLAGS:
            value = getattr(args, name)
            if value is not None:
                block[name] = parse_value(value) if name not in ("checkpoint", "data_path", "output_dir",
                                                                  "tokenizer_path") else value
        if args.metrics:
            block["metrics"] = list(args.metrics)
        if args.quiet:
            block["progress"] = False
        for item in args.overrides:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            block[key.strip()] = parse_value(text)
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("lmms_engine")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    from lmms_engine.eval.config import RESULTS_MARKDOWN, run_evaluate
    from lmms_engine.utils.config import ConfigError

    try:
        blocks = _blocks(args)
        for i, block in enumerate(blocks):
            results = run_evaluate(block, where=f"evaluate block {i}" if len(blocks) > 1 else "evaluate")
            print((open(results["files"]["markdown"], encoding="utf-8").read()), flush=True)
            print(f"results: {results['files']['json']} and {RESULTS_MARKDOWN} beside it", flush=True)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
