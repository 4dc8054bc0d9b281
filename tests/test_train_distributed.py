"""torchrun on CPU (gloo): 2 processes x 1 sample per step against 1 process x 2 samples, same seed.

The ranks must hold identical weights afterwards, and the run must log what the single process logs:
step 1 (same weights, same global batch) to 1e-5 relative; later steps, where the two runs' float
sums differ in order and Adam amplifies the difference, to 2e-2 relative. Final weights: mean absolute
difference below 1e-5, and no element further apart than 2 * lr * steps (Adam moves an element by
about lr per step whatever its gradient's size, so a near-zero gradient whose sign differs between
the two summation orders moves the two copies apart by up to 2 * lr).
The run is judged by its outputs (gloo occasionally aborts while tearing down after training ends).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_support import AR_SMALL, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = """\
import json, os, sys
import torch
from lmms_engine.launch.cli import finish_distributed
from lmms_engine.launch.config import load_pipeline_config
from lmms_engine.launch.pipeline import prepare_trainer

config, out, batch = sys.argv[1:4]
pipeline = load_pipeline_config(config, [f"output_dir={out}", f"per_device_train_batch_size={batch}"])
run = prepare_trainer(pipeline.of_type("trainer")[0])
run.trainer.train()
rank = int(os.environ.get("RANK", "0"))
torch.save(run.trainer.model.state_dict(), os.path.join(out, f"weights_rank{rank}.pt"))
if rank == 0:
    with open(os.path.join(out, "history.json"), "w") as handle:
        json.dump(run.trainer.state.log_history, handle)
finish_distributed()
"""


def _run(command: list[str], out: Path, env: dict) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _single_process(config: Path, out: Path) -> None:
    """The same script's work in this process (saves starting another interpreter)."""
    from lmms_engine.launch.config import load_pipeline_config
    from lmms_engine.launch.pipeline import prepare_trainer

    pipeline = load_pipeline_config(config, [f"output_dir={out}", "per_device_train_batch_size=2"])
    trainer = prepare_trainer(pipeline.of_type("trainer")[0]).trainer
    trainer.train()
    torch.save(trainer.model.state_dict(), out / "weights_rank0.pt")
    (out / "history.json").write_text(json.dumps(trainer.state.log_history))


def _losses(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "history.json").read_text()) if "loss" in e]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps([{"type": "trainer", "config": {
        "trainer_type": "autoregressive_trainer",
        "model_config": {"enable_autoregressive": True, "autoregressive_config": AR_SMALL},
        "dataset_config": {"data_path": str(data_dir / "train.json"), "max_frames": 8},
        "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 3,
        "report_to": "none", "disable_tqdm": True, "seed": 0,
    }}]))
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    # In the test process: the single-process run (it starts no interpreter); torchrun for the two ranks.
    ran = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", str(script), str(config), str(two), "1"], two, env)
    outputs = [two / "weights_rank0.pt", two / "weights_rank1.pt", two / "history.json"]
    assert all(p.is_file() for p in outputs), ran.stderr[-3000:]
    one.mkdir()
    _single_process(config, one)

    rank0 = torch.load(two / "weights_rank0.pt")
    rank1 = torch.load(two / "weights_rank1.pt")
    single = torch.load(one / "weights_rank0.pt")
    total, count = 0.0, 0
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks disagree on {name}"
        difference = (value.float() - single[name].float()).abs()
        assert float(difference.max()) <= 2 * 1e-3 * 3, name
        total, count = total + float(difference.sum()), count + difference.numel()
    assert total / count < 1e-5

    dist, solo = _losses(two), _losses(one)
    assert [e["step"] for e in dist] == [e["step"] for e in solo] == [1, 2, 3]
    for key in ("main_loss", "autoregressive_loss", "total_loss"):
        assert dist[0][key] == pytest.approx(solo[0][key], rel=1e-5), key
        for d, s in zip(dist[1:], solo[1:]):
            assert d[key] == pytest.approx(s[key], rel=2e-2), key
    for entry in dist:
        assert entry["main_loss"] + entry["autoregressive_loss"] == pytest.approx(entry["total_loss"], rel=1e-6)
    # Both ranks' RNG states are in the published checkpoint.
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in (two / "checkpoint-3").iterdir()}
