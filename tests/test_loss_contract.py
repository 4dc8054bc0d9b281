"""The loss contract: one optimisation step's objective does not depend on how its samples are split.

The real trainer takes the same two steps (videos of 6 and 3 frames; a text-only sample and a 4-frame
video; autoregressive loss_weight 1.0) as batch 2, as 2 micro-batches of 1 (gradient accumulation) and
as 2 ranks x batch 1 (torchrun, gloo). The gradients before each optimiser step must agree, and the
logged components must satisfy main + autoregressive == total == HF's loss in every split.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loss_contract_run import AUTOREGRESSIVE, FRAMES, run, samples
from train_support import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 180


def _result(folder: Path) -> dict:
    return torch.load(folder / "result.pt")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """{split name: result}; the 2-rank run starts first and overlaps the single-process runs."""
    ranks_out = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(TESTS / "loss_contract_run.py"), str(ranks_out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    results = {}
    for name, batch, accumulation in (("batch 2", 2, 1), ("2 x batch 1", 1, 2)):
        out = tmp_path_factory.mktemp(name.replace(" ", "_"))
        run(batch, accumulation, out)
        results[name] = _result(out)
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        stderr = f"no result within {TIMEOUT_S} s (a rank hangs?)"
    assert (ranks_out / "result.pt").is_file(), stderr[-3000:]
    results["2 ranks x batch 1"] = _result(ranks_out)
    return results


def test_the_data_mixes_unequal_videos_and_a_text_only_sample():
    assert FRAMES[0] != FRAMES[1] and 0 in FRAMES and AUTOREGRESSIVE["loss_weight"] == 1.0


@pytest.mark.parametrize("split", ["2 x batch 1", "2 ranks x batch 1"])
def test_step_gradients_do_not_depend_on_the_split(splits, split):
    reference, other = splits["batch 2"]["grads"], splits[split]["grads"]
    assert len(reference) == len(other) == 2
    for step, (want, got) in enumerate(zip(reference, other), start=1):
        assert want.keys() == got.keys()
        assert any(k.startswith("autoregressive_module.") for k in want)
        for name in want:
            scale = float(want[name].abs().max())
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * scale + 1e-12,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")


@pytest.mark.parametrize("split", ["batch 2", "2 x batch 1", "2 ranks x batch 1"])
def test_logged_components_add_up_to_the_trainers_loss(splits, split):
    logs = splits[split]["logs"]
    assert [e["step"] for e in logs] == [1, 2]
    for entry, want in zip(logs, splits["batch 2"]["logs"]):
        assert entry["main_loss"] + entry["autoregressive_loss"] == pytest.approx(entry["total_loss"], rel=1e-6)
        assert entry["total_loss"] == pytest.approx(entry["loss"], rel=1e-5)
        for key in ("main_loss", "autoregressive_loss", "ar_mse", "ar_copy_last_mse"):
            assert entry[key] == pytest.approx(want[key], rel=1e-5), key


def test_step_objective_is_the_token_mean_of_both_terms(splits):
    """The logged step values equal the raw sums of the four samples, each term divided by its units."""
    from transformers import set_seed

    from lmms_engine.models.builder import build_model
    from lmms_engine.train.autoregressive_trainer import calibrate_autoregressive_targets

    set_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": AUTOREGRESSIVE})
    data = samples(model)
    calibrate_autoregressive_targets(model, data)  # as the trainer does before its first step
    with torch.no_grad():
        terms = [model(**{k: v[None] for k, v in s.items()}).loss_terms for s in data]
    for step, entry in enumerate(splits["batch 2"]["logs"]):
        pair = terms[2 * step: 2 * step + 2]
        lm = sum(float(t.language_model.total) for t in pair) / sum(int(t.language_model.count) for t in pair)
        ar_count = sum(int(t.autoregressive["all"].count) for t in pair)
        ar = sum(float(t.autoregressive["all"].total) for t in pair) / ar_count
        assert ar_count > 0 and all(int(t.autoregressive["all"].count) != int(pair[0].autoregressive["all"].count)
                                    for t in pair[1:])
        assert entry["main_loss"] == pytest.approx(lm, rel=1e-5)
        assert entry["autoregressive_loss"] == pytest.approx(AUTOREGRESSIVE["loss_weight"] * ar, rel=1e-5)


def test_stream_metrics_average_only_over_steps_with_targets(tmp_path):
    """Fast/slow streams: step 1 (6- and 3-frame videos) has slow-stream targets (frames 0 and 4 of the
    6-frame video), step 2 (text-only, 4 frames) has none. Logged over a window of both steps,
    ar_slow_loss is step 1's value (not pulled halfway to 0), ar_fast_loss the mean of both steps', and
    the objective's parts still add up to HF's loss."""
    streams = {"use_fast_slow_frames": True, "num_fast": 3, "fast_stride": 1, "num_slow": 2, "slow_stride": 4}
    per_step, window = tmp_path / "per_step", tmp_path / "window"
    run(2, 1, per_step, autoregressive=streams, logging_steps=1)
    run(2, 1, window, autoregressive=streams, logging_steps=2)
    steps, (logged,) = _result(per_step)["logs"], _result(window)["logs"]
    assert "ar_slow_loss" in steps[0] and "ar_slow_loss" not in steps[1]  # a step without targets logs none
    assert steps[0]["ar_slow_loss"] > 0
    assert logged["ar_slow_loss"] == pytest.approx(steps[0]["ar_slow_loss"], rel=1e-5)
    assert logged["ar_fast_loss"] == pytest.approx((steps[0]["ar_fast_loss"] + steps[1]["ar_fast_loss"]) / 2, rel=1e-5)
    for key in ("main_loss", "autoregressive_loss", "total_loss", "loss"):
        assert logged[key] == pytest.approx((steps[0][key] + steps[1][key]) / 2, rel=1e-5), key
    assert logged["main_loss"] + logged["autoregressive_loss"] == pytest.approx(logged["loss"], rel=1e-5)
