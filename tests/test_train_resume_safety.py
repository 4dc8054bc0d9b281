"""Resume that neither trains twice nor resumes wrongly: a finished run resumed trains nothing (and
keeps its weights), weights-only checkpoints are refused for an exact resume, and a damaged newest
checkpoint is passed over for the previous complete one, saying so."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_support import demo_data_dir, subset

from lmms_engine.launch.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return subset(demo_data_dir(tmp_path_factory), 8, tmp_path_factory.mktemp("resume_data"))


def write_config(tmp_path: Path, data: Path, out: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"""\
- type: trainer
  config:
    model_config:
      enable_autoregressive: true
      autoregressive_config: {{embedding_dim: 64, num_heads: 4, num_layers: 1}}
    dataset_config: {{data_path: {data}, max_frames: 4}}
    output_dir: {out}
    per_device_train_batch_size: 2
    logging_steps: 1
    save_steps: 2
    report_to: none
    disable_tqdm: true
    dataloader_num_workers: 0
""")
    return config


def run(config: Path, *sets: str) -> int:
    argv = ["--config", str(config)]
    for item in sets:
        argv += ["--set", item]
    return main(argv)


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    assert run(write_config(tmp, data, out), "max_steps=4") == 0
    return out


def copy_run(finished: Path, tmp_path: Path, data: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, write_config(tmp_path, data, out)


def test_resuming_a_finished_run_trains_nothing_and_says_so(finished, tmp_path, data, capsys, caplog):
    out, config = copy_run(finished, tmp_path, data)
    before = load_file(out / "checkpoint-4" / "model.safetensors")
    (out / "model.safetensors").write_bytes(b"")  # as after a kill during the final save
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="lmms_engine"):
            assert run(config, "max_steps=4", "resume_from_checkpoint=true") == 0
        assert "the run already finished (step 4 of max_steps 4): nothing to train" in caplog.text
        assert "Training finished: 4 optimisation steps" in capsys.readouterr().out
        caplog.clear()
    assert steps(out) == [1, 2, 3, 4]  # no step 5, 6
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    final = load_file(out / "model.safetensors")  # the final model is the finished run's
    assert final.keys() == before.keys() and all((final[k] == before[k]).all() for k in before)
    # raising max_steps continues the run
    assert run(config, "max_steps=5", "resume_from_checkpoint=true") == 0
    assert steps(out) == [1, 2, 3, 4, 5]


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, data, caplog):
    out, config = copy_run(finished, tmp_path, data)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="lmms_engine"):
        assert run(config, "max_steps=4", "resume_from_checkpoint=true") == 0
    assert f"not resuming from {out / 'checkpoint-4'}: model.safetensors is " in caplog.text
    assert "truncated" in caplog.text
    assert steps(out) == [1, 2, 3, 4, 3, 4]  # steps 3-4 trained again from checkpoint-2
    # an explicit path to the damaged checkpoint is a config error before anything loads
    weights.write_bytes(weights.read_bytes()[:100])
    assert run(config, "max_steps=4", f"resume_from_checkpoint={out / 'checkpoint-4'}", ) == 2


def test_weights_only_checkpoints_are_refused_for_an_exact_resume(finished, tmp_path, data, capsys):
    out, config = copy_run(finished, tmp_path, data)
    for folder in out.glob("checkpoint-*"):  # what save_only_model: true writes: no optimizer/scheduler/RNG
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (folder / name).unlink()
    assert run(config, "max_steps=6", "resume_from_checkpoint=true") == 2
    err = capsys.readouterr().err
    assert "config error: " in err and "saved with save_only_model: true" in err
    assert "set model_config.model_name_or_path" in err
    assert run(config, "max_steps=6", f"resume_from_checkpoint={out / 'checkpoint-4'}") == 2
    assert "exact resume is impossible" in capsys.readouterr().err
    assert steps(out) == [1, 2, 3, 4]
