"""Training throughput: engine (autoregressive loss on / off) vs plain transformers, same model and data.

Three cases, each in a fresh subprocess (clean peak memory), same random-weight model and batches:

- ``engine_ar``: ``build_model`` (``LlavaVideoForConditionalGeneration`` + autoregressive module)
  trained by ``AutoregressiveTrainer``;
- ``engine_sft``: the same with ``enable_autoregressive=False``;
- ``hf_baseline``: ``LlavaOnevisionForConditionalGeneration`` from the same config, tower frozen, trained
  by plain ``transformers.Trainer`` (no engine code).

Reported per case: median step time (steps after ``--warmup``), text tokens/s per device, model MFU
(FLOPs from :class:`lmms_engine.train.throughput.ModelFlops`, stated in the output), peak memory
(CUDA ``max_memory_allocated``; on CPU the process's peak RSS), and ratios vs ``hf_baseline`` and
``engine_ar / engine_sft`` (the autoregressive overhead, promised < 1.10), each the median of the
rounds' ratios with its (min-max) over rounds; one round reports no ratio.

Sizes: ``cpu`` (the tiny model, 2 videos x 8 frames at 64 px, float32; about a minute on 2 cores) and
``real`` (SigLIP-so400m + Qwen2-0.5B dimensions, random weights, 1 video x 32 frames at 384, bf16,
SDPA, gradient checkpointing; needs a GPU). ``--check`` builds the real size on the meta device and
prints its FLOPs estimate without training.

Peak: ``--peak-tflops``, default by device name (H100 989, A100 312 dense bf16); on CPU a measured
float32 GEMM peak (2048^3 matmul, best of 5); CPU runs use one thread.

Run: ``python benchmarks/train_throughput.py --size cpu [--steps 30] [--rounds 3] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, spread, write_section  # noqa: E402

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, vision_use_head=False)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=32768)
SIZES: dict[str, dict[str, Any]] = {
    "cpu": dict(tiny={}, frames=8, batch=2, text=32, dtype="float32", checkpointing=False,
                ar={"embedding_dim": 64, "num_hist": 3, "num_heads": 4, "num_layers": 1}),
    "real": dict(tiny={"vision_config": SO400M, "text_config": QWEN2_05B, "vocab_size": 151936},
                 frames=32, batch=1, text=256, dtype="bfloat16", checkpointing=True, ar={}),
}
CASES = ("engine_ar", "engine_sft", "hf_baseline")


def model_config(size: str, autoregressive: bool) -> dict[str, Any]:
    spec = SIZES[size]
    cfg: dict[str, Any] = {"tiny_config": spec["tiny"], "torch_dtype": spec["dtype"], "attn_implementation": "sdpa"}
    if autoregressive:
        cfg.update(enable_autoregressive=True, autoregressive_config=dict(spec["ar"]))
    return cfg


def hf_config(size: str) -> Any:
    from lmms_engine.models.tiny import tiny_llava_config

    return tiny_llava_config(overrides=SIZES[size]["tiny"])


def flops_estimate(size: str, autoregressive: bool) -> Any:
    """The FLOPs estimate, from the config alone (frozen tower, trainable projector)."""
    from lmms_engine.train.throughput import ModelFlops

    config = hf_config(size)
    ar = None
    if autoregressive:
        ar = {"embedding_dim": config.vision_config.hidden_size, **SIZES[size]["ar"]}
    return ModelFlops.from_config(config, autoregressive=ar)


def samples(size: str, engine: bool) -> list[dict[str, torch.Tensor]]:
    """Identical synthetic samples: ``text`` tokens around one video's placeholder run."""
    from lmms_engine.models.layout import VideoLayoutConfig

    spec, config = SIZES[size], hf_config(size)
    vision = config.vision_config
    frames, side = spec["frames"], vision.image_size // vision.patch_size
    video = VideoLayoutConfig().video_token_count(frames, side)
    length = video + spec["text"]
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(spec["batch"] * 2):
        ids = torch.randint(1, min(config.text_config.vocab_size, 500), (length,), generator=gen)
        ids[4:4 + video] = config.video_token_id
        labels = ids.clone()
        labels[:4 + video] = -100
        sample = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels,
                  "pixel_values_videos": torch.randn(frames, 3, vision.image_size, vision.image_size, generator=gen)}
        if engine:
            sample["video_num_frames"] = torch.tensor(frames)
        out.append(sample)
    return out


class StepTimer:
    """``on_step_begin`` -> ``on_step_end`` wall times (CUDA synchronised)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _sync()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                timer.times.append(time.perf_counter() - timer.start)

        self.start = 0.0
        self.times: list[float] = []
        self.callback = _Callback()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(size: str, case: str, steps: int, out_dir: str) -> dict[str, Any]:
    """Train ``steps`` steps of one case in this process and return its measurements."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    spec = SIZES[size]
    engine = case != "hf_baseline"
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=spec["batch"], max_steps=steps,
                             learning_rate=1e-5, logging_steps=max(steps, 1), save_strategy="no", report_to="none",
                             disable_tqdm=True, gradient_checkpointing=spec["checkpointing"],
                             bf16=spec["dtype"] == "bfloat16", use_cpu=not torch.cuda.is_available(),
                             dataloader_num_workers=0)
    data = samples(size, engine) * ((steps * spec["batch"]) // (2 * spec["batch"]) + 1)
    timer = StepTimer()
    if engine:
        from lmms_engine.models.builder import build_model
        from lmms_engine.train.autoregressive_trainer import AutoregressiveTrainer

        model = build_model(model_config(size, case == "engine_ar"))
        trainer: Any = AutoregressiveTrainer(model=model, args=args, train_dataset=data, callbacks=[timer.callback],
                                             enable_autoregressive=case == "engine_ar", plot_loss=False, log_file=None)
    else:
        from transformers import LlavaOnevisionForConditionalGeneration

        config = hf_config(size)
        config.text_config._attn_implementation = "sdpa"
        model = LlavaOnevisionForConditionalGeneration(config).to(getattr(torch, spec["dtype"]))
        model.model.vision_tower.requires_grad_(False)  # the engine's default: frozen SigLIP
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer.callback])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"times": timer.times, "peak_bytes": peak, "loss": losses[-1] if losses else None}


def cpu_peak_flops() -> float:
    """Measured float32 GEMM FLOP/s of this process (2048^3, best of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best


def check_real() -> None:
    """Build the real size on the meta device (no memory) and print its parameter and FLOPs counts."""
    from lmms_engine.models.builder import build_model

    with torch.device("meta"):
        model = build_model(model_config("real", True))
    params = sum(p.numel() for p in model.parameters())
    est = flops_estimate("real", True)
    cfg = hf_config("real")
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    from lmms_engine.models.layout import VideoLayoutConfig

    length = VideoLayoutConfig().video_token_count(32, side) + SIZES["real"]["text"]
    step = length * est.llm_per_token(length) + 32 * est.vision_per_frame() + est.predictor_per_video(32)
    print(f"real size on meta: {params / 1e6:.1f}M parameters, {type(model).__name__}, sequence {length} tokens")
    print(f"FLOPs per step (batch 1): {step / 1e12:.2f} TFLOP; {est.describe()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the three cases (ratios are quoted with their spread over rounds)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--check", action="store_true", help="build the real size on meta and stop")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/train_throughput", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        # One thread: on a shared machine, OpenMP threads waiting on a busy core make step times bimodal.
        torch.set_num_threads(1)
    if opts.check:
        check_real()
        return
    if opts.case:  # child process: one case, JSON on the last line
        print(json.dumps(run_case(opts.size, opts.case, opts.steps, opts.out)))
        return
    if opts.size == "real" and not torch.cuda.is_available():
        parser.error("--size real needs a GPU (use --check to build it on the meta device)")

    from lmms_engine.train.throughput import peak_flops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = peak_flops(device, opts.peak_tflops)
    peak_note = f"{peak / 1e12:.0f} TFLOP/s (by device name or --peak-tflops)" if peak else None
    if peak is None:
        peak = cpu_peak_flops()
        peak_note = f"{peak / 1e9:.1f} GFLOP/s (measured float32 2048^3 GEMM, {torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"

    # Cases alternate over rounds so that load from other processes hits them alike; the timed steps of
    # all rounds are pooled (after each run's warm-up) for the step times, each round's own medians give
    # the ratios (a ratio is quoted with its spread over rounds), the peak memory is the largest of the runs.
    times: dict[str, list[float]] = {case: [] for case in CASES}
    round_medians: list[dict[str, float]] = []
    peaks: dict[str, int] = {case: 0 for case in CASES}
    for _ in range(opts.rounds):
        round_medians.append({})
        for case in CASES:
            proc = subprocess.run([sys.executable, __file__, "--size", opts.size, "--case", case, "--steps",
                                   str(opts.steps), "--out", f"{opts.out}/{case}"], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{case} failed:\n{proc.stderr[-4000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            timed = run["times"][opts.warmup:] or run["times"]
            times[case] += timed
            round_medians[-1][case] = statistics.median(timed)
            peaks[case] = max(peaks[case], run["peak_bytes"])

    spec = SIZES[opts.size]
    batch = samples(opts.size, True)[: spec["batch"]]
    tokens = sum(int(s["attention_mask"].sum()) for s in batch)
    rows = []
    medians = {}
    for case in CASES:
        est = flops_estimate(opts.size, case == "engine_ar")
        step_flops = sum(est.llm_per_token(int(s["attention_mask"].sum())) * int(s["attention_mask"].sum())
                         + spec["frames"] * est.vision_per_frame() + est.predictor_per_video(spec["frames"])
                         for s in batch)
        med = statistics.median(times[case])
        medians[case] = med
        rows.append((case, med, tokens / med, step_flops / med / peak, peaks[case] / 2 ** 20, len(times[case])))
    def ratios(num: str, den: str) -> list[float]:
        return [r[num] / r[den] for r in round_medians]

    lines = [
        f"### {opts.size} size on {device_name}",
        "",
        machine_line(("torch", "transformers", "accelerate")),
        "",
        f"Model: {'tiny config (SigLIP 64 wide, Qwen2 64 wide)' if opts.size == 'cpu' else 'SigLIP-so400m + Qwen2-0.5B dimensions, random weights'}; "
        f"batch {spec['batch']} x {spec['frames']} frames, {tokens // spec['batch']} tokens per sample, {spec['dtype']}, "
        f"SDPA{', gradient checkpointing' if spec['checkpointing'] else ''}. Peak {peak_note}.",
        f"FLOPs counted: {flops_estimate(opts.size, True).describe()}.",
        "",
        f"Ratios: median of the {opts.rounds} rounds' ratios of median step times, (min-max) over rounds.",
        "",
        "| case | median step (s) | tokens/s per device | MFU | peak memory (MiB) | vs hf_baseline | steps timed |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, med, tps, mfu, mem, n in rows:
        vs = spread(ratios(case, "hf_baseline")) if opts.rounds > 1 else "n/a (1 round)"
        lines.append(f"| {case} | {med:.4f} | {tps:.0f} | {mfu:.2%} | {mem:.0f} | {vs} | {n} |")
    overhead = ratios("engine_ar", "engine_sft")
    if opts.rounds > 1:
        verdict = ("below it in every round" if max(overhead) < 1.10 else "above it in every round"
                   if min(overhead) >= 1.10 else "the rounds disagree: inconclusive on this machine")
        lines += ["", f"Autoregressive overhead (engine_ar / engine_sft step time): **{spread(overhead)}** over "
                  f"{opts.rounds} rounds (target < 1.10: {verdict})."]
    else:
        lines += ["", "Autoregressive overhead: not reported, one round gives no spread (use --rounds 3 or more)."]
    if device == "cpu":
        lines.append("Peak memory on CPU is the process's peak RSS (model, data and interpreter included).")
    text = "\n".join(lines)
    print(text)
    if not opts.no_write:
        write_section("train_throughput", "## Training throughput (benchmarks/train_throughput.py)\n\n" + text)


if __name__ == "__main__":
    main()
