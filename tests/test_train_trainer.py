"""AutoregressiveTrainer on the tiny model and the demo clips: the guide's snippet, the logged loss
components (exact window means under gradient accumulation), enable_autoregressive, the loss plot,
and the CPU behaviour of TrainingArguments."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from train_support import build_parts, make_trainer, subset, train_logs, training_args

from lmms_engine.train import AutoregressiveTrainer, LossWindow, TrainingArguments, plot_loss_curves
from lmms_engine.train.loss_plot import loss_series

pytestmark = pytest.mark.slow


def test_guide_section3_snippet_runs_as_written(data_dir, tmp_path):
    # 16 samples: one optimisation step per epoch at the guide's 2 x 8 samples per step
    model, train_dataset, _ = build_parts(data_dir, data_path=subset(data_dir, 16, tmp_path))
    before = {k: v.clone() for k, v in model.autoregressive_module.named_parameters()}

    # --- the guide, section 3, verbatim (output_dir moved under tmp_path) ---
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "output/autoregressive_video"),
        num_train_epochs=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=2e-5,
        bf16=True,
        logging_steps=10,
        save_steps=500,
    )

    trainer = AutoregressiveTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        enable_autoregressive=True,  # turn on autoregressive training
    )

    trainer.train()
    # ---
    assert trainer.state.global_step == 3  # 3 epochs x (16 samples / (2 x 8))
    assert training_args.bf16 and training_args.use_cpu  # CPU-only machine: bf16 autocast on the CPU
    changed = [n for n, p in model.autoregressive_module.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the autoregressive predictor did not train"
    # The final step saves a checkpoint (save_strategy steps); the tokenizer came from the dataset.
    checkpoint = tmp_path / "output/autoregressive_video/checkpoint-3"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "tokenizer.json").is_file()


def test_logged_components_are_exact_window_means_under_accumulation(data_dir, tmp_path):
    """lr = 0 keeps the weights fixed, so every micro-batch can be re-evaluated afterwards: the logged
    main_loss must be the token mean over each step's global batch, averaged over the window's steps,
    exactly as HF averages its total ``loss``."""
    model, dataset, collator = build_parts(data_dir)
    batches = []

    def recording_collator(samples):
        batch = collator(samples)
        batches.append(batch)
        return batch

    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, logging_steps=2,
                learning_rate=0.0)
    trainer = AutoregressiveTrainer(model=model, args=training_args(tmp_path, **args), train_dataset=dataset,
                                    data_collator=recording_collator, enable_autoregressive=True)
    trainer.train()
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [2, 4]
    batches = batches[:8]  # the loader looks one batch ahead (to detect the epoch's end)

    with torch.no_grad():
        outputs = [model(**batch) for batch in batches]
    tokens = [float((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(set(tokens)) > 1, "micro-batches with equal token counts would not test the weighting"
    videos = [float((b["video_num_frames"] >= 2).sum()) for b in batches]
    expected: dict[str, list[float]] = {"main_loss": [], "autoregressive_loss": [], "ar_mse": []}
    for step in range(4):
        pair = range(2 * step, 2 * step + 2)
        for key in expected:
            weights = tokens if key == "main_loss" else videos  # the autoregressive terms average over videos
            expected[key].append(sum(float(outputs[i].loss_components[key]) * weights[i] for i in pair)
                                 / sum(weights[i] for i in pair))
    for window, entry in enumerate(logs):
        for key, per_step in expected.items():
            want = sum(per_step[2 * window: 2 * window + 2]) / 2
            assert entry[key] == pytest.approx(want, rel=1e-5), key
        assert entry["main_loss"] + entry["autoregressive_loss"] == pytest.approx(entry["total_loss"], rel=1e-6)
        assert entry["total_loss"] == pytest.approx(entry["loss"], rel=1e-5)  # HF's own total
        assert entry["autoregressive_loss"] == pytest.approx(0.1 * entry["ar_mse"], rel=1e-5)  # loss_weight
        assert entry["ar_copy_last_mse"] > 0


def test_training_logs_three_losses_each_step_and_writes_plot_and_log_file(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, max_steps=6, gradient_accumulation_steps=2, learning_rate=3e-3)
    trainer.train()
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == list(range(1, 7))
    for entry in logs:
        assert entry["main_loss"] + entry["autoregressive_loss"] == pytest.approx(entry["total_loss"], rel=1e-6)
    assert logs[-1]["total_loss"] < logs[0]["total_loss"]
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [line["main_loss"] for line in lines if "main_loss" in line] == [e["main_loss"] for e in logs]
    # throughput is logged by default: 2 micro-batches of 2 samples per step, 8 frames each
    video_tokens = trainer.model.video_layout.video_token_count(8, trainer.model.patch_side)
    for entry, line in zip(logs, (line for line in lines if "main_loss" in line)):
        assert entry["vision_tokens_per_sample"] == line["vision_tokens_per_sample"] == video_tokens
        assert entry["tokens_per_second_per_device"] > 0 and entry["samples_per_second"] > 0
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_enable_autoregressive_false_trains_plain_sft_without_autoregressive_parameters(data_dir, tmp_path):
    model, dataset, collator = build_parts(data_dir)  # built WITH the module
    assert hasattr(model, "autoregressive_module")
    trainer = AutoregressiveTrainer(model=model, args=training_args(tmp_path, max_steps=2, save_strategy="steps",
                                                                    save_steps=2),
                                    train_dataset=dataset, data_collator=collator, enable_autoregressive=False)
    assert not hasattr(model, "autoregressive_module")
    assert not [n for n, _ in model.named_parameters() if "autoregressive" in n]
    trainer.train()
    optimised = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimised == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for entry in train_logs(trainer):
        assert "autoregressive_loss" not in entry and "ar_mse" not in entry
        assert entry["main_loss"] == pytest.approx(entry["total_loss"], rel=1e-6)
    checkpoint = tmp_path / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "autoregressive" in k]
    assert json.loads((checkpoint / "config.json").read_text())["enable_autoregressive"] is False


def test_enable_autoregressive_true_needs_the_module(data_dir, tmp_path):
    model, dataset, collator = build_parts(data_dir, autoregressive=False)
    with pytest.raises(ValueError, match="has no autoregressive_module.*enable_autoregressive: true"):
        AutoregressiveTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset,
                              data_collator=collator, enable_autoregressive=True)


def test_loss_window_weights_nan_and_reset():
    window = LossWindow()
    window.add({"main_loss": torch.tensor(2.0), "ar": torch.tensor(float("nan"))}, torch.tensor(0.25))
    window.add({"main_loss": torch.tensor(4.0), "ar": torch.tensor(1.0)}, 0.75)
    assert window.reduce() == {"main_loss": pytest.approx(3.5), "ar": pytest.approx(1.0)}
    assert window.reduce() == {} and len(window) == 0
    with pytest.raises(ValueError, match="must be a scalar"):
        window.add({"x": torch.ones(2)}, 1.0)


def test_loss_plot_series_and_file(tmp_path):
    history = [{"loss": 3.0, "main_loss": 2.9, "autoregressive_loss": 0.1, "total_loss": 3.0, "ar_mse": 1.0,
                "ar_copy_last_mse": 0.4, "step": 1},
               {"eval_loss": 9.0, "eval_ar_mse": 0.8, "step": 1},
               {"loss": 2.0, "step": 2},  # a model without components: HF's loss stands for the total
               {"train_loss": 2.5, "step": 2}]
    series = loss_series(history)
    assert series["main_loss"] == ([1], [2.9])
    assert series["total_loss"] == ([1, 2], [3.0, 2.0])
    assert series["ar_mse"] == ([1], [1.0]) and series["ar_copy_last_mse"] == ([1], [0.4])
    assert series["eval_loss"] == ([1], [9.0]) and series["eval_ar_mse"] == ([1], [0.8])
    assert "train_loss" not in series
    path = plot_loss_curves(history, tmp_path / "sub" / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plot_loss_curves([{"eval_loss": 1.0, "step": 1}], tmp_path / "none.png") is None


def test_training_arguments_on_a_cpu_only_machine(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU-only rule does not apply on a GPU machine")
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True)
    assert args.use_cpu and args.bf16 and not args.dataloader_pin_memory
    assert args.device.type == "cpu" and not math.isnan(args.learning_rate)


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_aware_samplers_use_metadata_lengths_and_decode_nothing(data_dir, tmp_path, strategy):
    from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

    trainer = make_trainer(data_dir, tmp_path, train_sampling_strategy=strategy)
    dataset = trainer.train_dataset
    decoded = []
    real_load = dataset.loader.load_video

    def recording_load(path, *args, **kwargs):
        decoded.append(path)
        return real_load(path, *args, **kwargs)

    dataset.loader.load_video = recording_load
    sampler = trainer._get_train_sampler()
    order = list(iter(sampler))
    if strategy == "batch_rebalance":  # a batch sampler: lists of indices, one per micro-batch
        assert all(len(batch) == trainer.args.train_batch_size for batch in order)
        order = [index for batch in order for index in batch]
    assert isinstance(sampler, {"group_by_length": LengthGroupedSampler,
                                "batch_rebalance": BatchRebalanceSampler}[strategy])
    assert sorted(order) == list(range(len(dataset))) and decoded == []
    if strategy == "group_by_length":
        assert sampler.lengths == dataset.estimated_lengths()
    # the metadata estimates are the served lengths
    assert dataset.estimated_lengths()[:4] == [len(dataset[i]["input_ids"]) for i in range(4)]
