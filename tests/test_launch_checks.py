"""Every config error before anything loads: values transformers accepts but cannot train with, files
and folders, duplicate keys, encodings, output_dir clashes, and the defaults of a minimal config;
``--dry-run`` builds TrainingArguments as the run does, so its OK means the run will start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmms_engine.launch.cli import main
from lmms_engine.launch.config import check_pipeline, load_pipeline_config
from lmms_engine.utils.config import ConfigError



def trainer(data: Path, out: Path, **keys) -> list[dict]:
    config = {"trainer_type": "sft", "model_config": {}, "dataset_config": {"data_path": str(data)},
              "output_dir": str(out), **keys}
    return [{"type": "trainer", "config": config}]


@pytest.mark.parametrize("keys, message", [
    ({"learning_rate": -1.0e-4}, r"config\.learning_rate: -0\.0001 is not a finite number >= 0"),
    ({"learning_rate": float("nan")}, r"config\.learning_rate: nan is not a finite number >= 0"),
    ({"per_device_train_batch_size": 0}, r"config\.per_device_train_batch_size: must be >= 1, got 0"),
    ({"gradient_accumulation_steps": 0}, r"config\.gradient_accumulation_steps: must be >= 1, got 0"),
    ({"save_steps": -5}, r"config\.save_steps: must be > 0 .*got -5"),
    ({"logging_steps": -3}, r"config\.logging_steps: must be > 0"),
    ({"report_to": "tensorbord"}, r"config\.report_to: unknown integration 'tensorbord' \(did you mean "
                                  r"'tensorboard'\?\); valid: none, all, "),
    ({"eval_strategy": "steps", "eval_steps": 5}, r"config\.eval_strategy: 'steps' needs held-out data: set "
                                                  r"dataset_config\.eval_data_path"),
    ({"output_dir": "/proc/lmms-out"}, r"config\.output_dir: '/proc/lmms-out' cannot be created: '/proc' is not "
                                       r"writable"),
])
def test_values_transformers_accepts_but_no_run_survives(data, tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        check_pipeline(trainer(data, tmp_path / "out", **keys))


def test_an_output_dir_under_a_file_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match=r"output_dir: .*train\.json' is a file, not a folder"):
        check_pipeline(trainer(data, data / "run"))


def test_deepspeed_without_deepspeed_installed_is_a_config_error_even_for_dry_run(data, tmp_path, capsys):
    pytest.importorskip("transformers")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed here")
    except ImportError:
        pass
    (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": "auto"}')
    config = tmp_path / "ds.yaml"
    config.write_text(json.dumps(trainer(data, tmp_path / "out", deepspeed=str(tmp_path / "ds.json"))))
    assert main(["--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "config error: " in err and "deepspeed" in err and "pip install deepspeed" in err


def test_the_same_key_twice_is_an_error_naming_it(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("- type: trainer\n  config:\n    max_steps: 3\n    learning_rate: 1.0e-3\n    max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 5: key 'max_steps' appears twice in one mapping "
                                          r"\(first on line 3\)"):
        load_pipeline_config(config)
    as_json = tmp_path / "dup.json"
    as_json.write_text('[{"type": "trainer", "config": {"max_steps": 3, "max_steps": 5}}]')
    with pytest.raises(ConfigError, match=r"dup\.json: key 'max_steps' appears twice"):
        load_pipeline_config(as_json)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path):
    config = tmp_path / "latin.yaml"
    config.write_bytes("- type: trainer  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml: byte 0xe9 on line 1 is not valid UTF-8"):
        load_pipeline_config(config)


def test_two_trainer_blocks_writing_one_output_dir(data, tmp_path):
    raw = trainer(data, tmp_path / "out") + trainer(data, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"block 1 \(trainer\)\.config\.output_dir: .*is also the output_dir of "
                                          r".*block 0 \(trainer\)\.config"):
        check_pipeline(raw)
    raw[1]["config"]["resume_from_checkpoint"] = True  # continuing the same run is deliberate
    assert len(check_pipeline(raw).of_type("trainer")) == 2


def test_a_minimal_config_trains_with_the_defaults(data, tmp_path, capsys, caplog):
    """Only dataset_config: the default trainer type (autoregressive_trainer) attaches the module with its
    default settings; logging_steps=500 on a 2-step run warns that nothing will be logged."""
    config = tmp_path / "minimal.yaml"
    config.write_text(f"- type: trainer\n  config:\n    dataset_config: {{data_path: {data}}}\n"
                      f"    output_dir: {tmp_path / 'out'}\n    max_steps: 2\n    report_to: none\n"
                      f"    disable_tqdm: true\n    save_strategy: 'no'\n")
    assert main(["--config", str(config), "--dry-run"]) == 0
    assert "autoregressive loss: on" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="lmms_engine"):
        assert main(["--config", str(config)]) == 0
    assert "Training finished: 2 optimisation steps" in capsys.readouterr().out
    assert "no training step will be logged: logging_steps=500 but the run trains steps 1-2" in caplog.text
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["enable_autoregressive"] is True
