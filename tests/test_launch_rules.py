"""Each config rule has one home and one message: the launcher's check (``--dry-run``, before any model
loads) and the place that guards the Python API (a model, a trainer, a dataset built by hand) raise the
same text, naming the key, the value and what would be valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmms_engine.data.dataset import DatasetConfig, open_records
from lmms_engine.data.demo import DemoDataConfig, ensure_demo_data
from lmms_engine.launch.config import check_pipeline
from lmms_engine.models.builder import build_model
from lmms_engine.utils.config import ConfigError

WHERE = "x.yaml: block 0 (trainer).config"


def trainer_block(data: Path, out: Path, **config) -> list[dict]:
    return [{"type": "trainer", "config": {"model_config": {}, "dataset_config": {"data_path": str(data)},
                                           "output_dir": str(out), "report_to": "none", **config}}]


def message(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def test_embedding_dim_against_the_tower_one_message(data, tmp_path):
    ar = {"embedding_dim": 1152}
    checked = message(check_pipeline, trainer_block(data, tmp_path, model_config={"autoregressive_config": ar}),
                      "x.yaml")
    built = message(build_model, {"enable_autoregressive": True, "autoregressive_config": ar})
    rule = ("autoregressive_config.embedding_dim=1152 differs from the vision tower's feature size 64{}: the "
            "targets are the tower's features; set embedding_dim: 64 or remove the key (it defaults to the "
            "tower's width)")
    assert checked == f"{WHERE}.model_config." + rule.format(" of the tiny model")
    assert built == rule.format(" at vision_feature_layer=-1")


def test_fsdp_without_an_accelerator_one_message(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("FSDP runs where there is a GPU")
    from lmms_engine.train import AutoregressiveTrainer, TrainingArguments

    checked = message(check_pipeline, trainer_block(data, tmp_path, fsdp="full_shard"), "x.yaml")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), fsdp="full_shard", report_to="none")
    by_hand = message(AutoregressiveTrainer, model=build_model({}), args=args, enable_autoregressive=False)
    rule = ("fsdp: FSDP through the Trainer needs GPUs (or another accelerator; accelerate does not enable it "
            "for CPU processes, which would silently train with DDP); remove fsdp/fsdp_config to train with DDP")
    assert checked == f"{WHERE}.{rule}" and by_hand == rule


def test_liger_kernel_without_an_accelerator_one_message(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("Liger kernels run where there is a GPU")
    from lmms_engine.train import AutoregressiveTrainer, TrainingArguments

    checked = message(check_pipeline, trainer_block(data, tmp_path, use_liger_kernel=True), "x.yaml")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_liger_kernel=True, report_to="none")
    by_hand = message(AutoregressiveTrainer, model=build_model({}), args=args, enable_autoregressive=False)
    rule = ("use_liger_kernel: Liger kernels are Triton GPU kernels; on this machine (no GPU) they would fail at "
            "the first step: remove use_liger_kernel or set it to false")
    assert checked == f"{WHERE}.{rule}" and by_hand == rule


@pytest.mark.parametrize("key, value, rule", [
    ("video_folder", "nowhere/videos", "video_folder: folder 'nowhere/videos' does not exist"),
    ("image_folder", "nowhere/images", "image_folder: folder 'nowhere/images' does not exist"),
    ("data_path", "nowhere/train.json", "data_path: file 'nowhere/train.json' does not exist"),
    ("data_path", ["{data}", "nowhere/b.json"], "data_path[1]: file 'nowhere/b.json' does not exist"),
])
def test_data_files_exist_one_message(data, tmp_path, key, value, rule):
    value = [v.format(data=data) for v in value] if isinstance(value, list) else value
    dataset = {"data_path": str(data), key: value}
    checked = message(check_pipeline, trainer_block(data, tmp_path, dataset_config=dataset), "x.yaml")
    by_hand = message(open_records, DatasetConfig(**dataset), "train")
    assert by_hand == f"dataset_config.{rule}"
    # the launcher adds where the block is, and for a missing data_path how a demo_data block would help
    hint = " (a demo_data block earlier in the list would generate one)" if value == "nowhere/train.json" else ""
    assert checked == f"{WHERE}.dataset_config.{rule}{hint}"


def test_demo_data_folder_one_message(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    block = [{"type": "demo_data", "config": {"output_dir": str(out)}},
             {"type": "evaluate", "config": {"checkpoint": str(tmp_path)}}]
    checked = message(check_pipeline, block, "x.yaml")
    by_hand = message(ensure_demo_data, DemoDataConfig(output_dir=str(out)))
    rule = (f"output_dir: {str(out)!r} holds files the demo generator did not write (mine.txt); demo data is "
            f"written only into a new or empty folder")
    assert checked.startswith(f"x.yaml: block 0 (demo_data).config.{rule}") and by_hand.startswith(f"demo_data.{rule}")
    assert checked.removeprefix("x.yaml: block 0 (demo_data).config.") == by_hand.removeprefix("demo_data.")
    assert (out / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("trainer_type", ["autoregressive_trainer", "sft"])
@pytest.mark.parametrize("enable", [None, True, False])
def test_the_autoregressive_trainer_gets_its_module(data, tmp_path, trainer_type, enable):
    """The checked block says whether the loss is trained; the model built from it carries the module
    exactly then (so the trainer's own check on the model never fires for a checked config)."""
    model_config = {} if enable is None else {"enable_autoregressive": enable}
    raw = trainer_block(data, tmp_path, trainer_type=trainer_type, model_config=model_config)
    if trainer_type == "sft" and enable:
        assert message(check_pipeline, raw, "x.yaml") == (
            f"{WHERE}: trainer_type 'sft' trains without the autoregressive loss but model_config.enable_autoregressive "
            f"is true; use trainer_type: autoregressive_trainer, or set enable_autoregressive: false")
        return
    (block,) = check_pipeline(raw, "x.yaml").of_type("trainer")
    assert block.trains_autoregressive == (trainer_type == "autoregressive_trainer" and enable is not False)
    if block.trains_autoregressive:
        assert getattr(build_model(block.model_config), "autoregressive_module", None) is not None


def test_multiscale_layout_keys_against_a_built_model_one_message():
    """The layout is resolved by one function for the YAML path and for attaching a module to a model."""
    keys = {"mm_spatial_pool_mode": "bilinear"}
    ar = {"enable_multiscale_pooling": True}
    from_config = message(build_model, {**keys, "autoregressive_config": ar})
    model = build_model(keys)
    from_model = message(model.attach_autoregressive_module, ar)
    rule = ("mm_spatial_pool_mode='bilinear' disagrees with {}autoregressive_config.mm_spatial_pool_mode='average' "
            "(its default); with enable_multiscale_pooling: true the autoregressive_config keys set the video layout "
            "when the model is built: give one value in one place")
    assert from_config == "model_config." + rule.format("model_config.")
    assert from_model == "config.video_layout." + rule.format("")
    assert model.attach_autoregressive_module({**ar, "mm_spatial_pool_mode": "bilinear"}) is model.autoregressive_module
