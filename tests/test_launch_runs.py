"""The launcher end to end on the tiny model and the demo clips: the guide's two YAML examples as
written, every example config of the repo, the quickstart (shortened) with its summary and resume,
the example script, and the CLI's help and failure behaviour."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest


from lmms_engine.launch.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# The guide's two config examples, verbatim.
GUIDE_BASIC = """\
- type: trainer
  config:
    trainer_type: autoregressive_trainer

    model_config:
      enable_autoregressive: true
      autoregressive_config:
        embedding_dim: 1152
        loss_weight: 0.1
        use_frame_causal_mask: true

    output_dir: "./output/basic_autoregressive"
    per_device_train_batch_size: 2
"""
GUIDE_FULL = """\
- type: trainer
  config:
    trainer_type: autoregressive_trainer

    model_config:
      enable_autoregressive: true
      autoregressive_config:
        embedding_dim: 1152
        num_hist: 3
        loss_weight: 0.1
        num_heads: 8
        num_layers: 3
        use_frame_causal_mask: true
        enable_multiscale_pooling: true
        mm_spatial_pool_stride: 2
        mm_spatial_pool_mode: "average"
        add_faster_video: true

    output_dir: "./output/llava_next_style"
    per_device_train_batch_size: 2
"""
SHORT = ["max_steps=2", "logging_steps=1", "save_steps=2", "report_to=none", "disable_tqdm=true"]


def run_cli(config: Path, sets: list[str], capsys) -> tuple[int, str]:
    argv = ["--config", str(config)]
    for item in sets:
        argv += ["--set", item]
    code = main(argv)
    return code, capsys.readouterr().out


def logged(output_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return [e for e in lines if "loss" in e]


def assert_consistent_losses(entries: list[dict]) -> None:
    assert entries
    for e in entries:
        assert e["main_loss"] + e["autoregressive_loss"] == pytest.approx(e["total_loss"], rel=1e-6)
        assert e["total_loss"] == pytest.approx(e["loss"], rel=1e-5)


@pytest.mark.parametrize("text", [GUIDE_BASIC, GUIDE_FULL], ids=["basic", "llava_next"])
def test_guide_yaml_examples_run_once_model_and_data_are_named(text, data_dir, tmp_path, capsys):
    """The model is the tiny one (no model_name_or_path), whose SigLIP is 64 wide: embedding_dim must
    say so (the guide's 1152 is SigLIP-so400m's); the dataset is the demo data."""
    config = tmp_path / "guide.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    code, stdout = run_cli(config, [f"dataset_config.data_path={data_dir / 'train.json'}",
                                    "model_config.autoregressive_config.embedding_dim=64",
                                    f"output_dir={out}", *SHORT], capsys)
    assert code == 0
    assert_consistent_losses(logged(out))
    assert f"checkpoint   {out / 'checkpoint-2'}" in stdout
    saved = json.loads((out / "config.json").read_text())
    if text is GUIDE_FULL:  # enable_multiscale_pooling set the model's layout
        assert saved["video_layout"]["mm_spatial_pool_mode"] == "average"
        assert saved["video_layout"]["add_faster_video"] is True
        assert saved["autoregressive_config"]["num_layers"] == 3
    else:
        assert saved["video_layout"]["mm_spatial_pool_mode"] == "bilinear"  # HF LLaVA-OneVision's own


@pytest.mark.parametrize("relative", ["examples/config_basic_autoregressive.yaml",
                                      "examples/config_llava_next_autoregressive.yaml",
                                      "configs/llava_ov_fast_slow_autoregressive.yaml"])
def test_example_configs_run(relative, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_cli(REPO / relative, [f"demo_data.output_dir={data_dir}",
                                        f"dataset_config.data_path={data_dir / 'train.json'}",
                                        f"output_dir={out}", *SHORT], capsys)
    assert code == 0
    entries = logged(out)
    assert_consistent_losses(entries)
    if "fast_slow" in relative:
        assert all("ar_fast_loss" in e and "ar_slow_loss" in e for e in entries)
        assert entries[-1]["autoregressive_loss"] == pytest.approx(
            (entries[-1]["ar_fast_loss"] + entries[-1]["ar_slow_loss"]) / 2, rel=1e-5)


def test_sft_trainer_type_trains_without_the_autoregressive_loss(data_dir, tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(f"- type: trainer\n  config:\n    trainer_type: sft\n    model_config: {{}}\n"
                      f"    dataset_config: {{data_path: {data_dir / 'train.json'}}}\n")
    out = tmp_path / "run"
    code, stdout = run_cli(config, [f"output_dir={out}", *SHORT], capsys)
    assert code == 0 and "autoregressive loss off" in stdout
    for entry in logged(out):
        assert "autoregressive_loss" not in entry and entry["main_loss"] == pytest.approx(entry["total_loss"])


def test_quickstart_shortened_summary_outputs_and_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "quickstart"
    sets = [f"demo_data.output_dir={data_dir}", "demo_data.num_train=64", "demo_data.num_eval=16",
            f"dataset_config.data_path={data_dir / 'train.json'}",
            f"dataset_config.eval_data_path={data_dir / 'eval.json'}", f"output_dir={out}",
            "max_steps=6", "logging_steps=2", "save_steps=3", "eval_steps=3", "dataloader_num_workers=0",
            f"evaluate.checkpoint={out}", f"evaluate.data_path={data_dir / 'eval.json'}",
            f"evaluate.output_dir={out / 'eval'}", "evaluate.max_samples=4"]
    code, stdout = run_cli(REPO / "examples" / "quickstart.yaml", sets, capsys)
    assert code == 0
    assert "Evaluation of " in stdout and "verdict      answers: " in stdout  # the short built-in evaluation
    for line in (f"output dir   {out}", f"checkpoint   {out / 'checkpoint-6'}", f"loss plot    {out / 'loss_curve.png'}",
                 f"log file     {out / 'train_log.jsonl'}", "Training finished: 6 optimisation steps"):
        assert line in stdout
    assert (out / "loss_curve.png").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "checkpoint-3" / "trainer_state.json").is_file()
    for folder in (out, out / "checkpoint-3"):  # what AutoProcessor.from_pretrained reads
        for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
            assert (folder / name).is_file(), folder / name
    assert_consistent_losses(logged(out))
    evals = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert len(evals) == 2 and all(e["eval_main_loss"] + e["eval_autoregressive_loss"]
                                   == pytest.approx(e["eval_total_loss"], rel=1e-6) for e in evals)

    code, stdout = run_cli(REPO / "examples" / "quickstart.yaml",
                           sets + ["max_steps=8", "resume_from_checkpoint=true"], capsys)
    assert code == 0 and f"(resumed from {out / 'checkpoint-6'})" in stdout
    steps = [e["step"] for e in logged(out)]
    assert steps == [2, 4, 6, 8]  # the resumed run appends steps 7-8 to the same log


def test_example_script_runs(data_dir, tmp_path, capsys):
    out = tmp_path / "script"
    argv = ["--data", str(data_dir / "train.json"), "--max-steps", "2", "--output-dir", str(out)]
    namespace = runpy.run_path(str(REPO / "examples" / "train_with_autoregressive.py"), run_name="example")
    trainer = namespace["main"](argv)
    stdout = capsys.readouterr().out
    assert "autoregressive module loaded\nloss weight: 0.1\nmulti-scale pooling: False" in stdout
    assert trainer.state.global_step == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_help_is_light_and_a_bad_config_fails_before_any_model_loads(tmp_path):
    probe = ("import sys\nfrom lmms_engine.launch.cli import main\n"
             "try:\n    code = main(sys.argv[1:] if len(sys.argv) > 1 else {argv!r})\n"
             "except SystemExit as exit:\n    code = exit.code\n"
             "print('RESULT', code, 'torch' in sys.modules, 'lmms_engine.models.llava_video' in sys.modules)\n")
    shown = _python(probe.format(argv=["--help"]), tmp_path)
    assert "docs/config.md" in shown.stdout and "--set KEY=VALUE" in shown.stdout
    assert "RESULT 0 False False" in shown.stdout  # --help imports neither torch nor models

    bad = tmp_path / "bad.yaml"
    bad.write_text("- type: trainer\n  config:\n    model_config: {enable_autoregressive: true}\n"
                   "    dataset_config: {data_path: missing.json}\n    learning_rat: 1.0e-4\n")
    failed = _python(probe.format(argv=["--config", str(bad)]), tmp_path)
    assert "RESULT 2 " in failed.stdout and failed.stdout.strip().endswith("False")  # no model module loaded
    assert "config error: " in failed.stderr and "unknown key 'learning_rat' (did you mean 'learning_rate'?)" \
        in failed.stderr


def test_dry_run_prints_the_resolved_blocks(tmp_path, capsys):
    code = main(["--config", str(REPO / "examples" / "quickstart.yaml"), "--dry-run",
                 "--set", f"output_dir={tmp_path}"])
    stdout = capsys.readouterr().out
    assert code == 0 and "3 block(s), config OK" in stdout and "autoregressive loss: on" in stdout
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_a_pipeline_trains_then_evaluates_the_model_it_trained(data_dir, tmp_path, capsys):
    """A trainer block followed by an evaluate block naming its output_dir: the evaluation reads the
    freshly trained model and writes results for every held-out record."""
    out = tmp_path / "run"
    config = tmp_path / "train_eval.yaml"
    config.write_text(f"""\
- type: trainer
  config:
    model_config:
      enable_autoregressive: true
      autoregressive_config: {{embedding_dim: 64, num_heads: 4, num_layers: 1}}
    dataset_config: {{data_path: {data_dir / 'train.json'}, max_frames: 4}}
    output_dir: {out}
    per_device_train_batch_size: 2
- type: evaluate
  config:
    checkpoint: {out}
    data_path: {data_dir / 'eval.json'}
    dataset_config: {{data_path: {data_dir / 'eval.json'}, max_frames: 4}}
    max_samples: 6
    batch_size: 3
    progress: false
""")
    assert main(["--config", str(config), *[f"--set={s}" for s in SHORT]]) == 0
    results = json.loads((out / "eval" / "eval_results.json").read_text())
    assert results["num_samples"] == 6
    assert results["accuracy"]["overall"]["num_samples"] == 6
    assert results["reconstruction"]["full_history"]["windows"] == 6  # one full-history window per clip
    assert len((out / "eval" / "predictions.jsonl").read_text().splitlines()) == 6
    printed = capsys.readouterr().out
    assert "Training finished" in printed and f"Evaluation of {out}" in printed


def test_an_evaluate_block_with_a_misspelled_key_fails_before_training(tmp_path, capsys):
    config = tmp_path / "bad_eval.yaml"
    config.write_text("- type: evaluate\n  config: {checkpoint: x, batch_sise: 2}\n")
    assert main(["--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "batch_sise" in err and "did you mean 'batch_size'" in err


def test_demo_data_is_reused_only_when_made_by_the_same_settings_and_generator(tmp_path):
    from lmms_engine.data.demo import DEMO_MARKER, DemoDataConfig, ensure_demo_data

    config = DemoDataConfig(output_dir=str(tmp_path / "data"), num_train=2, num_eval=1)
    assert ensure_demo_data(config) is True
    assert ensure_demo_data(config) is False  # same settings, same generator: reused
    marker = tmp_path / "data" / DEMO_MARKER
    settings = json.loads(marker.read_text())
    settings["generator_version"] -= 1  # as written by an older generator
    marker.write_text(json.dumps(settings))
    assert ensure_demo_data(config) is True
    assert json.loads(marker.read_text())["generator_version"] == settings["generator_version"] + 1


def test_a_run_with_broken_videos_skips_them_and_reports_each_file(data_dir, tmp_path, capsys):
    records = json.loads((data_dir / "train.json").read_text())[:6]
    for record in records:
        record["video"] = str(data_dir / record["video"])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)  # an mp4 header, then junk
    records[2]["video"] = str(broken)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    config = tmp_path / "skip.yaml"
    config.write_text(f"- type: trainer\n  config:\n    trainer_type: sft\n    model_config: {{}}\n"
                      f"    dataset_config: {{data_path: {data}, on_bad_record: skip}}\n")
    out = tmp_path / "run"
    code, stdout = run_cli(config, [f"output_dir={out}", "max_steps=3", "per_device_train_batch_size=2",
                                    "logging_steps=1", "save_steps=100", "report_to=none", "disable_tqdm=true"],
                           capsys)
    assert code == 0 and f"data report  {out / 'data_report.json'}" in stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report["num_records"] == 6 and report["counts"] == {"broken_video": 1}
    assert [entry["video"] for entry in report["records"]] == [str(broken)]
