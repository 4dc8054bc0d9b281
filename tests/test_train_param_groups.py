"""Per-module learning rates: the optimizer's parameter groups by part, what the scheduler does to them,
what one step does with them, the logged table, config keys, and the Qwen families' part description."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lmms_engine.models.builder import build_model
from lmms_engine.train import TrainingArguments
from lmms_engine.train.autoregressive_trainer import AutoregressiveTrainer
from lmms_engine.train.param_groups import FAMILY_PARTS, build_param_groups, module_parts, part_of
from lmms_engine.utils.config import ConfigError
from train_support import AR_SMALL, tiny_tokenizer

LRS = {"vision_tower_lr": 1e-5, "projector_lr": 2e-4, "language_model_lr": 3e-5, "autoregressive_lr": 1e-3}


def model_with_all_parts():
    torch.manual_seed(0)
    return build_model({"freeze_vision_tower": False, "enable_autoregressive": True,
                        "autoregressive_config": dict(AR_SMALL, target_encoder="copy")}, tiny_tokenizer())


def trainer_for(model, tmp_path, **args):
    values = dict(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.1, report_to="none", max_steps=10,
                  warmup_steps=4, lr_scheduler_type="linear")
    values.update(args)
    return AutoregressiveTrainer(model=model, args=TrainingArguments(**values), enable_autoregressive=True)


def trainable(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def test_param_groups_hold_each_part_at_its_rate(tmp_path, caplog):
    model = model_with_all_parts()
    with caplog.at_level(logging.INFO, logger="lmms_engine.train.autoregressive_trainer"):
        optimizer = trainer_for(model, tmp_path, **LRS).create_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {f"{part}{suffix}" for part in ("vision_tower", "projector", "language_model",
                                                          "autoregressive") for suffix in ("", ".no_decay")}
    for part, key in (("vision_tower", "vision_tower_lr"), ("projector", "projector_lr"),
                      ("language_model", "language_model_lr"), ("autoregressive", "autoregressive_lr")):
        assert groups[part]["lr"] == groups[f"{part}.no_decay"]["lr"] == LRS[key]
        assert groups[part]["weight_decay"] == 0.1 and groups[f"{part}.no_decay"]["weight_decay"] == 0.0
    members = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    owned = {"vision_tower": trainable(model.model.vision_tower),
             "projector": trainable(model.model.multi_modal_projector) | {id(model.model.image_newline)},
             "language_model": trainable(model.model.language_model) | trainable(model.lm_head),
             "autoregressive": trainable(model.autoregressive_module)}
    for part, ids in owned.items():
        assert members[part] | members[f"{part}.no_decay"] == ids, part
    # every trainable parameter in exactly one group; frozen ones (post_layernorm, head, the target copy) in none
    everything = [i for ids in members.values() for i in ids]
    assert sorted(everything) == sorted(trainable(model))
    frozen = {id(p) for p in model.autoregressive_module.target_encoder.parameters()}
    assert frozen and not frozen & set(everything)
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad}
    assert biases <= set().union(*(ids for name, ids in members.items() if name.endswith(".no_decay")))
    assert "parameters by part:" in caplog.text and "lr 0.0002" in caplog.text


def test_scheduler_keeps_the_ratios_and_one_step_uses_each_rate(tmp_path):
    model = model_with_all_parts()
    trainer = trainer_for(model, tmp_path, optim="sgd", weight_decay=0.0,
                          **dict(LRS, language_model_lr=0.0))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    initial = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}  # the scheduler starts at 0 (warm-up)
    assert initial["projector"] == 2e-4 and initial["language_model"] == 0.0
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    now = {g["name"]: g["lr"] for g in optimizer.param_groups}
    factor = now["projector"] / initial["projector"]
    assert 0 < factor < 1  # warm-up
    assert all(abs(now[k] - initial[k] * factor) < 1e-12 for k in initial)
    # a plain SGD step from a known gradient moves each part by its own rate (language model: 0)
    for group in optimizer.param_groups:
        group["lr"] = initial[group["name"]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {n: float((before[n] - p.detach()).mean()) for n, p in model.named_parameters()}
    assert moved["model.multi_modal_projector.linear_1.weight"] == pytest.approx(2e-4, rel=1e-4)
    assert moved["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] == pytest.approx(1e-5, rel=1e-3)
    assert moved["model.language_model.layers.0.mlp.up_proj.weight"] == 0.0
    ar_name = next(n for n, p in model.named_parameters() if n.startswith("autoregressive_module.") and p.requires_grad)
    assert moved[ar_name] == pytest.approx(1e-3, rel=1e-4)


def test_without_part_rates_transformers_groups_are_kept_and_unknown_parameters_fail(tmp_path):
    model = model_with_all_parts()
    optimizer = trainer_for(model, tmp_path).create_optimizer()
    assert len(optimizer.param_groups) == 2 and all(g["lr"] == 1e-4 for g in optimizer.param_groups)
    model.extra_head = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match=r"parameter 'extra_head.weight' belongs to no model part"):
        trainer_for(model, tmp_path, projector_lr=1e-3).create_optimizer()


def test_longest_prefix_wins_for_the_qwen_merger():
    parts = FAMILY_PARTS["qwen2_5_vl"]
    assert part_of("model.visual.blocks.0.attn.qkv.weight", parts) == "vision_tower"
    assert part_of("model.visual.merger.mlp.0.weight", parts) == "projector"
    assert part_of("model.visual.deepstack_merger_list.0.norm.weight", FAMILY_PARTS["qwen3_vl"]) == "projector"
    assert part_of("model.language_model.layers.1.self_attn.q_proj.weight", parts) == "language_model"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_every_parameter_of_the_tiny_qwen_models_has_a_part(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from lmms_engine.models.qwen_tiny import write_tiny_qwen_checkpoint

    folder = write_tiny_qwen_checkpoint(tmp_path / family, family)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **LRS)
    groups, summary = build_param_groups(model, args, [n for n, _ in model.named_parameters()])
    by_part = {s.part: s for s in summary}
    assert by_part["projector"].total > 0 and by_part["vision_tower"].total > 0
    assert sum(s.total for s in summary) == sum(p.numel() for p in model.parameters())
    merger = {id(p) for p in model.model.visual.merger.parameters()}
    assert merger <= {id(p) for g in groups if g["name"].startswith("projector") for p in g["params"]}
    assert module_parts(model) is FAMILY_PARTS[family]


def test_the_launcher_types_the_part_rates(tmp_path):
    import json

    from lmms_engine.launch.config import check_pipeline

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yo."}]})
                    + "\n")
    raw = [{"type": "trainer", "config": {"trainer_type": "sft", "output_dir": str(tmp_path / "out"),
                                          "dataset_config": {"data_path": str(data)},
                                          "vision_tower_lr": "fast"}}]
    with pytest.raises(ConfigError, match=r"config\.vision_tower_lr: expected float or NoneType, got .fast."):
        check_pipeline(raw, "run.yaml")
    raw[0]["config"]["vision_tower_lr"] = 2e-6
    assert check_pipeline(raw, "run.yaml").of_type("trainer")[0].training_arguments().vision_tower_lr == 2e-6
    raw[0]["config"].pop("vision_tower_lr")
    raw[0]["config"]["vision_tower_lrr"] = 1e-5
    with pytest.raises(ConfigError, match=r"unknown key 'vision_tower_lrr' \(did you mean 'vision_tower_lr'\?\)"):
        check_pipeline(raw, "run.yaml")


def test_freezing_a_part_leaves_it_out_of_the_optimizer(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model({"freeze_projector": True, "freeze_autoregressive": True, "enable_autoregressive": True,
                         "autoregressive_config": dict(AR_SMALL)}, tiny_tokenizer())
    with caplog.at_level(logging.INFO, logger="lmms_engine.train.autoregressive_trainer"):
        optimizer = trainer_for(model, tmp_path, language_model_lr=5e-5).create_optimizer()
    assert {g["name"] for g in optimizer.param_groups} == {"language_model", "language_model.no_decay"}
    assert not any(p.requires_grad for p in model.autoregressive_module.parameters())
    lines = {line.split()[0]: line for line in caplog.text.splitlines()[1:] if line.strip()}
    assert all(lines[part].endswith("frozen") for part in ("vision_tower", "projector", "autoregressive"))
