"""build_model: config checks, freezing and gradients, the autoregressive module's wiring."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from model_support import AR_SMALL, video_batch

from lmms_engine.models.builder import ModelConfig, build_model
from lmms_engine.utils.config import ConfigError



def grads_by_group(model) -> dict[str, set[bool]]:
    """For each part, the set of 'has a nonzero gradient' over its parameters."""
    groups = {
        "tower": "model.vision_tower.", "tower_post_layernorm": "model.vision_tower.post_layernorm.",
        "projector": "model.multi_modal_projector.", "image_newline": "model.image_newline",
        "faster_token": "faster_token", "llm": "model.language_model.", "lm_head": "lm_head.",
        "predictor": "autoregressive_module.predictor.", "target_copy": "autoregressive_module.target_encoder.",
    }
    found: dict[str, set[bool]] = {}
    for name, param in model.named_parameters():
        group = max((g for g, prefix in groups.items() if name.startswith(prefix)), key=lambda g: len(groups[g]))
        found.setdefault(group, set()).add(param.grad is not None and bool(param.grad.abs().sum() > 0))
    return found


@pytest.mark.parametrize("freeze", [(True, False, False), (False, False, False), (True, True, True),
                                    (False, True, True)])
def test_gradients_follow_freeze_options(freeze: tuple[bool, bool, bool]) -> None:
    tower_frozen, projector_frozen, llm_frozen = freeze
    torch.manual_seed(0)
    model = build_model({
        "freeze_vision_tower": tower_frozen, "freeze_projector": projector_frozen,
        "freeze_language_model": llm_frozen, "add_faster_video": True, "faster_token_stride": 2,
        "enable_autoregressive": True, "autoregressive_config": AR_SMALL,
    })
    assert model.autoregressive_module.target_encoder_mode == ("shared" if tower_frozen else "copy")
    model(**video_batch(model, [4, 3], max_frames=4)).loss.backward()
    grads = grads_by_group(model)
    assert grads["tower"] == {not tower_frozen}
    assert grads["tower_post_layernorm"] == {False}  # unused by the LLM: frozen in every case (DDP)
    for group in ("projector", "image_newline", "faster_token"):
        assert grads[group] == {not projector_frozen}, group
    assert grads["llm"] == {not llm_frozen} and grads["lm_head"] == {not llm_frozen}
    assert grads["predictor"] == {True}
    if tower_frozen:
        assert "target_copy" not in grads  # shared: no second tower
    else:
        assert grads["target_copy"] == {False}
        assert not any(p.requires_grad for p in model.autoregressive_module.target_encoder.parameters())


def test_autoregressive_loss_components_and_shared_features() -> None:
    torch.manual_seed(1)
    model = build_model({"enable_autoregressive": True,
                         "autoregressive_config": {**AR_SMALL, "use_fast_slow_frames": True, "num_fast": 3,
                                                   "num_slow": 2, "slow_stride": 2, "window": "all"}})
    batch = video_batch(model, [4, 3], max_frames=4)
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with pytest.warns(UserWarning):  # a 3-frame video clips the fast stream
        out = model(**batch)
    hook.remove()
    assert calls == [7]  # shared target encoder: the model's one vision forward is reused
    parts = out.loss_components
    assert set(parts) == {"main_loss", "autoregressive_loss", "ar_mse", "ar_copy_last_mse", "ar_fast_loss",
                          "ar_slow_loss", "total_loss"}
    assert all(not v.requires_grad and v.dim() == 0 for v in parts.values())
    torch.testing.assert_close(parts["main_loss"] + parts["autoregressive_loss"], parts["total_loss"])
    torch.testing.assert_close(out.loss.detach(), parts["total_loss"])
    torch.testing.assert_close(parts["autoregressive_loss"], 0.1 * parts["ar_mse"])
    assert out.vision_features.shape == (2, 4, 64, 64)
    assert torch.equal(out.vision_features[1, 3], torch.zeros(64, 64))  # padding frame: never encoded

    # Gradient accumulation: every term normalised by a step with 4x this batch's units gives 1/4.
    local = int((batch["labels"][:, 1:] != -100).sum())
    units = out.loss_terms.counts()
    assert int(units["language_model"]) == local
    assert {k: int(v) for k, v in model.count_loss_units(batch).items()} == {k: int(v) for k, v in units.items()}
    scaled = out.loss_terms.objective({k: 4 * v for k, v in units.items()})
    torch.testing.assert_close(scaled.detach(), parts["total_loss"] / 4)
    torch.testing.assert_close(out.loss_terms.parts()["main_loss"].detach(), parts["main_loss"])


def test_text_only_batch_with_autoregressive_module() -> None:
    torch.manual_seed(2)
    for tower_frozen in (True, False):
        model = build_model({"freeze_vision_tower": tower_frozen, "enable_autoregressive": True,
                             "autoregressive_config": AR_SMALL})
        ids = torch.randint(5, 400, (2, 10))
        out = model(input_ids=ids, labels=ids)
        assert out.loss_components["autoregressive_loss"] == 0
        torch.testing.assert_close(out.loss.detach(), out.loss_components["main_loss"])
        out.loss.backward()
        # Exact zeros still reach the predictor and every trainable visual parameter, so a text-only
        # batch on one DDP rank backpropagates through the same parameters as a video batch elsewhere.
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=ids, labels=ids).loss, out.loss.detach())
        touched = list(model.autoregressive_module.predictor.parameters()) + [model.model.image_newline]
        touched += list(model.model.multi_modal_projector.parameters())
        touched += [] if tower_frozen else [p for p in model.vision_tower.parameters() if p.requires_grad]
        assert all(p.grad is not None and not p.grad.any() for p in touched)
        assert not any(p.grad is not None for p in model.vision_tower.post_layernorm.parameters())


def test_guide_full_example_sets_layout_and_debug_snippet_works() -> None:
    model = build_model({
        "enable_autoregressive": True,
        "autoregressive_config": {"num_hist": 3, "loss_weight": 0.1, "num_heads": 8, "num_layers": 1,
                                  "use_frame_causal_mask": True, "enable_multiscale_pooling": True,
                                  "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "average",
                                  "add_faster_video": True},
    })
    layout = model.video_layout
    assert (layout.mm_spatial_pool_stride, layout.mm_spatial_pool_mode, layout.add_faster_video) == (2, "average", True)
    assert model.faster_token is not None
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        if hasattr(model, 'autoregressive_module'):
            print("autoregressive module loaded")
            print(f"loss weight: {model.autoregressive_module.loss_weight}")
            print(f"multi-scale pooling: {model.autoregressive_module.enable_multiscale_pooling}")
        else:
            print("no autoregressive module found")
    assert stdout.getvalue() == "autoregressive module loaded\nloss weight: 0.1\nmulti-scale pooling: True\n"
    assert not hasattr(build_model({}), "autoregressive_module")


@pytest.mark.parametrize("spec, message", [
    ({"mm_spatial_pool_stride": 4, "autoregressive_config": {"enable_multiscale_pooling": True,
                                                             "mm_spatial_pool_stride": 2}},
     r"model_config.mm_spatial_pool_stride=4 disagrees with "
     r"model_config.autoregressive_config.mm_spatial_pool_stride=2"),
    ({"mm_spatial_pool_mode": "bilinear", "autoregressive_config": {"enable_multiscale_pooling": True}},
     r"mm_spatial_pool_mode='bilinear' disagrees with .*autoregressive_config.mm_spatial_pool_mode='average' "
     r"\(its default\)"),
    ({"autoregressive_config": {"mm_spatial_pool_stride": 4}},
     r"autoregressive_config.mm_spatial_pool_stride=4 differs .* no effect while enable_multiscale_pooling"),
    ({"mm_spatial_pool_strid": 4}, r"unknown key 'mm_spatial_pool_strid' \(did you mean 'mm_spatial_pool_stride'"),
    ({"autoregressive_config": {"los_weight": 0.1}},
     r"autoregressive_config.*'los_weight'.*did you mean 'loss_weight'"),
    ({"autoregressive_config": {"vision_feature_layer": -2}}, r"vision_feature_layer=-2 differs from the model's"),
    ({"mm_spatial_pool_mode": "mean"},
     r"model_config.mm_spatial_pool_mode: expected 'average' \| 'max' \| 'bilinear'.* got 'mean'"),
    ({"model_name_or_path": "x", "tiny_config": {}}, r"tiny_config only applies without model_name_or_path"),
    ({"tiny_config": {"vision_config": {"patch_sise": 8}}}, r"did you mean 'patch_size'"),
])
def test_config_errors(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(spec)


def test_gradient_checkpointing_and_bf16() -> None:
    torch.manual_seed(3)
    plain = build_model({"freeze_vision_tower": False})
    torch.manual_seed(3)
    ckpt = build_model({"freeze_vision_tower": False, "gradient_checkpointing": True})
    assert ckpt.model.language_model.gradient_checkpointing and not plain.model.language_model.gradient_checkpointing
    batch = video_batch(plain, [2], max_frames=2)
    plain(**batch).loss.backward()
    ckpt(**batch).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)

    half = build_model(ModelConfig(torch_dtype="bfloat16"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    out = half(**batch)  # float32 pixels are cast to the tower's dtype
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_vocabulary_and_special_ids_from_tokenizer() -> None:
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<image>": 3, "<video>": 4,
             **{f"w{i}": 5 + i for i in range(40)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>")), eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    tokenizer.backend_tokenizer.pre_tokenizer = Whitespace()
    model = build_model({}, tokenizer=tokenizer)
    assert model.config.text_config.vocab_size == len(tokenizer) == 45
    assert (model.config.video_token_id, model.config.image_token_id) == (4, 3)
    assert model.config.text_config.pad_token_id == 0
    bigger = build_model({"tiny_config": {"vocab_size": 64}}, tokenizer=tokenizer)
    assert bigger.lm_head.out_features == 64
    with pytest.raises(ConfigError, match="vocab_size=16 is smaller than the tokenizer's 45 tokens"):
        build_model({"tiny_config": {"vocab_size": 16}}, tokenizer=tokenizer)
