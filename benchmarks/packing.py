"""Sequence packing: training throughput with and without ``packing`` on a mixed video / text dataset.

The data is the demo dataset with every other record made text-only (its video and ``<video>``
placeholder removed). That is the usual shape of an SFT mixture: samples of very different lengths,
so padded batches carry many padding tokens. Each case trains the tiny model with
``AutoregressiveTrainer`` for ``--steps`` steps in this process, with the same seed and the same
data order. The cases alternate over ``--rounds``.

Reported per case:
- the median step time (steps after ``--warmup``);
- samples/s;
- real tokens/s: the engine's own throughput count (padding excluded) over the whole run, data loading
  and warm-up included;
- the share of the batch's token slots that are padding.

The two cases train the same samples in the same order, and the losses agree (packing is tested to
give the unpadded batch's loss).

Run: ``python benchmarks/packing.py [--steps 40] [--rounds 3] [--batch-size 8] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def mixed_records(data_dir: Path, out: Path) -> Path:
    """The demo training records with every other one text-only; video paths made absolute."""
    records = json.loads((data_dir / "train.json").read_text())
    for i, record in enumerate(records):
        if i % 2:
            record.pop("video")
            turn = record["conversations"][0]
            turn["value"] = turn["value"].replace("<video>\n", "")
        else:
            record["video"] = str(data_dir / record["video"])
    path = out / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def run_case(data: Path, packing: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from transformers import TrainerCallback, set_seed

    from lmms_engine.data import DatasetConfig, build_collator, build_dataset
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.data.tokenizer import build_tiny_tokenizer
    from lmms_engine.models.builder import build_model
    from lmms_engine.train import AutoregressiveTrainer, TrainingArguments

    set_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_model({"enable_autoregressive": True,
                         "autoregressive_config": {"embedding_dim": 64, "num_hist": 3, "num_layers": 1}}, tokenizer)
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    config = DatasetConfig(data_path=str(data), max_frames=8, max_length=512, packing=packing)
    dataset = build_dataset(config, tokenizer, info)
    collator = build_collator(config, tokenizer)
    slots: list[tuple[int, int]] = []  # (token slots of the batch, real tokens)

    def counting_collator(samples: list[dict]) -> dict:
        batch = collator(samples)
        slots.append((batch["input_ids"].numel(), sum(len(s["input_ids"]) for s in samples)))
        return batch

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times.append(time.perf_counter() - self.start)

    training = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                                 max_steps=args.steps, learning_rate=1e-4, logging_steps=args.steps,
                                 save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                                 dataloader_num_workers=0)
    trainer = AutoregressiveTrainer(model=model, args=training, train_dataset=dataset, data_collator=counting_collator,
                                    callbacks=[Timer()], plot_loss=False, log_file=None)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    steady = times[args.warmup:]
    total_slots, real = (sum(v) for v in zip(*slots))
    return {"step_s": statistics.median(steady), "samples_per_s": args.batch_size / statistics.median(steady),
            "tokens_per_s": logged["tokens_per_second_per_device"], "padding": 1 - real / total_slots,
            "main_loss": logged["main_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from lmms_engine.data.demo import DemoDataConfig, ensure_demo_data

    # Its own folder: other settings written into output/quickstart/data would replace the quickstart's data.
    demo = DemoDataConfig(output_dir=str(ROOT / "output" / "bench" / "packing_data"))
    ensure_demo_data(demo)
    results: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = mixed_records(Path(demo.output_dir), Path(tmp))
        for round_index in range(args.rounds):
            for packing in (False, True):
                result = run_case(data, packing, args, Path(tmp) / f"run{round_index}{int(packing)}")
                results[packing].append(result)
                print(f"round {round_index} packing={packing}: {result}", flush=True)

    def median(packing: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[packing])

    lines = ["## Sequence packing (tiny model, CPU)", "", machine_line(),
             "Command: `" + " ".join(["python benchmarks/packing.py", *sys.argv[1:]]) + "`",
             f"Demo records with every other one text-only, 8 frames per video, batch {args.batch_size}, "
             f"{args.steps} steps (first {args.warmup} not timed), 1 thread; medians over {args.rounds} rounds "
             "(cases alternate).", "",
             "| case | step time (s) | samples/s | real tokens/s (whole run, data loading included) | padding share of token slots | main loss |",
             "|---|---|---|---|---|---|"]
    for packing in (False, True):
        lines.append(f"| {'packed' if packing else 'padded'} | {median(packing, 'step_s'):.3f} | "
                     f"{median(packing, 'samples_per_s'):.1f} | {median(packing, 'tokens_per_s'):.0f} | "
                     f"{median(packing, 'padding'):.2f} | {median(packing, 'main_loss'):.4f} |")
    ratio = median(False, "step_s") / median(True, "step_s")
    lines += ["", f"Packed / padded throughput: {ratio:.2f}x (step-time ratio of the medians)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        print(f"wrote {write_section('packing', report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
