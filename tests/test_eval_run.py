"""run_evaluate end to end on a saved tiny checkpoint and generated demo clips, from a YAML block."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lmms_engine.data.demo import MOTION_QUESTION_TYPES, generate_demo_dataset
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.eval.config import EvaluateConfig, run_evaluate
from lmms_engine.models.builder import build_model
from lmms_engine.utils.config import ConfigError, from_mapping

pytestmark = pytest.mark.slow

NUM_EVAL = 6  # question types 0,1,2,3,0,1 -> direction 2, order 2, next_color 1, which_moves 1
MAX_FRAMES = 6
NUM_HIST = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    data = generate_demo_dataset(root / "data", num_train=0, num_eval=NUM_EVAL, seed=5, num_frames=12, size=64,
                                 question_types=MOTION_QUESTION_TYPES, progress=False)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    for name, spec in (("with_ar", {"enable_autoregressive": True, "autoregressive_config": {
            "num_hist": NUM_HIST, "num_heads": 4, "num_layers": 1}}), ("plain", {})):
        model = build_model(spec, tokenizer)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    yield root, data
    torch.set_num_threads(threads)


def evaluate_block(root, data, checkpoint: str, **extra) -> dict:
    text = f"""
- type: evaluate
  config:
    checkpoint: {root / checkpoint}
    data_path: {data.eval_path}
    dataset_config: {{max_frames: {MAX_FRAMES}}}
    output_dir: {root / checkpoint / "eval"}
    batch_size: 4
    max_new_tokens: 4
    device: cpu
    progress: false
"""
    block = yaml.safe_load(text)[0]
    assert block["type"] == "evaluate"
    return {**block["config"], **extra}


def test_evaluate_block_writes_results(workspace):
    root, data = workspace
    results = run_evaluate(evaluate_block(root, data, "with_ar"))
    out = root / "with_ar" / "eval"
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"checkpoint", "data_path", "num_samples", "device", "dtype", "config", "accuracy",
                          "reconstruction", "seconds", "files"}
    assert saved["num_samples"] == NUM_EVAL and saved["device"] == "cpu" and saved["dtype"] == "float32"
    acc = saved["accuracy"]
    assert acc["overall"]["num_samples"] == NUM_EVAL
    assert {k: v["num_samples"] for k, v in acc["by_question_type"].items()} == \
        {"direction": 2, "order": 2, "next_color": 1, "which_moves": 1}
    assert acc["scoring"] == {"multiple_choice": NUM_EVAL, "exact_match": 0}
    assert acc["overall"]["chance_accuracy"] == pytest.approx((2 / 4 + 4 / 3) / NUM_EVAL)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"eval_{i:05d}" for i in range(NUM_EVAL)]
    assert sum(r["correct"] for r in rows) == acc["overall"]["correct"]
    records = json.loads(data.eval_path.read_text())
    assert [r["reference"] for r in rows] == [rec["answer"] for rec in records]

    recon = saved["reconstruction"]
    assert recon["num_hist"] == NUM_HIST and recon["num_videos"] == NUM_EVAL
    # every video has MAX_FRAMES frames: offset k has MAX_FRAMES - k windows per video, each pooled to
    # 4x4 tokens of the tower's 64 dims
    assert [r["windows"] for r in recon["by_offset"]] == [NUM_EVAL * (MAX_FRAMES - k) for k in (1, 2)]
    assert [r["elements"] for r in recon["by_offset"]] == [NUM_EVAL * (MAX_FRAMES - k) * 16 * 64 for k in (1, 2)]
    assert all(r["mse"] > 0 and r["copy_last_mse"] > 0 and r["mean_target_mse"] > 0 for r in recon["by_offset"])
    assert recon["full_history"] == recon["by_offset"][-1]

    markdown = (out / "eval_results.md").read_text()
    for name in ("direction", "order", "next_color", "which_moves", "**all**", "Next-frame reconstruction"):
        assert name in markdown


def test_answers_do_not_depend_on_the_batch_size(workspace):
    """Left padding: a prompt's greedy answer is the same alone and in a batch of longer prompts."""
    root, data = workspace
    batched = run_evaluate(evaluate_block(root, data, "with_ar", metrics=["accuracy"], batch_size=6,
                                          output_dir=str(root / "b6")))
    single = run_evaluate(evaluate_block(root, data, "with_ar", metrics=["accuracy"], batch_size=1,
                                         output_dir=str(root / "b1")))
    assert "reconstruction" not in batched
    def answers(folder: str) -> list[str]:
        lines = (root / folder / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    assert answers("b6") == answers("b1")
    assert batched["accuracy"] == single["accuracy"]


def test_checkpoint_without_autoregressive_module_skips_reconstruction(workspace):
    root, data = workspace
    results = run_evaluate(evaluate_block(root, data, "plain", metrics=["reconstruction"]))
    assert "accuracy" not in results
    assert "no autoregressive module" in results["reconstruction"]["skipped"]
    markdown = (root / "plain" / "eval" / "eval_results.md").read_text()
    assert "Skipped: the checkpoint has no autoregressive module" in markdown


@pytest.mark.parametrize("change, message", [
    ({"batch_sise": 2}, "did you mean 'batch_size'"),
    ({"metrics": ["accuracy", "bleu"]}, "metrics[1]: invalid value 'bleu'"),
    ({"dataset_config": {"max_frame": 4}}, "did you mean 'max_frames'"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
])
def test_config_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match="^evaluate") as err:
        from_mapping(EvaluateConfig, {"checkpoint": "ckpt", "data_path": "eval.json", **change}, "evaluate")
    assert message in str(err.value)


def test_missing_files_are_reported_before_loading(workspace, tmp_path):
    root, data = workspace
    with pytest.raises(ConfigError, match="evaluate.checkpoint: .*does not exist"):
        run_evaluate({"checkpoint": str(tmp_path / "nope"), "data_path": str(data.eval_path)})
    with pytest.raises(ConfigError, match="evaluate.data_path: file .*missing.json"):
        run_evaluate({"checkpoint": str(root / "plain"), "data_path": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="eval_data_path"):
        run_evaluate({"checkpoint": str(root / "plain"), "dataset_config": {"data_path": str(data.eval_path)}})
