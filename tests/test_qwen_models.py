"""The Qwen2.5-VL / Qwen3-VL models: equal to plain transformers, the autoregressive reading (temporal
groups, raster-order pre-merger targets), no leak from later groups, packing, save/reload, builder."""

from __future__ import annotations

import pytest
import torch
from qwen_support import QWEN_AR, collate, qwen_dataset, qwen_records, tiny_checkpoint
from transformers import AutoModelForImageTextToText

from lmms_engine.data.qwen_vision import mm_token_type_ids
from lmms_engine.models.builder import build_model
from lmms_engine.models.qwen_vl_common import merge_window_mean, qwen_model_class
from lmms_engine.utils.config import ConfigError

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
ALL_FAMILIES = ["qwen2_vl", *FAMILIES]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return qwen_records(tmp_path_factory.mktemp("qwen_data"))


def _build(checkpoint, **model_config):
    from transformers import AutoTokenizer

    return build_model({"model_name_or_path": str(checkpoint), **model_config}, AutoTokenizer.from_pretrained(checkpoint))


def _plain_inputs(batch, config):
    out = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")}
    out["mm_token_type_ids"] = mm_token_type_ids(batch["input_ids"], config.video_token_id, config.image_token_id)
    if config.model_type == "qwen2_5_vl":
        out["second_per_grid_ts"] = batch["second_per_grid_ts"]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_dataset_tokens_and_grids(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    first, second, text = dataset[0], dataset[1], dataset[2]
    # a.mp4: 30 frames at 10 fps = 3 s, sampled at 2 fps -> 6 frames -> 3 groups; resized within
    # [4, 8] LLM tokens' worth of pixels per frame: 48 x 96 -> Qwen2.5 (factor 28): 56 x 84 -> 4 x 6 patches -> 2 x 3
    # tokens per group; Qwen3 (factor 32): 64 x 96 -> 4 x 6 patches -> 2 x 3.
    assert first["video_grid_thw"].tolist() == [[3, 4, 6]] and first["video_num_frames"] == 3
    # b.mp4: 2 s -> 4 frames -> 2 groups, 96 x 48 -> 6 x 4 patches
    assert second["video_grid_thw"].tolist() == [[2, 6, 4]]
    pad = dataset.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((first["input_ids"] == pad).sum()) == 3 * 6 and int((second["input_ids"] == pad).sum()) == 2 * 6
    starts = int((first["input_ids"] == dataset.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum())
    assert starts == (3 if family == "qwen3_vl" else 1)  # Qwen3-VL: one vision_start/end pair per group
    assert first["pixel_values_videos"].shape == (3 * 4 * 6, 3 * 2 * dataset.processing.patch_size ** 2)
    assert "pixel_values_videos" not in text and text["video_num_frames"] == 0
    labelled = dataset.tokenizer.decode(first["input_ids"][first["labels"] != -100])
    assert labelled == "A square moves.<|im_end|>"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logits_equal_plain_transformers_with_left_padding(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    batch = collate(qwen_dataset(checkpoint, records), [0, 1, 2], padding_side="left")
    ours = qwen_model_class(family).from_pretrained(checkpoint).eval()
    plain = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        got = ours(**batch).logits
        expected = plain(**_plain_inputs(batch, plain.config)).logits
    real = batch["attention_mask"].bool()
    diff = (got - expected)[real].abs().max().item()
    print(f"{family}: max abs logit difference vs transformers (left padding, 2 videos + text): {diff:.3g}")
    assert diff <= 1e-5


def test_qwen2_5_targets_undo_the_window_order(tmp_path_factory, records):
    """The merger applied to our raster-ordered pre-merger units gives transformers' merged output (which
    transformers reorders itself): the targets are in the order of the LLM's video tokens."""
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    batch = collate(qwen_dataset(checkpoint, records), [0, 1])
    model = qwen_model_class("qwen2_5_vl").from_pretrained(checkpoint).eval()
    with torch.no_grad():
        out = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)
        raster = model._targets_in_raster_order(out.last_hidden_state, batch["video_grid_thw"])
        merged = model.model.visual.merger(raster)
        window_ordered = model.model.visual.merger(out.last_hidden_state)
    assert torch.allclose(merged, torch.cat(out.pooler_output), atol=1e-6)
    assert not torch.allclose(window_ordered, merged, atol=1e-3)  # the trap is real on this grid
    targets = model.video_targets(out.last_hidden_state, batch["video_grid_thw"])
    assert [tuple(t.shape) for t in targets] == [(3, 6, 64), (2, 6, 64)]
    assert torch.allclose(torch.cat([t.flatten(0, 1) for t in targets]), merge_window_mean(raster, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_leak_from_later_groups(tmp_path_factory, records, family):
    """Changing the frames of the last group changes nothing at earlier groups' tokens: LLM hidden states,
    targets and the predictor's outputs."""
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    batch = collate(qwen_dataset(checkpoint, records), [0])
    model = _build(checkpoint, autoregressive_config=QWEN_AR).eval()
    changed = dict(batch)
    pixels = batch["pixel_values_videos"].clone()
    per_group = pixels.shape[0] // 3
    pixels[2 * per_group:] = torch.randn_like(pixels[2 * per_group:])
    changed["pixel_values_videos"] = pixels
    module = model.autoregressive_module
    outs = []
    for inputs in (batch, changed):
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
            hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 pixel_values_videos=inputs["pixel_values_videos"],
                                 video_grid_thw=inputs["video_grid_thw"],
                                 mm_token_type_ids=mm_token_type_ids(inputs["input_ids"], model.config.video_token_id),
                                 **({"second_per_grid_ts": inputs["second_per_grid_ts"]}
                                    if family == "qwen2_5_vl" else {})).last_hidden_state
            positions = model.video_token_positions(inputs["input_ids"], inputs["video_grid_thw"])[0]
            frames = hidden.reshape(-1, hidden.shape[-1])[positions.reshape(-1)].view(1, 3, 6, -1)
            tokens = module.predictor.input_proj(frames)
            prediction = module.predictor(tokens[:, :2], grid=(2, 3))
            targets = model.video_targets(
                model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                               return_dict=True).last_hidden_state, inputs["video_grid_thw"])[0]
        outs.append((frames, prediction, targets, out.logits))
    (f0, p0, t0, _), (f1, p1, t1, _) = outs
    first_two = slice(0, 2)
    assert torch.equal(f0[:, first_two], f1[:, first_two]) and not torch.allclose(f0[:, 2], f1[:, 2])
    assert torch.equal(t0[first_two], t1[first_two]) and not torch.allclose(t0[2], t1[2])
    assert torch.equal(p0, p1)  # predictions of groups 1 and 2 read groups 0 and 1 only


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_equals_padding(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    model = _build(checkpoint, autoregressive_config=QWEN_AR).eval()
    padded = collate(dataset, [0, 1, 2])
    packed = collate(dataset, [0, 1, 2], packing_length=200)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        a = model(**padded)
        b = model(**packed)
    for name in ("main_loss", "autoregressive_loss", "ar_mse"):
        assert torch.allclose(a.loss_components[name], b.loss_components[name], atol=1e-5), name
    # the units the trainer counts before the step are the ones the forward sums over
    for inputs, out in ((padded, a), (packed, b)):
        counted = model.count_loss_units(inputs)
        assert {k: int(v) for k, v in counted.items()} == {k: int(v) for k, v in out.loss_terms.counts().items()}
    assert int(a.loss_terms.autoregressive["all"].count) == (2 + 1) * 6  # a: 3 groups, 2 windows; b: 2 groups
    # the packed row's logits at each sample's tokens equal the padded ones
    lengths = padded["attention_mask"].sum(1).tolist()
    order = [0, 1, 2]  # first-fit decreasing: all three fit in one row, longest first
    order.sort(key=lambda i: -lengths[i])
    col = 0
    for i in order:
        n = lengths[i]
        assert torch.allclose(b.logits[0, col:col + n], a.logits[i, :n], atol=1e-5)
        col += n


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_save_reload_and_plain_transformers(tmp_path_factory, tmp_path, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    batch = collate(qwen_dataset(checkpoint, records), [0, 1, 2])
    model = _build(checkpoint, autoregressive_config=QWEN_AR)
    out = model(**batch)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad.sign()
    model.save_pretrained(tmp_path)
    again = qwen_model_class(family).from_pretrained(tmp_path)
    assert again.autoregressive_module is not None
    state, reloaded = model.state_dict(), again.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)
    assert not any(p.requires_grad for p in again.vision_tower_parameters())  # shared target: tower frozen again
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(plain) in type(model).__mro__  # transformers' own class of the family
    model.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - plain(**_plain_inputs(batch, plain.config)).logits)[batch["attention_mask"].bool()]
    assert diff.abs().max() <= 1e-5


def test_builder_errors_and_freezing(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    with pytest.raises(ConfigError, match="mm_spatial_pool_stride.*qwen2_5_vl"):
        _build(checkpoint, mm_spatial_pool_stride=2)
    with pytest.raises(ConfigError, match="add_faster_video.*qwen2_5_vl"):
        _build(checkpoint, autoregressive_config={**QWEN_AR, "add_faster_video": True})
    model = _build(checkpoint, freeze_vision_tower=False, freeze_projector=True, freeze_language_model=True,
                   autoregressive_config=QWEN_AR)
    assert all(p.requires_grad for p in model.vision_tower_parameters())
    assert not any(p.requires_grad for p in model.model.visual.merger.parameters())
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
    assert model.autoregressive_module.target_encoder_mode == "copy"  # the tower trains: a frozen copy
    assert not any(p.requires_grad for p in model.autoregressive_module.target_encoder.parameters())
    assert model.autoregressive_module.config.embedding_dim == 64


def test_fps_default_count_sampling_and_time_ranges(tmp_path_factory, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen3_vl")
    by_fps = qwen_dataset(checkpoint, records)  # fps null: Qwen's 2 fps -> 3 s = 6 frames = 3 groups
    by_count = qwen_dataset(checkpoint, records, force_sample=True, max_frames=4)  # exactly 4 frames
    assert by_fps[0]["video_grid_thw"][0, 0] == 3 and by_count[0]["video_grid_thw"][0, 0] == 2
    # record 3: a.mp4 from 1.0 s: frames at 1.0, 1.5, 2.0, 2.5 s -> groups at 1.25 and 2.25 s
    ranged = by_fps[3]
    assert ranged["video_grid_thw"][0, 0] == 2
    text = by_fps.tokenizer.decode(ranged["input_ids"])
    assert "<1.2 seconds><|vision_start|>" in text and "<2.2 seconds><|vision_start|>" in text
    assert "<0.2 seconds>" not in text


def test_generation_equals_transformers_and_evaluate_block(tmp_path_factory, tmp_path, records):
    """Greedy answers of the engine's class equal plain transformers'; the evaluate block scores a Qwen-VL
    checkpoint: accuracy and next-frame reconstruction per offset."""
    from lmms_engine.data.qwen_dataset import QwenVideoCollator
    from lmms_engine.eval.config import run_evaluate

    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen3_vl")
    dataset = qwen_dataset(checkpoint, records)
    prompts = [dataset.generation_sample(i) for i in range(3)]
    batch = QwenVideoCollator(pad_token_id=dataset.tokenizer.pad_token_id, padding_side="left")(prompts)
    batch.pop("labels")
    ours = qwen_model_class("qwen3_vl").from_pretrained(checkpoint).eval()
    plain = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    inputs = _plain_inputs(batch, plain.config)
    expected = plain.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(**batch, max_new_tokens=4, do_sample=False), expected)

    trained = tmp_path / "trained"
    _build(checkpoint, autoregressive_config=QWEN_AR).save_pretrained(trained)
    dataset.tokenizer.save_pretrained(trained)
    results = run_evaluate({"checkpoint": str(trained), "data_path": str(records), "output_dir": str(tmp_path),
                            "dataset_config": {"data_path": str(records), "video_min_pixels": 4096,
                                               "video_max_pixels": 8192},
                            "max_new_tokens": 4, "device": "cpu", "progress": False})
    assert results["num_samples"] == 4 and 0.0 <= results["accuracy"]["overall"]["accuracy"] <= 1.0
    recon = results["reconstruction"]
    # records: 3, 2 and 2 groups (num_hist 2): offset 1 has 2 + 1 + 1 windows, offset 2 one window
    assert [row["windows"] for row in recon["by_offset"]] == [4, 1]
    assert recon["full_history"]["mse"] > 0 and recon["full_history"]["copy_last_mse"] > 0
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 4


def test_bfloat16_model_keeps_a_float32_predictor_across_reload(tmp_path_factory, tmp_path, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    batch = collate(qwen_dataset(checkpoint, records), [0, 1])
    model = _build(checkpoint, torch_dtype="bfloat16", autoregressive_config=QWEN_AR)
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.autoregressive_module.predictor.input_proj.weight.dtype == torch.float32
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.autoregressive_module.predictor.input_proj.weight.grad is not None
    model.save_pretrained(tmp_path)
    again = qwen_model_class("qwen2_5_vl").from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, value in model.autoregressive_module.state_dict().items():
        reloaded = again.autoregressive_module.state_dict()[name]
        assert reloaded.dtype == value.dtype and torch.equal(reloaded, value), name


def test_config_check_knows_the_family_before_loading(tmp_path_factory, tmp_path):
    """--dry-run level: layout keys for a Qwen-VL folder, a wrong embedding_dim (Qwen2-VL's width is its
    embed_dim, not its vision hidden_size) and an unsupported model_type are config errors."""
    import json

    from lmms_engine.launch.config import load_pipeline_config

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}]}]))

    def check(checkpoint, **model_config):
        path = tmp_path / "c.json"
        path.write_text(json.dumps([{"type": "trainer", "config": {
            "model_config": {"model_name_or_path": str(checkpoint), **model_config},
            "dataset_config": {"data_path": str(data)}, "report_to": "none"}}]))
        return load_pipeline_config(path)

    qwen2 = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    check(qwen2, autoregressive_config={"embedding_dim": 64})
    with pytest.raises(ConfigError, match="mm_newline_position.*qwen2_vl"):
        check(qwen2, mm_newline_position="grid")
    with pytest.raises(ConfigError, match="enable_multiscale_pooling.*qwen2_vl"):
        check(qwen2, autoregressive_config={"enable_multiscale_pooling": True})
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="'gpt2' checkpoint; supported: llava_onevision, qwen2_vl"):
        check(other)


@pytest.mark.parametrize("family", FAMILIES)
def test_length_estimates_equal_loaded_lengths(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    estimates = dataset.length_estimates()
    assert [e.length for e in estimates] == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert all(e.exact for e in estimates) and [e.num_frames for e in estimates] == [6, 4, 0, 4]
    assert [e.video_tokens for e in estimates] == [18, 12, 0, 12]
    longest = max(e.length for e in estimates)
    trimmed = qwen_dataset(checkpoint, records, drop_long_before_loading=True, max_length=longest - 1,
                           truncation="drop")
    assert len(trimmed) == len(dataset) - sum(e.length == longest for e in estimates)
