"""GPU check: the real-size training step with the autoregressive module off / ``all`` / ``sliding``,
and a 1-GPU FSDP run, all through ``AutoregressiveTrainer``; on a CUDA machine within 10 minutes.

Real size (CUDA): SigLIP-so400m + Qwen2-0.5B dimensions, random weights, 1 video x 32 frames at 384 px
(bilinear stride 2: 14x14 tokens per frame), bf16, SDPA, gradient checkpointing, frozen tower (shared
targets), AdamW. Per case, in a fresh process: median step time over the steps after ``--warmup``,
text+video tokens per second, MFU (FLOPs of :class:`lmms_engine.train.throughput.ModelFlops`: LLM
forward+backward with attention, the frozen tower's forward, projector, predictor with its attention;
peak by device name or ``--peak-tflops``) and peak memory (``torch.cuda.max_memory_allocated``).
Then the ``sliding`` case again under ``torchrun --nproc_per_node 1`` with FSDP2
(``fsdp: full_shard``, ``fsdp_config: {version: 2, activation_checkpointing: true}``).

CPU mode (``--cpu``, or no GPU): the same script at the tiny size (float32, no checkpointing, one
thread), the distributed run launched the same way but as DDP (accelerate enables FSDP only on
accelerators): it checks that every path of the script runs, not the numbers.

Run: ``bash benchmarks/gpu_check.sh`` (= ``python benchmarks/gpu_check.py --write``): prints the table and
writes the ``gpu_check`` section of benchmarks/RESULTS.md; ``--json PATH`` also saves the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, write_section  # noqa: E402
from train_throughput import SIZES, StepTimer, cpu_peak_flops, model_config, samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: autoregressive window (None = module off), distributed
    "ar_off": (None, False),
    "ar_all": ("all", False),
    "ar_sliding": ("sliding", False),
    "fsdp_sliding": ("sliding", True),
}
CASE_TIMEOUT_S = 240  # one case on the GPU: model build, warm-up (flex compile) and the timed steps


def case_model_config(size: str, window: str | None) -> dict[str, Any]:
    cfg = model_config(size, window is not None)
    if window is not None:
        cfg["autoregressive_config"] = {**cfg["autoregressive_config"], "window": window}
    return cfg


def run_case(size: str, case: str, steps: int, out_dir: str) -> dict[str, Any]:
    """Train ``steps`` steps of one case in this process (under torchrun for the distributed case)."""
    from transformers import TrainingArguments

    from lmms_engine.models.builder import build_model
    from lmms_engine.train.autoregressive_trainer import AutoregressiveTrainer
    from lmms_engine.train.throughput import ModelFlops

    window, distributed = CASES[case]
    cuda = torch.cuda.is_available()
    spec = SIZES[size]
    torch.manual_seed(0)
    fsdp = distributed and cuda
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=spec["batch"], max_steps=steps, learning_rate=1e-5,
        logging_steps=max(steps, 1), save_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=spec["checkpointing"] and not fsdp, bf16=spec["dtype"] == "bfloat16",
        use_cpu=not cuda, dataloader_num_workers=0,
        fsdp="full_shard" if fsdp else "",
        fsdp_config={"version": 2, "activation_checkpointing": spec["checkpointing"]} if fsdp else None)
    data = samples(size, True) * (steps * spec["batch"] // 2 + 1)
    timer = StepTimer()
    model = build_model(case_model_config(size, window))
    estimate = ModelFlops.from_model(model)
    trainer = AutoregressiveTrainer(model=model, args=args, train_dataset=data, callbacks=[timer.callback],
                                    enable_autoregressive=window is not None, plot_loss=False, log_file=None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    batch = data[: spec["batch"]]
    lengths = [int(s["attention_mask"].sum()) for s in batch]
    frames = torch.tensor([int(s["video_num_frames"]) for s in batch])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"times": timer.times, "peak_bytes": peak, "tokens": sum(lengths),
            "flops": estimate.batch_flops(lengths, frames), "loss": losses[-1] if losses else None,
            "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def launch(case: str, size: str, steps: int, out: Path, timeout: float) -> dict[str, Any]:
    """One case in a fresh process; the distributed one under ``torchrun --nproc_per_node 1``."""
    _, distributed = CASES[case]
    result_file = out / f"{case}.json"
    command = [sys.executable, __file__, "--case", case, "--size", size, "--steps", str(steps),
               "--out", str(out), "--result", str(result_file)]
    if distributed:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                   str(_free_port()), *command[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if proc.returncode or not result_file.exists():
        return {"error": f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-1500:]}
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarise(results: dict[str, dict[str, Any]], warmup: int, peak: float) -> dict[str, dict[str, Any]]:
    rows = {}
    for case, result in results.items():
        if "error" in result:
            rows[case] = {"error": result["error"]}
            continue
        timed = result["times"][warmup:] or result["times"]
        step = statistics.median(timed)
        rows[case] = {"step_s": step, "spread_s": (min(timed), max(timed)), "steps": len(timed),
                      "tokens_per_s": result["tokens"] / step, "mfu": result["flops"] / step / peak,
                      "tflop_per_step": result["flops"] / 1e12, "peak_mib": result["peak_bytes"] / 2 ** 20,
                      "fsdp": result["fsdp"], "loss": result["loss"], "wall_s": result["wall_s"]}
    return rows


def markdown(rows: dict[str, dict[str, Any]], size: str, device: str, peak_note: str, minutes: float,
             steps: int, warmup: int) -> str:
    spec = SIZES[size]
    what = ("SigLIP-so400m + Qwen2-0.5B dimensions, random weights" if size == "real"
            else "the tiny config (CPU mode: checks the script, not the numbers)")
    lines = [
        "## GPU check (`benchmarks/gpu_check.sh`)",
        "",
        f"{machine_line(('torch', 'transformers', 'accelerate'))}; device: {device}. Command: "
        f"`python benchmarks/gpu_check.py{' --cpu' if size == 'cpu' else ''} --steps {steps}` ({minutes:.1f} min).",
        "",
        f"Model: {what}; batch {spec['batch']} x {spec['frames']} frames, {spec['dtype']}, SDPA"
        f"{', gradient checkpointing' if spec['checkpointing'] else ''}, frozen tower, AdamW, "
        f"`AutoregressiveTrainer`. Median step over {steps - warmup} steps after {warmup} warm-up (min-max). "
        f"MFU against {peak_note}, FLOPs from `ModelFlops` (vision tower forward counted).",
        "",
        "| case | step (s) | min-max (s) | tokens/s | GFLOP/step | MFU | peak memory (MiB) | vs ar_off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = rows.get("ar_off", {}).get("step_s")
    for case, row in rows.items():
        if "error" in row:
            lines.append(f"| {case} | failed: {row['error'].splitlines()[-1][:200]} |  |  |  |  |  |  |")
            continue
        label = case + (" (FSDP2, 1 GPU)" if row["fsdp"] else " (DDP, 1 process: FSDP needs a GPU)"
                        if CASES[case][1] else "")
        ratio = f"{row['step_s'] / base:.3f}x" if base else "-"
        lines.append(f"| {label} | {row['step_s']:.3f} | {row['spread_s'][0]:.3f}-{row['spread_s'][1]:.3f} | "
                     f"{row['tokens_per_s']:.0f} | {row['tflop_per_step'] * 1e3:.1f} | {row['mfu']:.1%} | "
                     f"{row['peak_mib']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny size on the CPU (the default without a GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--write", action="store_true", help="write the gpu_check section of RESULTS.md")
    parser.add_argument("--json", help="also save the rows as JSON here")
    parser.add_argument("--out", default="/tmp/lmms_gpu_check")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=tuple(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # a shared CPU: OpenMP threads spinning on busy cores make times bimodal
    if opts.case:  # child: one case, its numbers to --result
        result = run_case(opts.size, opts.case, opts.steps, str(Path(opts.out) / opts.case))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(opts.result).write_text(json.dumps(result))
        from lmms_engine.launch.cli import finish_distributed

        finish_distributed()
        return 0
    if opts.warmup >= opts.steps:
        parser.error(f"--warmup ({opts.warmup}) must be below --steps ({opts.steps})")
    cuda = torch.cuda.is_available() and not opts.cpu
    size = "real" if cuda else "cpu"
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    from lmms_engine.train.throughput import peak_flops

    if cuda:
        peak = peak_flops("cuda", opts.peak_tflops)
        if peak is None:
            parser.error(f"unknown peak for {torch.cuda.get_device_name()}: pass --peak-tflops")
        peak_note = f"{peak / 1e12:.0f} TFLOP/s bf16 dense"
        device = torch.cuda.get_device_name()
    else:
        peak = cpu_peak_flops()
        peak_note = f"{peak / 1e9:.1f} GFLOP/s (measured float32 GEMM, 1 thread)"
        device = "CPU"
    started = time.perf_counter()
    results = {}
    for case in opts.cases:
        results[case] = launch(case, size, opts.steps, out, CASE_TIMEOUT_S if cuda else 900)
        print(case, {k: v for k, v in results[case].items() if k != "times"}, flush=True)
    rows = summarise(results, opts.warmup, peak)
    text = markdown(rows, size, device, peak_note, (time.perf_counter() - started) / 60, opts.steps, opts.warmup)
    print(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    if opts.write:
        print("written to", write_section("gpu_check", text))
    return 1 if any("error" in row for row in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
