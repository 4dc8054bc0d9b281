"""Training Qwen-VL through the YAML pipeline: a 2-rank DDP run equals one process with the same global
batch, and a resumed run ends with the weights of the uninterrupted one."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from qwen_support import qwen_records, qwen_trainer_block, tiny_checkpoint
from test_train_distributed import SCRIPT, _losses, _run, _single_process
from train_support import free_port

pytestmark = pytest.mark.filterwarnings("ignore:autoregressive reconstruction.*shorter than num_hist")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return qwen_records(tmp_path_factory.mktemp("qwen_train_data"))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_match_one_process(tmp_path_factory, tmp_path, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps([{"type": "trainer", "config": qwen_trainer_block(checkpoint, records)}]))
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    two, one = tmp_path / "two", tmp_path / "one"
    ran = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                str(script), str(config), str(two), "1"], two, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert (two / "history.json").is_file() and (two / "weights_rank1.pt").is_file(), ran.stderr[-3000:]
    one.mkdir()
    _single_process(config, one)
    rank0, rank1 = torch.load(two / "weights_rank0.pt"), torch.load(two / "weights_rank1.pt")
    single = torch.load(one / "weights_rank0.pt")
    assert any(k.startswith("autoregressive_module.predictor.") for k in rank0)
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks disagree on {name}"
        assert float((value.float() - single[name].float()).abs().max()) <= 2 * 1e-3 * 3, name
    dist, solo = _losses(two), _losses(one)
    assert [e["step"] for e in dist] == [e["step"] for e in solo] == [1, 2, 3]
    for key in ("main_loss", "autoregressive_loss", "total_loss"):
        assert dist[0][key] == pytest.approx(solo[0][key], rel=1e-5), key
    assert dist[0]["autoregressive_loss"] > 0


def test_resume_ends_with_the_uninterrupted_weights(tmp_path_factory, tmp_path, records):
    from lmms_engine.launch.config import load_pipeline_config
    from lmms_engine.launch.pipeline import prepare_trainer

    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen3_vl")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps([{"type": "trainer", "config": qwen_trainer_block(
        checkpoint, records, max_steps=4, save_steps=2, per_device_train_batch_size=1)}]))

    def train(out, *extra):
        pipeline = load_pipeline_config(config, [f"output_dir={out}", *extra])
        run = prepare_trainer(pipeline.of_type("trainer")[0])
        run.trainer.train(resume_from_checkpoint=run.resume)
        return run.trainer

    full = train(tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = train(resumed_dir, "resume_from_checkpoint=true")
    assert resumed.state.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_tiny_example_config_runs(tmp_path_factory, tmp_path, capsys):
    """examples/config_qwen2_5_vl_tiny.yaml through the CLI, shortened, on the session's tiny checkpoint."""
    from test_launch_runs import REPO, SHORT, assert_consistent_losses, logged, run_cli
    from train_support import demo_data_dir

    data_dir = demo_data_dir(tmp_path_factory)
    out = tmp_path / "run"
    code, stdout = run_cli(REPO / "examples" / "config_qwen2_5_vl_tiny.yaml", [
        f"demo_data.output_dir={data_dir}", f"dataset_config.data_path={data_dir / 'train.json'}",
        f"model_config.model_name_or_path={tiny_checkpoint(tmp_path_factory, 'qwen2_5_vl')}", f"output_dir={out}",
        *SHORT], capsys)
    assert code == 0 and "autoregressive loss on" in stdout
    entries = logged(out)
    assert_consistent_losses(entries)
    assert all(e["autoregressive_loss"] > 0 for e in entries)
    # processor files: the image processor loads here (its video twin needs torchvision) and preprocesses
    # as the training did; the tokenizer names the family's processor
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor

    from lmms_engine.data.qwen_vision import QwenVideoProcessing

    assert {"preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and video["size"]["longest_edge"] == 12544
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    saved = AutoImageProcessor.from_pretrained(out)(images=[Image.fromarray(image.permute(1, 2, 0).numpy())],
                                                    return_tensors="pt")
    ours = QwenVideoProcessing.for_model(AutoConfig.from_pretrained(out), min_pixels=3136, max_pixels=12544)
    assert torch.equal(saved["pixel_values"], ours.preprocess_image(image).pixel_values)
