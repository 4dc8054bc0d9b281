"""LoRA through peft on the Qwen-VL families: adapters on the LLM only (the vision encoder's own
``qkv``/``down_proj`` untouched), the merger and the autoregressive predictor trained in full,
checkpoints with ``adapter_model.safetensors``, an exact resume, and ``merge-lora`` giving a checkpoint
that plain transformers (``AutoModelForImageTextToText``) loads with the adapter model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from qwen_support import QWEN_AR, collate, qwen_dataset, qwen_records, tiny_checkpoint
from safetensors.torch import load_file
from train_support import straight_and_resumed, training_args

pytest.importorskip("peft")

from lmms_engine.data.qwen_dataset import QwenVideoCollator  # noqa: E402
from lmms_engine.data.qwen_vision import mm_token_type_ids  # noqa: E402
from lmms_engine.export.__main__ import main as export_main  # noqa: E402
from lmms_engine.models.builder import build_model  # noqa: E402
from lmms_engine.models.qwen_vl_common import qwen_model_class  # noqa: E402
from lmms_engine.train.autoregressive_trainer import AutoregressiveTrainer  # noqa: E402
from lmms_engine.utils.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:autoregressive reconstruction.*shorter than num_hist")

#: down_proj also names a linear layer of Qwen2.5-VL's vision blocks: it must stay without adapters.
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


def lora_model(checkpoint, seed: int = 0, **extra):
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    return build_model({"model_name_or_path": str(checkpoint), "lora": dict(LORA), "enable_autoregressive": True,
                        "autoregressive_config": dict(QWEN_AR), **extra}, AutoTokenizer.from_pretrained(checkpoint))


@pytest.fixture(scope="module", params=FAMILIES)
def lora_runs(request, tmp_path_factory):
    """Per family: two steps straight, and one step saved then resumed to two, on four records."""
    family = request.param
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    root = tmp_path_factory.mktemp(f"lora_{family}")
    dataset = qwen_dataset(checkpoint, qwen_records(root / "data"))

    def make_trainer(out):
        return AutoregressiveTrainer(
            model=lora_model(checkpoint),
            args=training_args(out, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=5e-3),
            train_dataset=dataset, data_collator=QwenVideoCollator(pad_token_id=dataset.tokenizer.pad_token_id),
            enable_autoregressive=True)

    straight, resumed = straight_and_resumed(make_trainer, root)
    return family, checkpoint, root, straight, resumed


def test_adapters_on_the_language_model_only_and_what_trains(lora_runs):
    family, checkpoint, *_ = lora_runs
    model = lora_model(checkpoint)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    # q_proj, v_proj, down_proj of both LLM layers, an A and a B each; none in the vision encoder
    assert len(adapters) == 2 * 3 * 2 and all(n.startswith("model.language_model.layers.") for n in adapters)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in model.model.visual.named_parameters())
    if family == "qwen2_5_vl":  # the vision blocks' own down_proj stays a plain Linear
        assert type(model.model.visual.blocks[0].mlp.down_proj) is torch.nn.Linear
    projector = {f"model.visual.{n}" for n, _ in model.model.visual.named_parameters()
                 if n.startswith(("merger.", "deepstack_merger_list."))}
    predictor = {n for n, p in model.autoregressive_module.named_parameters(prefix="autoregressive_module")
                 if p.requires_grad}
    assert predictor and projector
    assert trainable - adapters == projector | predictor
    assert not any(p.requires_grad for p in model.vision_tower_parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if (n.startswith("model.language_model.") and ".lora_" not in n) or n.startswith("lm_head."))
    assert model.config.lora == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_a_target_only_the_vision_encoder_has_is_a_clear_error(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    with pytest.raises(ConfigError, match=r"target_modules=\['qkv'\]: no linear layer of the language model "
                                          r"\(model.language_model.\)"):
        build_model({"model_name_or_path": str(checkpoint), "lora": {"target_modules": ["qkv"]}})


def test_checkpoints_hold_adapters_and_trained_modules_and_resume_exactly(lora_runs):
    family, _, root, straight, resumed = lora_runs
    checkpoint = root / "straight" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["lora"]["r"] == 4
    trained = load_file(str(checkpoint / "adapter_model.safetensors"))
    model = straight.model
    params = dict(model.named_parameters())
    assert set(trained) == {n for n, p in params.items() if p.requires_grad}
    assert any(".lora_B." in n and trained[n].abs().sum() > 0 for n in trained)  # B starts at zero: trained
    for name, value in trained.items():
        torch.testing.assert_close(value, params[name].detach(), rtol=0, atol=0)
    # from_pretrained on the checkpoint re-creates the adapters: same weights, same frozen parts
    reloaded = qwen_model_class(family).from_pretrained(checkpoint)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == set(trained)
    state = model.state_dict()
    assert reloaded.state_dict().keys() == state.keys()
    for name, param in reloaded.state_dict().items():
        torch.testing.assert_close(param, state[name], rtol=0, atol=0, msg=name)
    # resuming from checkpoint-1 lands on the uninterrupted run's weights
    assert resumed.state.global_step == 2
    from lmms_engine.launch.pipeline import load_instructions

    assert "merge-lora --checkpoint" in load_instructions(model)  # the run summary: plain transformers merges first
    for name, param in resumed.model.state_dict().items():
        torch.testing.assert_close(param, state[name], rtol=1e-6, atol=1e-7, msg=name)


def test_merge_lora_gives_plain_transformers_the_adapter_models_logits(lora_runs, tmp_path):
    from transformers import AutoModelForImageTextToText

    family, _, root, straight, _ = lora_runs
    out = tmp_path / "merged"
    assert export_main(["merge-lora", "--checkpoint", str(root / "straight" / "checkpoint-2"),
                        "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "lora" not in config and config["model_type"] == family
    assert (out / "tokenizer.json").is_file()
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(plain) in type(straight.model).__mro__
    assert not any("lora" in n or "base_layer" in n for n in plain.state_dict())
    adapter = straight.model.eval()
    batch = collate(straight.train_dataset, [0, 1])  # two videos of different grids
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")}
    plain_inputs = dict(inputs, mm_token_type_ids=mm_token_type_ids(batch["input_ids"], plain.config.video_token_id,
                                                                     plain.config.image_token_id))
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = plain_inputs["second_per_grid_ts"] = batch["second_per_grid_ts"]
    with torch.no_grad():
        expected = adapter(**inputs).logits
        got = plain(**plain_inputs).logits
    real = batch["attention_mask"].bool()
    diff = float((got - expected)[real].abs().max())
    print(f"{family}: merged vs adapter logits, max abs diff {diff:.3g}")
    assert diff <= 2e-5
    assert export_main(["merge-lora", "--checkpoint", str(out), "--output", str(tmp_path / "again")]) == 2


def test_qwen2_vl_adapters_save_reload_and_merge(tmp_path_factory, tmp_path):
    """Qwen2-VL without a training run: random B (non-zero updates), a save, a reload, a merge."""
    from transformers import AutoModelForImageTextToText

    from lmms_engine.models.lora import merge_lora_checkpoint

    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    model = lora_model(checkpoint)
    assert not any(".lora_" in n for n, _ in model.model.visual.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "saved")
    reloaded = qwen_model_class("qwen2_vl").from_pretrained(tmp_path / "saved")
    assert set(load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))) == {
        n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    merged = merge_lora_checkpoint(tmp_path / "saved", tmp_path / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(merged).eval()
    batch = collate(qwen_dataset(checkpoint, qwen_records(tmp_path / "data")), [0, 1])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = plain(**inputs, mm_token_type_ids=mm_token_type_ids(batch["input_ids"], plain.config.video_token_id,
                                                                  plain.config.image_token_id)).logits
        base = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()(
            **inputs, mm_token_type_ids=mm_token_type_ids(batch["input_ids"], plain.config.video_token_id,
                                                          plain.config.image_token_id)).logits
    assert float((base - expected).abs().max()) > 1e-3  # the adapters change the logits
    diff = float((got - expected)[batch["attention_mask"].bool()].abs().max())
    assert diff <= 2e-5, diff
