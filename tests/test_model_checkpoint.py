"""Checkpoints: plain transformers loads ours; our loader restores every parameter bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

from model_support import AR_SMALL, video_batch

from lmms_engine.models.builder import build_model
from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration
from lmms_engine.utils.config import ConfigError



def train_step(model, batch: dict) -> None:
    """One SGD step on every trainable parameter, so trained weights differ from their initial values."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, trainable: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert not trainable or {n for n, p in a.named_parameters() if p.requires_grad} == \
        {n for n, p in b.named_parameters() if p.requires_grad}


def saved_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_plain_transformers_loads_checkpoint_with_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": AR_SMALL}).eval()
    batch = video_batch(model, [3, 3], max_frames=3)
    batch.pop("video_num_frames")
    batch.pop("labels")
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ours = model(**batch).logits
        for cls in (LlavaOnevisionForConditionalGeneration, AutoModelForImageTextToText):
            plain = cls.from_pretrained(tmp_path).eval()
            assert type(plain) is LlavaOnevisionForConditionalGeneration
            torch.testing.assert_close(plain(**batch).logits, ours, rtol=0, atol=0)


def test_reload_bit_identical_copy_mode_faster_video(tmp_path: Path) -> None:
    torch.manual_seed(1)
    spec = {"freeze_vision_tower": False, "add_faster_video": True, "faster_token_stride": 2,
            "mm_newline_position": "grid", "enable_autoregressive": True,
            "autoregressive_config": {**AR_SMALL, "target_encoder": "auto"}}
    model = build_model(spec)
    module = model.autoregressive_module
    assert module.target_encoder_mode == "copy"  # the tower trains
    batch = video_batch(model, [4, 3], max_frames=4)
    faster_before = model.faster_token.detach().clone()
    snapshot_before = {k: v.clone() for k, v in module.target_encoder.state_dict().items()}
    train_step(model, batch)
    assert not torch.equal(model.faster_token, faster_before)
    assert all(torch.equal(v, snapshot_before[k]) for k, v in module.target_encoder.state_dict().items())
    tower_moved = any(not torch.equal(p, snapshot_before[n]) for n, p in model.vision_tower.state_dict().items())
    assert tower_moved  # the snapshot and the tower now differ: both must be saved

    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["video_layout"]["add_faster_video"] is True
    assert stored["autoregressive_config"]["target_encoder"] == "copy"
    keys = saved_keys(tmp_path)
    assert "faster_token" in keys and any(k.startswith("autoregressive_module.target_encoder.") for k in keys)
    assert keys == set(model.state_dict())  # names as in state_dict(): the Trainer's resume loads them as is

    for reloaded in (LlavaVideoForConditionalGeneration.from_pretrained(tmp_path),
                     build_model({"model_name_or_path": str(tmp_path), "freeze_vision_tower": False})):
        assert reloaded.video_layout == model.video_layout
        assert reloaded.config.autoregressive_config == model.config.autoregressive_config
        assert reloaded.autoregressive_module.target_encoder_mode == "copy"
        assert_same_state(model, reloaded)
        model.eval(), reloaded.eval()
        with torch.no_grad():
            a, b = model(**batch), reloaded(**batch)
        assert torch.equal(a.logits, b.logits)
        assert a.loss_components == b.loss_components


def test_shared_target_encoder_saved_once_and_restored(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": AR_SMALL})
    assert model.autoregressive_module.target_encoder_mode == "shared"
    train_step(model, video_batch(model, [3], max_frames=3))
    model.save_pretrained(tmp_path)
    ar_keys = {k for k in saved_keys(tmp_path) if k.startswith("autoregressive_module.")}
    assert ar_keys and all(k.startswith("autoregressive_module.predictor.") for k in ar_keys)
    reloaded = LlavaVideoForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.autoregressive_module.target_encoder_mode == "shared"
    assert not any(p.requires_grad for p in reloaded.vision_tower.parameters())
    assert_same_state(model, reloaded)


def test_checkpoint_target_mode_cannot_be_switched(tmp_path: Path) -> None:
    torch.manual_seed(3)
    build_model({"enable_autoregressive": True, "autoregressive_config": AR_SMALL}).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="shares the vision tower.*freeze_vision_tower: true"):
        build_model({"model_name_or_path": str(tmp_path), "freeze_vision_tower": False})
    with pytest.raises(ConfigError, match="target_encoder='copy' differs from the checkpoint's 'shared'"):
        build_model({"model_name_or_path": str(tmp_path), "autoregressive_config": {"target_encoder": "copy"}})
    # Dropping the module on purpose keeps the rest of the checkpoint.
    plain = build_model({"model_name_or_path": str(tmp_path), "enable_autoregressive": False})
    assert not hasattr(plain, "autoregressive_module")


def test_loads_transformers_checkpoint_in_hub_format(tmp_path: Path) -> None:
    """transformers saves LLaVA-OneVision with legacy key names (as the llava-hf hub checkpoints are)."""
    torch.manual_seed(4)
    plain = LlavaOnevisionForConditionalGeneration(build_model({}).config)
    plain.save_pretrained(tmp_path)
    assert "language_model.lm_head.weight" in saved_keys(tmp_path)
    ours = LlavaVideoForConditionalGeneration.from_pretrained(tmp_path)
    assert_same_state(plain, ours, trainable=False)
    faster = build_model({"model_name_or_path": str(tmp_path), "add_faster_video": True})
    expected = plain.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in faster.state_dict().items() if key != "faster_token")
    token = faster.faster_token.detach()  # new parameter: initialised like image_newline (std 1/sqrt(64))
    assert torch.isfinite(token).all() and 0.06 < float(token.std()) < 0.25


@pytest.mark.parametrize("target_encoder", ["shared", "copy"])
def test_bf16_model_reloads_its_float32_predictor_exactly(tmp_path: Path, target_encoder: str) -> None:
    """A bf16 model's predictor is float32 (attached after the bf16 model exists); every reload route
    gives back exactly the saved tensors and dtypes, so a resumed run trains at the fresh run's precision."""
    config = {"torch_dtype": "bfloat16", "enable_autoregressive": True, "freeze_vision_tower": target_encoder == "shared",
              "autoregressive_config": {**AR_SMALL, "target_encoder": target_encoder}}
    torch.manual_seed(0)
    model = build_model(config)
    assert {p.dtype for p in model.autoregressive_module.predictor.parameters()} == {torch.float32}
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        saved = {k: weights.get_tensor(k) for k in weights.keys()}
    assert {v.dtype for k, v in saved.items() if ".predictor." in k} == {torch.float32}
    reloads = [build_model({**config, "model_name_or_path": str(tmp_path), "torch_dtype": dtype})
               for dtype in ("bfloat16", "auto")]
    reloads.append(LlavaVideoForConditionalGeneration.from_pretrained(tmp_path))
    for reloaded in reloads:
        state = reloaded.state_dict()
        assert state.keys() == saved.keys()
        for key, value in saved.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
