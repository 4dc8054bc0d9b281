"""Batches with and without video on 2 CPU ranks (gloo): no rank waits on a vision forward that another
rank skipped, and the result equals one process training on the same data.

DDP, through the real trainer under torchrun: records ``T V V T`` (T = text-only, V = video) with
``train_sampling_strategy: sequential`` and 1 sample per device. accelerate's ``BatchSamplerShard``
hands batch ``i`` to rank ``i % 2``, so every step pairs a text-only rank with a video rank, and each
rank takes both roles (step 1: rank 0 text, rank 1 video; step 2: the reverse; then again). The ranks
log the ``video_num_frames`` of every batch they trained on, and the test checks that pairing.
``ddp_find_unused_parameters: false`` (DDP's fast path), so any parameter one rank's backward skipped
would stall or break the gradient reduction.

FSDP2 (``fully_shard`` on the vision tower layers, the LM layers and the root): the HF Trainer enables
FSDP only on accelerators, so the model is driven directly; rank 0 trains on a text-only batch and
rank 1 on a video batch. FSDP averages the gradients over ranks, so the reference is one process
stepping on the mean of the two batches' losses, with SGD (sensitive to any gradient scale error).

Runs are judged by the files they write (gloo occasionally aborts while tearing down after the work is
done); a hang would hit the subprocess timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixed_support import mixed_records
from train_support import AR_SMALL, demo_data_dir, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240
MAX_STEPS = 4
LR = 1e-3

DDP_SCRIPT = """\
import json, os, sys
import torch
from lmms_engine.launch.cli import finish_distributed
from lmms_engine.launch.config import load_pipeline_config
from lmms_engine.launch.pipeline import prepare_trainer

names, folder, out, batch = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
rank = int(os.environ.get("RANK", "0"))
for name in names:
    run_out = os.path.join(out, name)
    pipeline = load_pipeline_config(os.path.join(folder, name + ".json"),
                                    [f"output_dir={run_out}", f"per_device_train_batch_size={batch}"])
    trainer = prepare_trainer(pipeline.of_type("trainer")[0]).trainer
    seen = []
    real_step = trainer.training_step

    def training_step(model, inputs, *args, _real=real_step, _trainer=trainer, _seen=seen, **kwargs):
        _seen.append([_trainer.state.global_step + 1, inputs["video_num_frames"].tolist()])
        return _real(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    torch.save({"initial": initial, "final": trainer.model.state_dict()}, os.path.join(run_out, f"weights_rank{rank}.pt"))
    with open(os.path.join(run_out, f"batches_rank{rank}.json"), "w") as handle:
        json.dump(seen, handle)
    if rank == 0:
        with open(os.path.join(run_out, "history.json"), "w") as handle:
            json.dump(trainer.state.log_history, handle)
finish_distributed()
"""

FSDP_SCRIPT = """\
import datetime, os, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import set_seed

sys.path.insert(0, sys.argv[1])
from model_support import video_batch
from lmms_engine.models.builder import build_model

out = sys.argv[2]
variants = sys.argv[3].split(",")
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
AR = {"num_hist": 2, "num_heads": 4, "num_layers": 1}
COPY = {"enable_autoregressive": True, "freeze_vision_tower": False,
        "autoregressive_config": dict(AR, target_encoder="copy")}
CONFIGS = {
    "projector": {"enable_autoregressive": True, "autoregressive_config": AR},
    "vision_tower": COPY,
    "eval_forward": {"enable_autoregressive": True, "autoregressive_config": AR},
    "language_model_only": {"enable_autoregressive": True, "freeze_projector": True, "autoregressive_config": AR},
    "sharded_target_encoder": COPY,
}


def build(name):
    set_seed(0)
    return build_model(CONFIGS[name])


def layers(module):
    return [m for m in module.modules() if type(m).__name__ in ("SiglipEncoderLayer", "Qwen2DecoderLayer")]


for name in variants:
    reference = build(name)
    text = video_batch(reference, [0], max_frames=4, seed=1)
    text.pop("pixel_values_videos")  # as the collator does for a batch without video
    batches = [text, video_batch(reference, [4], max_frames=4, seed=2)]
    model = build(name)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # The tower's and the LLM's layers (and, for one variant, the target encoder copy's), then the root.
    sharded = layers(model.model)
    if name == "sharded_target_encoder":
        sharded += layers(model.autoregressive_module.target_encoder)
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    result = {"initial": initial}
    if name == "eval_forward":
        reference.eval(); model.eval()
        with torch.no_grad():
            result["expected_losses"] = [reference(**b).loss for b in batches]
            result["loss"] = model(**batches[rank]).loss
    else:
        ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            ref_opt.zero_grad()
            ((reference(**batches[0]).loss + reference(**batches[1]).loss) / 2).backward()
            ref_opt.step()
            opt.zero_grad()
            model(**batches[rank]).loss.backward()
            opt.step()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    result.update(final=full, expected=reference.state_dict())
    torch.save(result, os.path.join(out, f"{name}_rank{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
"""


class Torchrun:
    """``torchrun --nproc_per_node=2 script args`` started in the background (the DDP and FSDP runs and
    this process's single-process runs overlap); :meth:`wait` kills the whole process group on timeout."""

    def __init__(self, script: Path, args: list[str]) -> None:
        self.command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script), *args]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        self.result: subprocess.CompletedProcess | str | None = None

    def wait(self) -> subprocess.CompletedProcess | str:
        if self.result is None:
            try:
                stdout, stderr = self.process.communicate(timeout=TIMEOUT_S)
                self.result = subprocess.CompletedProcess(self.command, self.process.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.communicate()
                self.result = f"no result within {TIMEOUT_S} s (a rank hangs?)"
        return self.result


def _tail(ran: subprocess.CompletedProcess | str) -> str:
    return ran if isinstance(ran, str) else ran.stderr[-3000:]


# ------------------------------------------------------------------------------------------ runs
DDP_RUNS = {
    # frozen tower shared as the target encoder; projector, image_newline, LLM and predictor train
    "projector": {"enable_autoregressive": True, "autoregressive_config": AR_SMALL},
    # the tower trains too; the target encoder is a frozen copy
    "vision_tower": {"enable_autoregressive": True, "freeze_vision_tower": False,
                     "autoregressive_config": dict(AR_SMALL, target_encoder="copy")},
}
VISUAL = {"projector": ("model.multi_modal_projector.", "model.image_newline"),
          "vision_tower": ("model.multi_modal_projector.", "model.image_newline", "model.vision_tower.encoder.")}


# FSDP variants (FSDP_SCRIPT's CONFIGS). The last three need the text-only rank to run the sharded
# vision forwards anyway: evaluation, a frozen tower under a trainable LM only, and a sharded target
# encoder copy (a skipped all-gather would meet a different collective: gloo aborts, NCCL hangs).
FSDP_VARIANTS = ["projector", "vision_tower", "eval_forward", "language_model_only", "sharded_target_encoder"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both torchrun jobs, started together: {"ddp": (Torchrun, folder), "fsdp": (Torchrun, folder)}."""
    data_dir = demo_data_dir(tmp_path_factory)
    folder = tmp_path_factory.mktemp("mixed_fsdp")
    script = folder / "fsdp_mixed.py"
    script.write_text(FSDP_SCRIPT)
    fsdp_run = Torchrun(script, [str(TESTS), str(folder), ",".join(FSDP_VARIANTS)])
    ddp_folder = tmp_path_factory.mktemp("mixed_ddp")
    ddp_run = _start_ddp(data_dir, ddp_folder)
    yield {"ddp": (ddp_run, ddp_folder), "fsdp": (fsdp_run, folder)}
    for run in (ddp_run, fsdp_run):
        run.wait()


def _start_ddp(data_dir: Path, folder: Path) -> Torchrun:
    records = mixed_records(data_dir, "TVVT", folder / "mixed.json")
    for name, model_config in DDP_RUNS.items():
        (folder / f"{name}.json").write_text(json.dumps([{"type": "trainer", "config": {
            "trainer_type": "autoregressive_trainer", "model_config": model_config,
            "dataset_config": {"data_path": str(records), "max_frames": 4},
            "train_sampling_strategy": "sequential", "ddp_find_unused_parameters": False, "ddp_timeout": 60,
            "max_steps": MAX_STEPS, "learning_rate": LR, "logging_steps": 1, "save_strategy": "no",
            "report_to": "none", "disable_tqdm": True, "seed": 0,
        }}]))
    script = folder / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    return Torchrun(script, [",".join(DDP_RUNS), str(folder), str(folder / "two"), "1"])


# ------------------------------------------------------------------------------------------ DDP
@pytest.fixture(scope="module")
def ddp(launched):
    run, folder = launched["ddp"]
    from lmms_engine.launch.config import load_pipeline_config
    from lmms_engine.launch.pipeline import prepare_trainer

    one: dict[str, tuple[dict, list]] = {}
    for name in DDP_RUNS:  # the single process, here (it starts no interpreter): 2 samples per step
        pipeline = load_pipeline_config(folder / f"{name}.json", [f"output_dir={folder / 'one' / name}",
                                                                   "per_device_train_batch_size=2"])
        trainer = prepare_trainer(pipeline.of_type("trainer")[0]).trainer
        trainer.train()
        one[name] = (trainer.model.state_dict(), [e for e in trainer.state.log_history if "loss" in e])
    return run.wait(), folder / "two", one


@pytest.mark.parametrize("name", list(DDP_RUNS))
def test_ddp_ranks_with_and_without_video_finish_in_step(ddp, name):
    ran, two, one = ddp
    out = two / name
    files = [out / "weights_rank0.pt", out / "weights_rank1.pt", out / "history.json"]
    assert all(p.is_file() for p in files), _tail(ran)
    # Every step paired a text-only rank (0 frames) with a video rank (4 frames), each rank in both roles.
    batches = [json.loads((out / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert batches[0] == [[1, [0]], [2, [4]], [3, [0]], [4, [4]]]
    assert batches[1] == [[1, [4]], [2, [0]], [3, [4]], [4, [0]]]

    rank0, rank1 = (torch.load(out / f"weights_rank{r}.pt") for r in (0, 1))
    for key, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][key]), f"ranks disagree on {key}"
    # The visual parts trained (the video rank's gradient reached them through DDP).
    for prefix in VISUAL[name]:
        moved = [k for k in rank0["final"] if k.startswith(prefix)
                 and not torch.equal(rank0["final"][k], rank0["initial"][k])]
        assert moved, prefix
    # Step 1 starts from the same weights on the same global batch: the language-model loss matches.
    solo_logs = one[name][1]
    dist_logs = [e for e in json.loads((out / "history.json").read_text()) if "loss" in e]
    assert [e["step"] for e in dist_logs] == [e["step"] for e in solo_logs] == list(range(1, MAX_STEPS + 1))
    assert dist_logs[0]["main_loss"] == pytest.approx(solo_logs[0]["main_loss"], rel=1e-5)
    # Throughput is summed over both ranks: one 4-frame video per 2 samples, 2 samples per step.
    from lmms_engine.models.layout import VideoLayoutConfig

    per_video = VideoLayoutConfig().video_token_count(4, 8)  # the tiny tower's 8x8 patch grid
    for entry in dist_logs:
        assert entry["vision_tokens_per_sample"] == per_video / 2


@pytest.mark.parametrize("name", list(DDP_RUNS))
def test_ddp_mixed_batches_equal_one_process_on_the_same_global_batches(ddp, name):
    ran, two, one = ddp
    out = two / name
    assert (out / "history.json").is_file(), _tail(ran)
    single, solo_logs = one[name]
    dist_logs = [e for e in json.loads((out / "history.json").read_text()) if "loss" in e]
    for key in ("main_loss", "autoregressive_loss", "total_loss"):
        assert dist_logs[0][key] == pytest.approx(solo_logs[0][key], rel=1e-5), key
        for d, s in zip(dist_logs[1:], solo_logs[1:]):
            assert d[key] == pytest.approx(s[key], rel=2e-2), key
    # Tolerances of test_train_distributed: Adam moves an element by about lr per step.
    final = torch.load(out / "weights_rank0.pt")["final"]
    total, count = 0.0, 0
    for key, value in final.items():
        difference = (value.float() - single[key].float()).abs()
        assert float(difference.max()) <= 2 * LR * MAX_STEPS, key
        total, count = total + float(difference.sum()), count + difference.numel()
    assert total / count < 1e-5


# ------------------------------------------------------------------------------------------ FSDP
@pytest.fixture(scope="module")
def fsdp(launched):
    run, folder = launched["fsdp"]
    return run.wait(), folder


def _fsdp_result(fsdp, name):
    ran, folder = fsdp
    paths = [folder / f"{name}_rank{r}.pt" for r in (0, 1)]
    assert all(p.is_file() for p in paths), _tail(ran)
    return [torch.load(p) for p in paths]


def _check_fsdp(results, name):
    rank0, rank1 = results
    if name == "eval_forward":
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["loss"], result["expected_losses"][rank], rtol=1e-5, atol=1e-6)
        return
    for key, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][key]), key
        torch.testing.assert_close(value, rank0["expected"][key], rtol=1e-5, atol=1e-6, msg=key)
    moved = {k.split(".")[1] if k.startswith("model.") else k.split(".")[0]
             for k, v in rank0["final"].items() if not torch.equal(v, rank0["initial"][k])}
    trained = {"language_model", "lm_head", "autoregressive_module"}
    if name != "language_model_only":
        trained |= {"multi_modal_projector", "image_newline"}
    if name in ("vision_tower", "sharded_target_encoder"):
        trained.add("vision_tower")
    assert moved == trained


@pytest.mark.parametrize("name", FSDP_VARIANTS)
def test_fsdp_text_only_and_video_ranks_train_like_one_process(fsdp, name):
    _check_fsdp(_fsdp_result(fsdp, name), name)
