"""Train a video LLM with the autoregressive reconstruction loss from Python (the guide's section 3).

    python examples/train_with_autoregressive.py                 # tiny model + demo clips, CPU is fine
    python examples/train_with_autoregressive.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \\
        --data path/to/train.json --video-folder path/to/videos   # a real checkpoint, on a GPU

Without ``--model`` the tiny offline model is built (random weights) and without ``--data`` the demo
dataset is generated into output/demo_data. The training arguments are the guide's; bf16 is used
where the GPU supports it (TrainingArguments would also accept bf16=True on a CPU-only machine, with
bfloat16 autocast, but float32 is faster there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmms_engine.data import DatasetConfig, DemoDataConfig, ensure_demo_data
from lmms_engine.models import ModelConfig
from lmms_engine.parts import build_parts
from lmms_engine.train import AutoregressiveTrainer, TrainingArguments, limit_cpu_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="LLaVA-OneVision checkpoint (folder or hub id); default: tiny")
    parser.add_argument("--data", default=None, help="LLaVA-format JSON/JSONL; default: the generated demo data")
    parser.add_argument("--video-folder", default=None, help="folder of relative video paths (default: the data's)")
    parser.add_argument("--output-dir", default="./output/autoregressive_video")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: 3 epochs)")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--max-frames", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> AutoregressiveTrainer:
    args = parse_args(argv)

    # The model: LLaVA-OneVision with the autoregressive module (embedding_dim defaults to the tower's
    # width: 1152 for SigLIP-so400m, 64 for the tiny model).
    model_config = ModelConfig(
        model_name_or_path=args.model,
        enable_autoregressive=True,
        autoregressive_config={"num_hist": 3, "loss_weight": 0.1, "num_heads": 8, "num_layers": 3,
                               "use_frame_causal_mask": True},
    )

    # The data: LLaVA conversation records with a video each.
    data_path = args.data
    if data_path is None:
        demo = DemoDataConfig(output_dir="output/demo_data")
        ensure_demo_data(demo)
        data_path = str(demo.train_path)
    dataset_config = DatasetConfig(data_path=data_path, video_folder=args.video_folder, max_frames=args.max_frames)

    # Tokenizer -> model -> processor info -> dataset -> collator, as the launcher builds them.
    parts = build_parts(model_config, dataset_config)
    model, train_dataset = parts.model, parts.train_dataset

    # The guide's debugging snippet.
    if hasattr(model, "autoregressive_module"):
        print("autoregressive module loaded")
        print(f"loss weight: {model.autoregressive_module.loss_weight}")
        print(f"multi-scale pooling: {model.autoregressive_module.enable_multiscale_pooling}")
    else:
        print("no autoregressive module found")

    # Section 3 of the guide.
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=3,
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=args.learning_rate,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        logging_steps=10,
        save_steps=500,
        report_to="none",
    )
    limit_cpu_threads(training_args)  # on a CPU: one intra-op thread unless OMP_NUM_THREADS says otherwise
    trainer = AutoregressiveTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,  # its collator and tokenizer are used by default
        enable_autoregressive=True,  # turn on autoregressive training
    )
    trainer.train()
    trainer.save_model()  # weights (autoregressive module included), config and tokenizer
    out = Path(args.output_dir)
    print(f"final model in {out}; also there: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return trainer


if __name__ == "__main__":
    main()
