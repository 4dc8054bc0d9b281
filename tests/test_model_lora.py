"""LoRA through peft: what trains, checkpoints with adapters and fully trained modules, an exact resume,
and ``merge-lora`` giving a checkpoint plain transformers loads with the adapter model's logits."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from lmms_engine.data import DatasetConfig, build_collator, build_dataset  # noqa: E402
from lmms_engine.data.preprocess import ProcessorInfo  # noqa: E402
from lmms_engine.export.__main__ import main as export_main  # noqa: E402
from lmms_engine.models.builder import build_model  # noqa: E402
from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration  # noqa: E402
from lmms_engine.models.lora import merge_lora  # noqa: E402
from lmms_engine.train.autoregressive_trainer import AutoregressiveTrainer  # noqa: E402
from lmms_engine.utils.config import ConfigError  # noqa: E402
from train_support import (  # noqa: E402
    AR_SMALL,
    demo_data_dir,
    straight_and_resumed,
    subset,
    tiny_tokenizer,
    training_args,
)

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model({"lora": dict(LORA), "enable_autoregressive": True, "autoregressive_config": dict(AR_SMALL)},
                       tiny_tokenizer())


def test_adapters_on_the_language_model_only_and_what_trains():
    model = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    # q_proj, v_proj, down_proj of both LLM layers, an A and a B each; the tower's q_proj/v_proj untouched
    assert len(adapters) == 2 * 3 * 2 and all(n.startswith("model.language_model.layers.") for n in adapters)
    assert not any(".lora_" in n for n, _ in model.model.vision_tower.named_parameters())
    full = trainable - adapters
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in full if n.startswith("model.")} == {
        "model.multi_modal_projector", "model.image_newline"}
    assert {n for n in full if not n.startswith("model.")} == {n for n, p in model.autoregressive_module.named_parameters(
        prefix="autoregressive_module") if p.requires_grad}
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if (n.startswith("model.language_model.") and ".lora_" not in n) or n.startswith("lm_head."))
    assert model.config.lora == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_bad_settings_and_a_missing_peft_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"target_modules=\['qkv'\]: no linear layer of the language model"):
        build_model({"lora": {"target_modules": ["qkv"]}}, tiny_tokenizer())
    with pytest.raises(ConfigError, match=r"model_config.lora: r must be >= 1, got 0"):
        build_model({"lora": {"r": 0}}, tiny_tokenizer())
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"needs the `peft` library: pip install 'lmms-video\[lora\]'"):
        build_model({"lora": {}}, tiny_tokenizer())


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """Two steps straight, and one step saved then resumed to two, on the demo clips."""
    data_dir = demo_data_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("lora")
    data = subset(data_dir, 4, root)
    tok = tiny_tokenizer()

    def make_trainer(out):
        model = lora_model()
        info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
        config = DatasetConfig(data_path=str(data), max_frames=4)
        return AutoregressiveTrainer(model=model, args=training_args(out, max_steps=2, save_strategy="steps",
                                                                     save_steps=1, learning_rate=5e-3),
                                     train_dataset=build_dataset(config, tok, info),
                                     data_collator=build_collator(config, tok), enable_autoregressive=True)

    straight, resumed = straight_and_resumed(make_trainer, root)
    return root, straight, resumed


def test_checkpoints_hold_adapters_and_trained_modules_and_resume_exactly(lora_runs):
    root, straight, resumed = lora_runs
    checkpoint = root / "straight" / "checkpoint-2"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["lora"]["r"] == 4
    trained = load_file(str(checkpoint / "adapter_model.safetensors"))
    model = straight.model
    assert set(trained) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n and trained[n].abs().sum() > 0 for n in trained)  # B left zero at init, trained
    for name, value in trained.items():
        torch.testing.assert_close(value, dict(model.named_parameters())[name].detach(), rtol=0, atol=0)
    # from_pretrained on the checkpoint re-creates the adapters: same weights, same frozen parts
    reloaded = LlavaVideoForConditionalGeneration.from_pretrained(checkpoint)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == set(trained)
    for name, param in reloaded.state_dict().items():
        torch.testing.assert_close(param, model.state_dict()[name], rtol=0, atol=0, msg=name)
    # resuming from checkpoint-1 lands on the uninterrupted run's weights
    for name, param in resumed.model.state_dict().items():
        torch.testing.assert_close(param, model.state_dict()[name], rtol=1e-6, atol=1e-7, msg=name)


def test_merge_lora_gives_plain_transformers_the_adapter_models_logits(lora_runs, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    root, straight, _ = lora_runs
    out = tmp_path / "merged"
    assert export_main(["merge-lora", "--checkpoint", str(root / "straight" / "checkpoint-2"),
                        "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "lora" not in config
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    assert not any("lora" in n or "base_layer" in n for n in plain.state_dict())
    adapter = straight.model.eval()
    dataset = straight.train_dataset
    batch = build_collator(dataset.config, tiny_tokenizer())([dataset[0]])  # one video, all frames real
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos")}
    with torch.no_grad():
        expected = adapter(**inputs, video_num_frames=batch["video_num_frames"]).logits
        got = plain(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert export_main(["merge-lora", "--checkpoint", str(out), "--output", str(tmp_path / "again")]) == 2


def test_a_layout_plain_transformers_cannot_build_takes_lora_and_merges(tmp_path):
    """Average pooling: config.json says lmms_video_llava; adapters, save and merge work as for the HF layout."""
    from lmms_engine.models.lora import merge_lora_checkpoint

    torch.manual_seed(0)
    model = build_model({"lora": dict(LORA), "mm_spatial_pool_mode": "average"}, tiny_tokenizer())
    assert model.config.model_type == "lmms_video_llava"
    assert sum(".lora_" in n for n, _ in model.named_parameters()) == 2 * 3 * 2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "saved")
    merged = LlavaVideoForConditionalGeneration.from_pretrained(merge_lora_checkpoint(tmp_path / "saved",
                                                                                      tmp_path / "merged")).eval()
    assert merged.config.model_type == "lmms_video_llava" and not getattr(merged.config, "lora", None)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=2e-5)


def test_adapters_are_float32_in_a_bf16_model_train_and_reload_bit_identical(tmp_path):
    """bf16 base weights, float32 adapters (peft's get_peft_model default): every lora_A element moves at a
    LoRA learning rate (bf16 adapters kept most of them: the update is below bf16's resolution of the value);
    a bf16 reload keeps them float32 and bit-identical; merge-lora folds them into the bf16 weights."""
    torch.manual_seed(0)
    model = build_model({"lora": dict(LORA), "torch_dtype": "bfloat16"}, tiny_tokenizer())
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert len(adapters) == 12 and {p.dtype for p in adapters.values()} == {torch.float32}
    assert model.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in adapters.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # lora_B starts at zero: the second step gives lora_A a gradient
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(bool((p != before[n]).all()) for n, p in adapters.items() if ".lora_A." in n)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = LlavaVideoForConditionalGeneration.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    state = model.state_dict()
    for name, param in reloaded.state_dict().items():
        assert param.dtype == state[name].dtype, name
        torch.testing.assert_close(param, state[name], rtol=0, atol=0, msg=name)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        merge_lora(reloaded.eval())
        got = reloaded(input_ids=ids).logits.float()
    assert reloaded.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)  # bf16 rounding of the merged weights
