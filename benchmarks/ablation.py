"""Does the autoregressive loss help? The controlled ablation on the generated demo task.

Arms (tiny model, identical data, steps, schedule and hyper-parameters; only the loss changes):

- ``baseline``: ``loss_weight: 0`` (the module is attached but its loss has weight 0, so neither the LLM
  nor the predictor gets any gradient from it; the frame-causal mask then has no effect on training,
  which is why there is no separate "weight 0, mask off" arm: it would train the same model);
- ``ar_causal``: ``loss_weight: 0.1`` (the guide's default), frame-causal mask on;
- ``ar_nomask``: ``loss_weight: 0.1``, mask off (only the last window position is supervised);
- ``ar_sliding``: ``loss_weight: 0.1``, the one-pass predictor (``window: sliding``: every frame
  supervised once through a banded frame-causal mask); the three arms above use ``window: all``.

Each arm trains once per seed (the seed sets initialisation and data order) with the engine's own
launcher (``python -m lmms_engine.launch.cli``, one subprocess per run, one intra-op thread), then:

1. ``run_evaluate`` on the held-out split: greedy answers -> accuracy (overall and per question type),
   and the run's own predictor's next-frame MSE vs copy-last per frame offset;
2. a **probe**: a fresh predictor (same architecture, loss weight 1, mask on) fitted for
   ``--probe-steps`` steps on the frozen LLM hidden states of ``--probe-train`` training clips, then
   measured on the held-out clips. The baseline's own predictor never trained, so the probe is the
   like-for-like comparison: how well the next frame can be read from the LLM's hidden states.

Outputs: per run ``OUT/runs/<arm>_s<seed>/`` (run_config.json, train.log, the model, eval/, result.json); overall
``OUT/summary.json``, the plot (``--plot``, default docs/ablation.png) and the ``ablation`` section of
benchmarks/RESULTS.md. Finished runs are skipped when the script is run again (resumable).

Run: ``python benchmarks/ablation.py`` (defaults = the documented budget; see docs/ablation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS: dict[str, dict[str, Any]] = {
    "baseline": {"loss_weight": 0.0, "use_frame_causal_mask": True, "window": "all"},
    "ar_causal": {"loss_weight": 0.1, "use_frame_causal_mask": True, "window": "all"},
    "ar_nomask": {"loss_weight": 0.1, "use_frame_causal_mask": False, "window": "all"},
    "ar_sliding": {"loss_weight": 0.1, "use_frame_causal_mask": True, "window": "sliding"},
}
#: The launcher config of a run, in its run folder (the trained model's own config.json sits beside it).
RUN_CONFIG = "run_config.json"
PREDICTOR = {"embedding_dim": 64, "num_hist": 3, "num_heads": 4, "num_layers": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/ablation", help="work folder (data, runs, summary)")
    p.add_argument("--arms", nargs="+", default=["baseline", "ar_causal", "ar_nomask"], choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--data-seed", type=int, default=0, help="demo dataset seed (same data for every run)")
    p.add_argument("--num-train", type=int, default=1200)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--question-types", nargs="+", default=["color_change"],
                   help="demo question types (lmms_engine.data.demo.QUESTION_TYPES)")
    p.add_argument("--feature-layer", type=int, default=0,
                   help="tiny tower layer the LLM and the shared target read (0 = patch embeddings)")
    p.add_argument("--max-frames", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--probe-train", type=int, default=192, help="training clips whose hidden states fit the probe")
    p.add_argument("--probe-steps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="training runs at once")
    p.add_argument("--plot", default=str(ROOT / "docs" / "ablation.png"))
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate trained runs again (e.g. after changing the evaluator); no retraining")
    p.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ training
def run_config(args: argparse.Namespace, data: Path, run_dir: Path, arm: str, seed: int) -> list[dict]:
    return [{
        "type": "trainer",
        "config": {
            "trainer_type": "autoregressive_trainer",
            "model_config": {"enable_autoregressive": True,
                             "tiny_config": {"vision_feature_layer": args.feature_layer},
                             "autoregressive_config": {**PREDICTOR, **ARMS[arm]}},
            "dataset_config": {"data_path": str(data / "train.json"), "max_frames": args.max_frames},
            "output_dir": str(run_dir),
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": max(1, args.max_steps // 20),
            "logging_steps": max(1, args.max_steps // 10),
            "save_strategy": "no",
            "dataloader_num_workers": 1,
            "disable_tqdm": True,
            "report_to": "none",
            "seed": seed,
        },
    }]


def start_training(args: argparse.Namespace, data: Path, run_dir: Path, arm: str, seed: int) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)  # a previous run's, with other settings
    config = run_dir / RUN_CONFIG
    config.write_text(json.dumps(run_config(args, data, run_dir, arm, seed), indent=1) + "\n")
    log = open(run_dir / "train.log", "w")  # noqa: SIM115 - closed when the process is reaped
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lmms_engine.launch.cli", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


# ------------------------------------------------------------------------------------------ probe
def probe_reconstruction(args: argparse.Namespace, data: Path, run_dir: Path, seed: int) -> dict[str, Any]:
    """Fit a fresh predictor on the frozen model's hidden states; its held-out per-offset summary."""
    import torch
    from transformers import AutoTokenizer

    from lmms_engine.data.dataset import build_dataset
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.eval.config import EvaluateConfig, load_model
    from lmms_engine.eval.generation import prompt_loader
    from lmms_engine.eval.reconstruction import (
        ReconstructionAccumulator,
        batch_reconstruction_errors,
        video_hidden_states,
    )
    from lmms_engine.models.autoregressive_reconstruction import create_autoregressive_reconstruction_module

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = load_model(EvaluateConfig(checkpoint=str(run_dir), data_path=str(data / "eval.json"), device="cpu"),
                       tokenizer)
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    dataset_config = {"data_path": str(data / "train.json"), "eval_data_path": str(data / "eval.json"),
                      "max_frames": args.max_frames}
    config = {**dict(model.config.autoregressive_config), "loss_weight": 1.0, "use_frame_causal_mask": True}
    torch.manual_seed(seed)
    probe = create_autoregressive_reconstruction_module(model.vision_tower, model.config.text_config.hidden_size,
                                                        config)
    cache = []
    with torch.no_grad():
        for batch in prompt_loader(build_dataset(dataset_config, tokenizer, info, "train"), tokenizer, 32,
                                   limit=args.probe_train):
            hidden, layout = video_hidden_states(model, batch.inputs)
            features = probe.encode_targets(batch.inputs["pixel_values_videos"])
            cache.append((hidden, layout, features))
    optimizer = torch.optim.AdamW(probe.predictor.parameters(), lr=1e-3)
    probe.train()
    for step in range(args.probe_steps):
        hidden, layout, features = cache[step % len(cache)]
        loss = probe.compute_autoregressive_loss(hidden, target_features=features, video_token_layout=layout)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.eval()
    accumulator = ReconstructionAccumulator(probe)
    with torch.no_grad():
        for batch in prompt_loader(build_dataset(dataset_config, tokenizer, info, "eval"), tokenizer, 50):
            videos = int((batch.inputs["video_num_frames"] > 0).sum())
            accumulator.add_batch(batch_reconstruction_errors(model, batch.inputs, probe), videos)
    return accumulator.summary()


# ------------------------------------------------------------------------------------------ one run
def finish_run(args: argparse.Namespace, data: Path, run_dir: Path, arm: str, seed: int) -> dict[str, Any]:
    """Evaluate a trained run and fit its probe; the run's record (also written to result.json)."""
    import torch

    from lmms_engine.eval.config import run_evaluate

    torch.set_num_threads(1)
    tick = time.time()
    results = run_evaluate({
        "checkpoint": str(run_dir), "data_path": str(data / "eval.json"),
        "dataset_config": {"max_frames": args.max_frames}, "output_dir": str(run_dir / "eval"),
        "batch_size": 50, "max_new_tokens": 6, "device": "cpu", "progress": False,
    })
    probe = probe_reconstruction(args, data, run_dir, seed)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    record = {
        "arm": arm, "seed": seed, **ARMS[arm],
        "accuracy": results["accuracy"]["overall"]["accuracy"],
        "chance_accuracy": results["accuracy"]["overall"]["chance_accuracy"],
        "by_question_type": {k: v["accuracy"] for k, v in results["accuracy"]["by_question_type"].items()},
        "own_predictor": results["reconstruction"],
        "probe": probe,
        "train_seconds": state["log_history"][-1].get("train_runtime"),
        "final_main_loss": next((e["main_loss"] for e in reversed(state["log_history"]) if "main_loss" in e), None),
        "eval_seconds": round(time.time() - tick, 1),
    }
    (run_dir / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def report_run(record: dict[str, Any], start: float) -> None:
    k = record["probe"]["full_history"]
    print(f"[{(time.time() - start) / 60:5.1f} min] {record['arm']} seed {record['seed']}: accuracy "
          f"{record['accuracy']:.3f}; offset-3 MSE: own predictor "
          f"{record['own_predictor']['full_history']['mse']:.4f}, "
          f"probe {k['mse']:.4f}, copy-last {k['copy_last_mse']:.4f}, mean target {k['mean_target_mse']:.4f}",
          flush=True)


# ------------------------------------------------------------------------------------------ report
def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def sign_flip_p(differences: list[float]) -> float:
    """Two-sided p-value of an exact paired permutation test: the share of the 2^n sign patterns whose
    mean difference is at least as far from 0 as the observed one (no normality assumed)."""
    import itertools

    observed = abs(statistics.fmean(differences))
    means = [abs(statistics.fmean(d * s for d, s in zip(differences, signs)))
             for signs in itertools.product((1, -1), repeat=len(differences))]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


def paired(records: list[dict], arm: str, metric: Any) -> dict[str, Any] | None:
    """``metric(arm's run) - metric(baseline run)`` per seed both have: spread and sign-flip p."""
    base = {r["seed"]: metric(r) for r in records if r["arm"] == "baseline"}
    diffs = [metric(r) - base[r["seed"]] for r in records if r["arm"] == arm and r["seed"] in base]
    if len(diffs) < 2:
        return None
    return {**spread(diffs), "p": sign_flip_p(diffs), "higher": sum(d > 0 for d in diffs)}


def summarize(records: list[dict]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in records):
        rs = [r for r in records if r["arm"] == arm]
        types = sorted(rs[0]["by_question_type"])
        arms[arm] = {
            "seeds": [r["seed"] for r in rs],
            "accuracy": spread([r["accuracy"] for r in rs]),
            "by_question_type": {t: spread([r["by_question_type"][t] for r in rs]) for t in types},
            "probe_mse": spread([r["probe"]["full_history"]["mse"] for r in rs]),
            "probe_ratio": spread([r["probe"]["full_history"]["ratio"] for r in rs]),
            "own_mse": spread([r["own_predictor"]["full_history"]["mse"] for r in rs]),
            "own_ratio": spread([r["own_predictor"]["full_history"]["ratio"] for r in rs]),
            "copy_last_mse": spread([r["probe"]["full_history"]["copy_last_mse"] for r in rs]),
            "mean_target_mse": spread([r["probe"]["full_history"]["mean_target_mse"] for r in rs]),
            "own_vs_mean_target": spread([r["own_predictor"]["full_history"]["mse"]
                                          / r["probe"]["full_history"]["mean_target_mse"] for r in rs]),
            "probe_vs_mean_target": spread([r["probe"]["full_history"]["mse"]
                                            / r["probe"]["full_history"]["mean_target_mse"] for r in rs]),
            "final_main_loss": spread([r["final_main_loss"] for r in rs]),
        }
        if arm != "baseline":
            arms[arm]["vs_baseline"] = {
                "accuracy": paired(records, arm, lambda r: r["accuracy"]),
                "probe_ratio": paired(records, arm, lambda r: r["probe"]["full_history"]["ratio"]),
            }
    return {"chance_accuracy": records[0]["chance_accuracy"], "arms": arms}


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(args: argparse.Namespace, summary: dict, records: list[dict]) -> str:
    arms = summary["arms"]
    types = sorted(next(iter(arms.values()))["by_question_type"])
    lines = [
        "## Ablation: autoregressive loss on the demo task (tiny model)",
        "",
        machine_line(),
        "Command: `" + " ".join(["python benchmarks/ablation.py"]
                                + [a for a in sys.argv[1:] if a != "--reevaluate"]) + "`",
        f"{args.num_train} training / {args.num_eval} held-out clips (question types "
        f"{', '.join(args.question_types)}; data seed {args.data_seed}), tiny tower feature layer "
        f"{args.feature_layer}, "
        f"{args.max_steps} steps x batch {args.batch_size}, lr {args.learning_rate} cosine, {args.max_frames} "
        f"frames; probe: {args.probe_steps} steps on {args.probe_train} clips; trainer runtime "
        f"{sum(r['train_seconds'] or 0 for r in records) / 60:.1f} min over {len(records)} runs, evaluation "
        f"{sum(r['eval_seconds'] for r in records) / 60:.1f} min (--jobs {args.jobs}). "
        "Values: mean ± sample std (min–max) over seeds.",
        "",
        f"| arm | seeds | held-out accuracy (chance {summary['chance_accuracy']:.3f}) | "
        + " | ".join(types) + " | final main loss |",
        "|---|---|" + "---|" * (len(types) + 2),
    ]
    for arm, a in arms.items():
        lines.append(f"| {arm} | {len(a['seeds'])} | {fmt(a['accuracy'])} | "
                     + " | ".join(fmt(a["by_question_type"][t], 2) for t in types)
                     + f" | {fmt(a['final_main_loss'])} |")
    lines += ["", "Next-frame reconstruction at frame offset 3 (held-out; MSE ratios, lower is better; copy-last "
              "and mean-target MSE depend on the seed's random frozen tower, hence the ratios):", "",
              "| arm | probe / copy-last | probe / mean target | own predictor / copy-last | "
              "own predictor / mean target |", "|---|---|---|---|---|"]
    for arm, a in arms.items():
        lines.append(f"| {arm} | {fmt(a['probe_ratio'], 2)} | {fmt(a['probe_vs_mean_target'], 2)} | "
                     f"{fmt(a['own_ratio'], 2)} | {fmt(a['own_vs_mean_target'], 2)} |")
    compared = [(arm, a["vs_baseline"]) for arm, a in arms.items() if a.get("vs_baseline", {}).get("accuracy")]
    if compared:
        lines += ["", "Against the baseline, paired by seed (same initialisation and data order): the per-seed "
                  "difference, how many seeds are higher, and the two-sided p-value of an exact sign-flip "
                  "permutation test:", "",
                  "| arm | accuracy − baseline | seeds higher | p | probe ratio − baseline | seeds higher | p |",
                  "|---|---|---|---|---|---|---|"]
        for arm, v in compared:
            acc, probe = v["accuracy"], v["probe_ratio"]
            lines.append(f"| {arm} | {fmt(acc)} | {acc['higher']}/{acc['n']} | {acc['p']:.2f} | "
                         f"{fmt(probe, 2)} | {probe['higher']}/{probe['n']} | {probe['p']:.2f} |")
    lines += ["", "Per run (offset-3 MSE):", "", "| arm | seed | accuracy | probe | own predictor | copy-last | "
              "mean target | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        k = r["probe"]["full_history"]
        lines.append(f"| {r['arm']} | {r['seed']} | {r['accuracy']:.3f} | {k['mse']:.5f} | "
                     f"{r['own_predictor']['full_history']['mse']:.5f} | {k['copy_last_mse']:.5f} | "
                     f"{k['mean_target_mse']:.5f} | {r['train_seconds'] or 0:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, arm in enumerate(arms):
        rs = [r for r in records if r["arm"] == arm]
        a = summary["arms"][arm]
        ax1.errorbar(i, a["accuracy"]["mean"], yerr=a["accuracy"]["std"], fmt="o", capsize=6, color="C0")
        ax1.scatter([i + 0.12] * len(rs), [r["accuracy"] for r in rs], s=12, color="C0", alpha=0.5)
        ax2.errorbar(i - 0.1, a["probe_ratio"]["mean"], yerr=a["probe_ratio"]["std"], fmt="o", capsize=6,
                     color="C1", label="probe (fresh predictor)" if i == 0 else None)
        if arm != "baseline":
            ax2.errorbar(i + 0.1, a["own_ratio"]["mean"], yerr=a["own_ratio"]["std"], fmt="s", capsize=6,
                         color="C2", label="the run's own predictor" if i == 1 else None)
    ax1.axhline(summary["chance_accuracy"], color="grey", ls="--", label="chance (guessing an option)")
    ax1.set_xticks(range(len(arms)), arms)
    ax1.set_ylabel("held-out accuracy")
    ax1.set_title("Answer accuracy (mean ± std over seeds)")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.axhline(1.0, color="grey", ls="--", label="copy-last-frame baseline")
    history = [r["probe"]["full_history"] for r in records]
    constant = statistics.fmean(k["mean_target_mse"] / k["copy_last_mse"] for k in history)
    ax2.axhline(constant, color="grey", ls=":", label="best constant prediction (mean target)")
    ax2.set_xticks(range(len(arms)), arms)
    ax2.set_ylabel("next-frame MSE / copy-last MSE (offset 3)")
    ax2.set_title("Reconstruction (lower is better)")
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.45)  # room for the legend above the points
    ax2.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    data = out / "data"
    from lmms_engine.data.demo import GENERATOR_VERSION, generate_demo_dataset

    settings = {"num_train": args.num_train, "num_eval": args.num_eval, "seed": args.data_seed,
                "question_types": list(args.question_types), "generator_version": GENERATOR_VERSION}
    marker = out / "data_settings.json"  # beside the data: the demo generator refuses files it did not write
    if not (marker.is_file() and json.loads(marker.read_text()) == settings):
        print(f"generating {args.num_train} + {args.num_eval} demo clips in {data}", flush=True)
        generate_demo_dataset(data, args.num_train, args.num_eval, args.data_seed,
                              question_types=args.question_types, progress=False)
        marker.write_text(json.dumps(settings) + "\n")
    runs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seeds outermost: balanced partials

    def is_trained(arm: str, seed: int) -> bool:
        """Trained with exactly this run's config (other settings retrain)."""
        run_dir = out / "runs" / f"{arm}_s{seed}"
        config = run_dir / RUN_CONFIG
        return ((run_dir / "model.safetensors").is_file() and config.is_file()
                and json.loads(config.read_text()) == run_config(args, data, run_dir, arm, seed))

    trained = [(arm, seed) for arm, seed in runs if is_trained(arm, seed)]
    evaluate = [(arm, seed) for arm, seed in trained
                if args.reevaluate or not (out / "runs" / f"{arm}_s{seed}" / "result.json").is_file()]
    print(f"{len(runs)} runs: {len(trained)} trained, {len(evaluate)} of them to evaluate", flush=True)
    for arm, seed in evaluate:
        report_run(finish_run(args, data, out / "runs" / f"{arm}_s{seed}", arm, seed), start)
    running: list[tuple[subprocess.Popen, str, int]] = []
    pending = [run for run in runs if run not in trained]
    while pending or running:
        while pending and len(running) < args.jobs:
            arm, seed = pending.pop(0)
            running.append((start_training(args, data, out / "runs" / f"{arm}_s{seed}", arm, seed), arm, seed))
            print(f"[{(time.time() - start) / 60:5.1f} min] training {arm} seed {seed}", flush=True)
        finished = [r for r in running if r[0].poll() is not None]
        if not finished:
            time.sleep(2)
            continue
        for proc, arm, seed in finished:
            running.remove((proc, arm, seed))
            proc.log.close()  # type: ignore[attr-defined]
            run_dir = out / "runs" / f"{arm}_s{seed}"
            if not (run_dir / "model.safetensors").is_file():
                print(f"training {arm} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'train.log'}",
                      flush=True)
                continue
            report_run(finish_run(args, data, run_dir, arm, seed), start)
    records = [json.loads((out / "runs" / f"{arm}_s{seed}" / "result.json").read_text()) for arm, seed in runs
               if (out / "runs" / f"{arm}_s{seed}" / "result.json").is_file()]
    if not records:
        print("no finished runs", flush=True)
        return 1
    summary = summarize(records)
    wall = time.time() - start
    (out / "summary.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1) + "\n")
    plot(summary, records, Path(args.plot))
    report = markdown(args, summary, records)
    print(f"this invocation: {wall / 60:.1f} min wall", flush=True)
    print(report, flush=True)
    if not args.no_write:
        print(f"wrote {write_section('ablation', report)}", flush=True)
    print(f"plot: {args.plot}; summary: {out / 'summary.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
