"""The pipeline config: every bad config fails up front (before any model is built) with a message
naming the block, the key, the value and what would be valid; overrides, YAML numbers, the real-model
example configs, and docs/config.md kept in step with the code."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest


from lmms_engine.launch import config as launch_config
from lmms_engine.launch.config import apply_overrides, check_pipeline, load_pipeline_config
from lmms_engine.utils.config import parse_value
from lmms_engine.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_model_is_built(monkeypatch):
    """Checking a config must never build a model or a dataset."""
    import lmms_engine.data.dataset as dataset
    import lmms_engine.models.builder as builder

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or dataset was built while checking the config")

    monkeypatch.setattr(builder, "build_model", forbidden)
    monkeypatch.setattr(dataset, "build_dataset", forbidden)


def good(data_dir) -> list[dict]:
    return [{
        "type": "trainer",
        "config": {
            "trainer_type": "autoregressive_trainer",
            "model_config": {"enable_autoregressive": True,
                             "autoregressive_config": {"embedding_dim": 64, "loss_weight": 0.1}},
            "dataset_config": {"data_path": str(data_dir / "train.json")},
            "output_dir": "out",
            "per_device_train_batch_size": 2,
        },
    }]


def edited(data_dir, path: str, value, *, delete: bool = False) -> list[dict]:
    raw = copy.deepcopy(good(data_dir))
    node = raw[0]
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


def test_good_config_is_typed(data_dir):
    pipeline = check_pipeline(good(data_dir), "good.yaml")
    (block,) = pipeline.of_type("trainer")
    assert block.trainer_type == "autoregressive_trainer" and block.trains_autoregressive
    assert block.model_config.autoregressive_config == {"embedding_dim": 64, "loss_weight": 0.1}
    assert block.dataset_config.max_frames == 8
    args = block.training_arguments()
    assert args.per_device_train_batch_size == 2 and args.output_dir == "out"


@pytest.mark.parametrize("path, value, message", [
    ("type", "trainr", r"block 0: unknown block type 'trainr' \(did you mean 'trainer'\?\); valid: demo_data, trainer"),
    ("configs", {}, r"block 0: unknown key 'configs' \(did you mean 'config'\?\)"),
    ("config.per_device_train_batch_sise", 2,
     r"block 0 \(trainer\)\.config: unknown key 'per_device_train_batch_sise' \(did you mean "
     r"'per_device_train_batch_size'\?\).*TrainingArguments \(docs/config.md\)"),
    ("config.trainer_type", "autoregresive_trainer",
     r"trainer_type: unknown 'autoregresive_trainer' \(did you mean 'autoregressive_trainer'\?\)"),
    ("config.model_config.enable_autoregresive", True,
     r"config\.model_config: unknown key 'enable_autoregresive' \(did you mean 'enable_autoregressive'\?\)"),
    ("config.model_config.autoregressive_config.loss_wieght", 0.1,
     r"model_config\.autoregressive_config: unknown key 'loss_wieght' \(did you mean 'loss_weight'\?\)"),
    ("config.dataset_config.max_frame", 8,
     r"config\.dataset_config: unknown key 'max_frame' \(did you mean 'max_frames'\?\)"),
    ("config.learning_rate", "fast", r"config\.learning_rate: expected float, got 'fast' \(str\)"),
    ("config.per_device_train_batch_size", 2.5, r"config\.per_device_train_batch_size: expected int, got 2\.5"),
    ("config.model_config.autoregressive_config.num_hist", "3",
     r"autoregressive_config\.num_hist: expected int, got '3' \(str\)"),
    ("config.dataset_config.data_path", "nowhere/train.json",
     r"config\.dataset_config\.data_path: file 'nowhere/train\.json' does not exist"),
    ("config.dataset_config.video_folder", "nowhere/videos",
     r"dataset_config\.video_folder: folder 'nowhere/videos' does not exist"),
    ("config.model_config.model_name_or_path", "./checkpoints/missing",
     r"model_config\.model_name_or_path: folder './checkpoints/missing' does not exist"),
    ("config.model_config.autoregressive_config.embedding_dim", 1152,
     r"autoregressive_config\.embedding_dim=1152 differs from the vision tower's feature size 64 of the tiny model"),
    ("config.resume_from_checkpoint", "out/checkpoint-7",
     r"resume_from_checkpoint: checkpoint folder 'out/checkpoint-7' does not exist"),
    ("config.fsdp", "full_shard", r"config\.fsdp: FSDP through the Trainer needs GPUs"),
    ("config.use_liger_kernel", True, r"config\.use_liger_kernel: Liger kernels are Triton GPU kernels"),
])
def test_bad_values_fail_with_clear_messages(data_dir, path, value, message):
    raw = edited(data_dir, path, value)
    if path in ("config.fsdp", "config.use_liger_kernel"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("allowed where there is a GPU")
    with pytest.raises(ConfigError, match=message):
        check_pipeline(raw, "bad.yaml")


def test_conflicting_layout_keys_name_both_places(data_dir):
    raw = good(data_dir)
    model = raw[0]["config"]["model_config"]
    model["mm_spatial_pool_mode"] = "bilinear"
    model["autoregressive_config"].update(enable_multiscale_pooling=True, mm_spatial_pool_mode="average")
    with pytest.raises(ConfigError, match=r"model_config\.mm_spatial_pool_mode='bilinear' disagrees with "
                                          r".*autoregressive_config\.mm_spatial_pool_mode='average'"):
        check_pipeline(raw, "bad.yaml")


def test_trainer_type_and_enable_autoregressive_must_agree(data_dir):
    raw = edited(data_dir, "config.trainer_type", "sft")
    with pytest.raises(ConfigError, match="trainer_type 'sft' trains without the autoregressive loss but "
                                          "model_config.enable_autoregressive is true"):
        check_pipeline(raw, "bad.yaml")
    raw = edited(data_dir, "config.model_config", {})  # the defaults agree: the module is attached
    block = check_pipeline(raw, "ok.yaml").of_type("trainer")[0]
    assert block.trains_autoregressive and block.model_config.enable_autoregressive is True
    sft = edited(data_dir, "config.model_config", {})
    sft[0]["config"]["trainer_type"] = "sft"
    assert not check_pipeline(sft, "ok.yaml").of_type("trainer")[0].trains_autoregressive


def test_structure_errors(data_dir):
    with pytest.raises(ConfigError, match="expected a list of blocks; write the block as a list item"):
        check_pipeline(good(data_dir)[0], "x.yaml")
    with pytest.raises(ConfigError, match="expected a non-empty list of blocks"):
        check_pipeline([], "x.yaml")
    with pytest.raises(ConfigError, match="dataset_config: missing; give dataset_config with at least data_path"):
        check_pipeline(edited(data_dir, "config.dataset_config", None, delete=True), "x.yaml")
    with pytest.raises(ConfigError, match="no 'trainer' or 'evaluate' block"):
        check_pipeline([{"type": "demo_data", "config": {}}], "x.yaml")
    with pytest.raises(ConfigError, match="config file 'missing.yaml' does not exist"):
        load_pipeline_config("missing.yaml")


def test_files_of_an_earlier_demo_data_block_count_as_present(tmp_path):
    out = tmp_path / "demo"
    raw = [{"type": "demo_data", "config": {"output_dir": str(out), "num_train": 4, "num_eval": 2}},
           {"type": "trainer", "config": {"model_config": {"enable_autoregressive": True},
                                          "dataset_config": {"data_path": str(out / "train.json"),
                                                             "eval_data_path": str(out / "eval.json")}}}]
    pipeline = check_pipeline(raw, "x.yaml")
    assert [b.type for b in pipeline.blocks] == ["demo_data", "trainer"]
    with pytest.raises(ConfigError, match=r"data_path: file .* does not exist \(a demo_data block earlier"):
        check_pipeline(raw[::-1], "x.yaml")  # the demo block comes after: the file is missing when needed


def test_overrides_and_yaml_numbers(data_dir, tmp_path):
    raw = good(data_dir) + [{"type": "demo_data", "config": {"num_train": 4}}]
    out = apply_overrides(raw, ["max_steps=5", "model_config.autoregressive_config.loss_weight=5e-2",
                                "dataset_config.max_frames=4", "demo_data.num_train=8", "report_to=[none]",
                                "model_config.tiny_config.vision_config={num_hidden_layers: 1}"])
    config = out[0]["config"]
    assert config["max_steps"] == 5 and config["report_to"] == ["none"]
    assert config["model_config"]["autoregressive_config"]["loss_weight"] == 0.05
    assert config["model_config"]["tiny_config"] == {"vision_config": {"num_hidden_layers": 1}}
    assert out[1]["config"]["num_train"] == 8 and raw[1]["config"]["num_train"] == 4  # input untouched
    assert parse_value("2e-5") == 2e-5 and parse_value("1.0e-3") == 1e-3 and parse_value("null") is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(raw, ["max_steps"])
    with pytest.raises(ConfigError, match="max_steps is 5, not a mapping"):
        apply_overrides(out, ["max_steps.x=1"])
    path = tmp_path / "c.yaml"
    path.write_text(f"""
- type: trainer
  config:
    model_config: {{enable_autoregressive: true}}
    dataset_config: {{data_path: {data_dir / 'train.json'}}}
    learning_rate: 2e-5
""")
    block = load_pipeline_config(path, ["warmup_steps=0.1"]).of_type("trainer")[0]
    assert block.training_args["learning_rate"] == 2e-5 and block.training_args["warmup_steps"] == 0.1


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples" / "real").glob("*.yaml")))
def test_real_model_configs_check_offline(name):
    import importlib.util

    # They report to TensorBoard (the `all` extra); where it is not installed that is a config error.
    sets = [] if importlib.util.find_spec("tensorboard") else ["report_to=none"]
    pipeline = load_pipeline_config(REPO / "examples" / "real" / name, sets)
    (block,) = pipeline.of_type("trainer")
    path = block.model_config.model_name_or_path
    assert path == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" or path.startswith(("Qwen/Qwen2.5-VL-", "Qwen/Qwen3-VL-"))
    # the vision width: SigLIP-so400m's and Qwen3-VL's 1152, Qwen2.5-VL's 1280
    assert block.model_config.autoregressive_config["embedding_dim"] == (1280 if "Qwen2.5-VL" in path else 1152)
    assert block.training_args["bf16"] is True and block.trains_autoregressive


def test_docs_config_reference_is_current():
    from lmms_engine.launch.config_doc import render_config_reference

    text = render_config_reference()
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == text, \
        "docs/config.md is stale: run python -m lmms_engine.launch.config_doc --write docs/config.md"
    for key in launch_config.training_argument_fields():
        assert f"| `{key}` |" in text


def test_a_bare_yaml_no_where_a_string_is_expected_says_to_quote_it(tmp_path):
    data = tmp_path / "train.json"
    data.write_text('[{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]')
    config = tmp_path / "no.yaml"
    config.write_text("- type: trainer\n  config:\n    trainer_type: sft\n    model_config: {}\n"
                      f"    save_strategy: no\n    dataset_config: {{data_path: {data}}}\n")
    with pytest.raises(ConfigError, match=r'save_strategy: expected .*got False \(bool\); .*quote it, e\.g\. "no"'):
        load_pipeline_config(config)
