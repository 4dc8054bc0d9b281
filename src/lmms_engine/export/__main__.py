"""``python -m lmms_engine.export``: evaluator-ready copies of a trained checkpoint.

  llava-next  write a LLaVA-NeXT-format checkpoint for lmms-eval's ``llava_vid`` (any layout that is
              one-to-one with LLaVA-NeXT's model code: average/max/bilinear pooling at stride 2, any
              newline position; the autoregressive head only with --include-autoregressive)
  processor   add the LLaVA-OneVision processor files to a checkpoint saved without them (for
              lmms-eval's ``llava_hf``); copied from --source when given, else generated
  merge-lora  fold a LoRA training checkpoint's adapters into the base weights: a checkpoint plain
              transformers loads, with the adapter model's logits (needs the ``lora`` extra)
  routes      which evaluators reproduce the checkpoint exactly (lmms_engine.eval always; lmms-eval
              llava_hf only for transformers' own video layout; llava_vid through llava-next when
              LLaVA-NeXT computes the same), with the command for each and why the others do not

Exit status: 0 done, 2 the checkpoint cannot be exported (the message says why).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmms_engine.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    nxt = commands.add_parser("llava-next", help="LLaVA-NeXT-format checkpoint for lmms-eval llava_vid")
    nxt.add_argument("--checkpoint", required=True, help="folder saved by training (output_dir or checkpoint-N)")
    nxt.add_argument("--output", required=True, help="new folder; its name must contain 'llava' and 'qwen'")
    nxt.add_argument("--include-autoregressive", action="store_true",
                     help="also write the autoregressive module's weights (left out by default)")
    nxt.add_argument("--vision-tower", default=None,
                     help="config.mm_vision_tower (default google/siglip-so400m-patch14-384 when the tower has "
                          "its shape; required otherwise)")
    nxt.add_argument("--max-frames", type=int, default=32, help="max_frames_num in the printed lmms-eval command")
    proc = commands.add_parser("processor", help="add processor files to a checkpoint (lmms-eval llava_hf)")
    proc.add_argument("--checkpoint", required=True, help="folder saved by training")
    proc.add_argument("--source", default=None, help="checkpoint to copy processor files from (folder or hub id)")
    merge = commands.add_parser("merge-lora", help="merge LoRA adapters into a plain checkpoint")
    merge.add_argument("--checkpoint", required=True, help="a LoRA training checkpoint (output_dir or checkpoint-N)")
    merge.add_argument("--output", required=True, help="new folder for the merged checkpoint")
    routes = commands.add_parser("routes", help="which evaluators reproduce the checkpoint, with their commands")
    routes.add_argument("--checkpoint", required=True, help="folder saved by training")
    routes.add_argument("--max-frames", type=int, default=32, help="max_frames_num in the printed commands")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s", stream=sys.stderr)
    try:
        if args.command == "llava-next":
            from lmms_engine.export.llava_next import export_llava_next

            result = export_llava_next(args.checkpoint, args.output, include_autoregressive=args.include_autoregressive,
                                       vision_tower=args.vision_tower, max_frames=args.max_frames)
            print(f"wrote {result.tensors} tensors to {result.output_dir} (left out {len(result.dropped)}: "
                  f"see export_info.json)")
            print("evaluate with (LLaVA-NeXT and lmms-eval installed):")
            print(f"  python -m lmms_eval --model llava_vid --model_args {result.model_args} "
                  f"--tasks videomme --batch_size 1 --log_samples --output_path ./logs/")
        elif args.command == "merge-lora":
            from lmms_engine.models.lora import merge_lora_checkpoint

            print(f"wrote the merged checkpoint to {merge_lora_checkpoint(args.checkpoint, args.output)}")
        elif args.command == "routes":
            from lmms_engine.export.processor import checkpoint_config
            from lmms_engine.export.routes import describe_routes, evaluation_routes

            print(f"evaluation routes for {args.checkpoint}:")
            print(describe_routes(evaluation_routes(checkpoint_config(args.checkpoint), args.checkpoint,
                                                    args.max_frames)))
        else:
            from lmms_engine.export.processor import add_processor_files

            for path in add_processor_files(args.checkpoint, args.source):
                print(path)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
