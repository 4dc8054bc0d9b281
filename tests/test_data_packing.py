"""Sequence packing: the collator's packed rows and the model's per-sample attention and losses on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import set_seed

from lmms_engine.data.chat import IGNORE_INDEX
from lmms_engine.data.collator import VideoSFTCollator, build_collator, first_fit_decreasing
from lmms_engine.data.dataset import DatasetConfig, build_dataset
from lmms_engine.data.demo import MOTION_QUESTION_TYPES, generate_demo_dataset
from lmms_engine.data.preprocess import ProcessorInfo
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.models.builder import build_model

# the 2-frame video is shorter than a full window (num_hist + 1 = 3 frames); the module says so once
pytestmark = pytest.mark.filterwarnings("ignore:autoregressive reconstruction.*shorter than num_hist")

AR = {"embedding_dim": 64, "num_hist": 2, "num_heads": 4, "num_layers": 1, "loss_weight": 0.5, "dropout": 0.0}
PACKING_LENGTH = 200  # the four samples below (116, 102, 84, 64 tokens) fill exactly two rows
GRAD_PARAMS = (
    "lm_head.weight",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.multi_modal_projector.linear_1.weight",
    "model.image_newline",
    "autoregressive_module.predictor.input_proj.weight",
)
P = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def samples(tok, tmp_path_factory) -> list[dict]:
    """Four real samples: videos of 2, 4 and 3 frames and a two-turn text-only conversation."""
    root: Path = tmp_path_factory.mktemp("packing")
    generate_demo_dataset(root, 3, 0, seed=1, num_frames=12, question_types=MOTION_QUESTION_TYPES, progress=False)
    text = [{"conversations": [{"from": "human", "value": "Say hello twice."}, {"from": "gpt", "value": "hello hello"},
                               {"from": "human", "value": "And once more?"}, {"from": "gpt", "value": "hello"}]}]
    (root / "text.json").write_text(json.dumps(text))
    info = ProcessorInfo(image_size=64, patch_size=8)

    def dataset(path: Path, max_frames: int = 8):
        return build_dataset(DatasetConfig(data_path=str(path), max_frames=max_frames), tok, info)

    train = root / "train.json"
    out = [dataset(train, 2)[0], dataset(train, 4)[1], dataset(root / "text.json")[0], dataset(train, 3)[2]]
    assert [len(s["input_ids"]) for s in out] == [84, 116, 64, 102]
    assert [s["video_num_frames"] for s in out] == [2, 4, 0, 3]
    return out


def make_model(tok, target_encoder: str):
    set_seed(0)
    ar_config = {**AR, "target_encoder": target_encoder}
    model = build_model({"enable_autoregressive": True, "autoregressive_config": ar_config}, tok).float()
    assert model.autoregressive_module.target_encoder_mode == target_encoder
    return model


def collate(tok, samples, packing_length=None):
    return VideoSFTCollator(pad_token_id=tok.pad_token_id, packing_length=packing_length)(samples)


def spans(batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample of a packed batch, from its position ids."""
    out = []
    for r, row in enumerate(batch["position_ids"].tolist()):
        starts = [c for c, p in enumerate(row) if p == 0] + [len(row)]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


def packed_sample_spans(batch, lengths: list[int]) -> dict[int, tuple[int, int, int]]:
    """Sample index -> (row, start, end), matching spans to the samples' lengths (they all differ)."""
    by_length = {n: i for i, n in enumerate(lengths)}
    return {by_length[b - a]: (r, a, b) for r, a, b in spans(batch) if b - a in by_length}


def run(model, batch, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    grads = {}
    if train:
        out.loss.backward()
        params = dict(model.named_parameters())
        grads = {name: params[name].grad.clone() for name in GRAD_PARAMS}
    return out, grads


@pytest.mark.parametrize("target_encoder", ["shared", "copy"])
def test_packed_batch_gives_the_unpacked_losses_logits_and_gradients(tok, samples, target_encoder):
    model = make_model(tok, target_encoder)
    padded = collate(tok, samples)
    packed = collate(tok, samples, PACKING_LENGTH)
    assert packed["input_ids"].shape == (2, 200) and "attention_mask" not in packed
    # the 4- and 2-frame videos share row 0; the 3-frame video and the text-only sample row 1
    assert packed["video_row"].tolist() == [0, 0, 1] and packed["video_num_frames"].tolist() == [4, 2, 3]
    where = packed_sample_spans(packed, [len(s["input_ids"]) for s in samples])
    for train in (False, True):
        ref, ref_grads = run(model, padded, train)
        out, grads = run(model, packed, train)
        for key in ("main_loss", "autoregressive_loss", "ar_mse", "total_loss"):
            torch.testing.assert_close(out.loss_components[key], ref.loss_components[key], rtol=1e-5, atol=0)
        assert float(ref.loss_components["autoregressive_loss"]) > 0  # the AR term really is compared
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
        for i, (r, a, b) in where.items():
            torch.testing.assert_close(out.logits[r, a:b], ref.logits[i, :b - a], rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)
            assert grads[name].abs().sum() > 0, name
        assert len(grads) == (len(GRAD_PARAMS) if train else 0)

    # the trainer's step-normalised loss (units of a step 3x this batch) agrees too
    items = int((padded["labels"][:, 1:] != P).sum())
    assert items == int((packed["labels"][:, 1:] != P).sum())
    units = {k: 3 * v for k, v in model.count_loss_units(padded).items()}
    assert units == {k: 3 * v for k, v in model.count_loss_units(packed).items()}
    assert int(units["language_model"]) == 3 * items
    model.eval()
    with torch.no_grad():
        a = model(**padded).loss_terms.objective(units)
        b = model(**packed).loss_terms.objective(units)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)


def test_packed_faster_video_layout_gives_the_unpacked_losses(tok):
    """Slow and fast frames, per-row newlines and faster tokens: both position indexes of the layout."""
    from model_support import video_batch

    set_seed(0)
    layout = {"mm_spatial_pool_mode": "average", "mm_newline_position": "grid", "add_faster_video": True,
              "faster_token_stride": 2}
    model = build_model({**layout, "enable_autoregressive": True, "autoregressive_config": dict(AR)}, tok).float()
    frames = [3, 5, 0, 4]
    rows = video_batch(model, frames, max_frames=5, seed=3)
    samples = []
    for b, n in enumerate(frames):
        tokens = model.video_layout.video_token_count(n, model.patch_side) if n else 0
        ids = rows["input_ids"][b, :tokens + 2 + 3 * b]
        sample = {"input_ids": ids, "labels": ids.clone(), "video_num_frames": n}
        if n:
            sample["pixel_values_videos"] = rows["pixel_values_videos"][b, :n]
        samples.append(sample)
    packed = collate(tok, samples, 128)
    assert packed["input_ids"].shape[0] == 2 and packed["video_row"].tolist() == [0, 1, 1]
    for train in (False, True):
        ref, ref_grads = run(model, collate(tok, samples), train)
        out, grads = run(model, packed, train)
        assert "ar_mse" in out.loss_components and float(ref.loss_components["autoregressive_loss"]) > 0
        for key in ("main_loss", "autoregressive_loss", "total_loss"):
            torch.testing.assert_close(out.loss_components[key], ref.loss_components[key], rtol=1e-5, atol=0)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)


def test_packed_text_only_batch_trains_like_the_unpacked_one(tok, samples):
    model = make_model(tok, "shared")
    model.set_trainable(vision_tower=False, projector=True, language_model=True)
    text = [samples[2], {"input_ids": samples[2]["input_ids"][:40], "labels": samples[2]["labels"][:40],
                         "video_num_frames": 0}]
    packed = collate(tok, text, 128)
    assert packed["input_ids"].shape == (1, 104) and packed["video_row"].numel() == 0
    assert "pixel_values_videos" not in packed
    ref, ref_grads = run(model, collate(tok, text), True)
    out, grads = run(model, packed, True)
    torch.testing.assert_close(out.loss_components["main_loss"], ref.loss_components["main_loss"], rtol=1e-5, atol=0)
    assert float(out.loss_components["autoregressive_loss"]) == 0.0
    # the visual parameters still get their (zero) gradient: no rank waits for them under DDP
    assert torch.count_nonzero(grads["model.multi_modal_projector.linear_1.weight"]) == 0
    torch.testing.assert_close(grads["lm_head.weight"], ref_grads["lm_head.weight"], rtol=1e-5, atol=1e-7)


def test_packed_samples_do_not_see_each_other(tok, samples):
    model = make_model(tok, "shared").eval()
    packed = collate(tok, samples, PACKING_LENGTH)
    where = packed_sample_spans(packed, [len(s["input_ids"]) for s in samples])
    # row 1 holds the 3-frame video sample first, then the text-only sample
    (r, a, b), (r2, a2, b2) = where[3], where[2]
    assert r == r2 == 1 and b == a2
    changed = {k: v.clone() for k, v in packed.items()}
    text_cols = (changed["input_ids"][r, a:b] != model.config.video_token_id).nonzero().squeeze(1)[-10:] + a
    changed["input_ids"][r, text_cols] = (changed["input_ids"][r, text_cols] + 7) % 300 + 5
    with torch.no_grad():
        base = model(**packed).logits
        other = model(**changed).logits
        # control: the same rows under an all-ones mask, where the second sample sees the first
        leaky = model(**{**packed, "attention_mask": torch.ones_like(packed["input_ids"])}).logits
        leaky_changed = model(**{**changed, "attention_mask": torch.ones_like(packed["input_ids"])}).logits
    assert not torch.allclose(other[r, a:b], base[r, a:b])  # the edited sample itself changed
    torch.testing.assert_close(other[r2, a2:b2], base[r2, a2:b2], rtol=0, atol=1e-6)
    torch.testing.assert_close(other[0], base[0], rtol=0, atol=1e-6)  # the other row too
    assert (leaky_changed[r2, a2:b2] - leaky[r2, a2:b2]).abs().max() > 1e-3


def test_collator_packs_first_fit_decreasing_with_exact_positions_and_labels():
    def video(frames: int, value: float) -> torch.Tensor:
        return torch.full((frames, 3, 4, 4), value)

    samples = [
        {"input_ids": [10, 11, 12, 13, 14], "labels": [P, P, 12, 13, 14], "video_num_frames": 2,
         "pixel_values_videos": video(2, 1.0)},
        {"input_ids": [20, 21, 22], "labels": [20, 21, 22], "video_num_frames": 1, "pixel_values_videos": video(1, 2.0)},
        {"input_ids": [30, 31, 32, 33], "labels": [P, 31, 32, 33], "video_num_frames": 1,
         "pixel_values_videos": video(1, 3.0)},
        {"input_ids": [40, 41], "labels": [40, 41], "video_num_frames": 0},
    ]
    batch = VideoSFTCollator(pad_token_id=0, packing_length=8)(samples)
    assert set(batch) == {"input_ids", "labels", "position_ids", "pixel_values_videos", "video_num_frames",
                          "video_row"}
    # by length 5, 4, 3, 2: [5] -> row 0; [4] -> row 1; [3] fits row 0; [2] fits row 1
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22], [30, 31, 32, 33, 40, 41, 0, 0]]
    assert batch["labels"].tolist() == [[P, P, 12, 13, 14, P, 21, 22], [P, 31, 32, 33, P, 41, P, P]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch["video_row"].tolist() == [0, 0, 1]
    assert batch["video_num_frames"].tolist() == [2, 1, 1]
    pixels = batch["pixel_values_videos"]
    assert pixels.shape == (3, 2, 3, 4, 4)
    assert pixels[:, 0, 0, 0, 0].tolist() == [1.0, 2.0, 3.0] and pixels[1:, 1].abs().sum() == 0

    assert first_fit_decreasing([3, 5, 3, 2], 5) == [[1], [0, 3], [2]]  # ties keep batch order
    with pytest.raises(ValueError, match=r"sample 0 of the batch has 5 tokens, more than packing_length=4"):
        VideoSFTCollator(pad_token_id=0, packing_length=4)(samples)
    with pytest.raises(ValueError, match=r"packing needs padding_side='right'.*'left'"):
        VideoSFTCollator(pad_token_id=0, padding_side="left", packing_length=8)
    with pytest.raises(ValueError, match=r"sample 1: video_num_frames=2 but pixel_values_videos has 1 frames"):
        VideoSFTCollator(pad_token_id=0, packing_length=8)([samples[0], {**samples[1], "video_num_frames": 2}])


def test_build_collator_reads_packing_settings(tok):
    def collator(**kw):
        return build_collator(DatasetConfig(data_path="train.json", **kw), tok)

    assert collator().packing_length is None
    assert collator(packing=True, max_length=96).packing_length == 96
    assert collator(packing=True, max_length=96, packing_length=300).packing_length == 300
    with pytest.raises(ValueError, match="packing needs padding_side='right'"):
        collator(packing=True, padding_side="left")


def test_wrong_video_tokens_per_packed_row_are_named(tok, samples):
    model = make_model(tok, "shared").eval()
    packed = collate(tok, samples, PACKING_LENGTH)
    moved = {**packed, "video_row": torch.tensor([0, 1, 1])}  # the 2-frame video said to be in row 1
    with pytest.raises(ValueError, match=r"row 0 of the packed batch: expected 65 video tokens .*video 0 \(4 frames, "
                                         r"65 tokens\).* found 98"):
        model(**moved)
    short = {**packed, "input_ids": packed["input_ids"].clone()}
    col = int((short["input_ids"][1] == model.config.video_token_id).nonzero()[0])
    short["input_ids"][1, col] = 5
    with pytest.raises(ValueError, match=r"row 1 of the packed batch: expected 49 video tokens .*found 48"):
        model(**short)
    with pytest.raises(ValueError, match=r"video_row holds rows \[2\] outside \[0, 2\)"):
        model(**{**packed, "video_row": torch.tensor([0, 0, 2])})
    with pytest.raises(ValueError, match=r"pixel_values_videos must be \[V=2 \(entries of video_row\)"):
        model(**{**packed, "video_row": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="need position_ids"):
        model(**{k: v for k, v in packed.items() if k != "position_ids"})
