"""A user's first hour: the quickstart learns its task and says so; the command line and the Python
API behave as a newcomer expects."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_learns_its_task_and_its_summary_says_so(tmp_path, monkeypatch, capsys, caplog):
    """The quickstart's own config, shortened (300 steps, 256 training clips): held-out accuracy well
    above chance (1/6), a verdict in plain words, the loss plot, and a re-run that says what it does."""
    from lmms_engine.launch.cli import main
    from lmms_engine.launch.config import load_pipeline_config
    from lmms_engine.launch.pipeline import prepare_trainer

    monkeypatch.chdir(tmp_path)  # the config's output/quickstart paths land here
    overrides = ["max_steps=300", "demo_data.num_train=256", "demo_data.num_eval=48", "save_steps=300",
                 "eval_steps=300", "logging_steps=50"]
    argv = ["--config", str(REPO / "examples" / "quickstart.yaml")]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "output" / "quickstart" / "eval" / "eval_results.json").read_text())
    overall = results["accuracy"]["overall"]
    assert overall["chance_accuracy"] == pytest.approx(1 / 6)
    assert overall["accuracy"] >= 0.5, overall  # measured 0.83 after the full 400 steps
    assert "verdict      answers: learned: accuracy" in out and "well above chance 0.167" in out
    assert "next frame: the predictor" in out
    recon = results["reconstruction"]["all_offsets"]
    assert recon["mse"] < recon["mean_target_mse"]  # the calibrated predictor uses the video
    assert (tmp_path / "output" / "quickstart" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

    # Re-running over the same output: the data is reused and the earlier run's replacement announced.
    from lmms_engine.data.demo import ensure_demo_data

    pipeline = load_pipeline_config(REPO / "examples" / "quickstart.yaml", overrides)
    with caplog.at_level(logging.INFO, logger="lmms_engine.launch.pipeline"):
        assert ensure_demo_data(pipeline.of_type("demo_data")[0]) is False
        prepare_trainer(pipeline.of_type("trainer")[0])
    assert "reusing the demo dataset in output/quickstart/data" in caplog.text
    assert "already holds a run (newest checkpoint checkpoint-300): training starts again from step 0" in caplog.text


def test_demo_data_block_takes_question_types():
    from lmms_engine.data.demo import DemoDataConfig

    assert DemoDataConfig().question_types == ["flash"]
    assert DemoDataConfig(question_types=["direction", "order"]).question_types == ["direction", "order"]
    with pytest.raises(ValueError, match="question_types must be distinct names among direction"):
        DemoDataConfig(question_types=["spin"])


def test_console_script_help_names_itself_and_has_a_version(monkeypatch, capsys):
    from lmms_engine import __version__
    from lmms_engine.launch.cli import build_parser, main

    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/lmms-video", "--help"])
    assert build_parser().format_usage().startswith("usage: lmms-video ")
    monkeypatch.setattr(sys, "argv", ["/somewhere/lmms_engine/launch/cli.py"])
    assert build_parser().format_usage().startswith("usage: python -m lmms_engine.launch.cli ")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lmms-video {__version__}"


_API_PROBE = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
torch.set_num_threads(2)
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.models.builder import build_model
from lmms_engine.train import AutoregressiveTrainer, TrainingArguments
tokenizer = build_tiny_tokenizer()
args = TrainingArguments(output_dir=sys.argv[1], bf16=True, report_to="none", save_strategy="no")
AutoregressiveTrainer(model=build_model({}, tokenizer), args=args, processing_class=tokenizer,
                      enable_autoregressive=False)
print("THREADS", torch.get_num_threads())
"""


def test_python_api_uses_the_launchers_thread_policy_and_warns_about_bf16_on_a_cpu(tmp_path):
    """The guide's section-3 route (TrainingArguments + AutoregressiveTrainer, bf16=True) on a CPU."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    probe = subprocess.run([sys.executable, "-c", _API_PROBE, str(tmp_path)], capture_output=True, text=True,
                           timeout=180, env=env)
    assert "THREADS 1" in probe.stdout, probe.stdout + probe.stderr
    assert "1 intra-op thread per process" in probe.stdout
    assert "bf16=True but no GPU is available" in probe.stdout + probe.stderr
    assert "set bf16=False on a CPU" in probe.stdout + probe.stderr
