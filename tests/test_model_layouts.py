"""The model's video path: token layouts on the real embedding sequences, equality with transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lmms_engine.models.layout import VideoLayoutConfig
from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration
from lmms_engine.models.tiny import tiny_llava_config
from lmms_engine.video.pooling import spatial_pool

TEXT_IDS = (5, 400)  # plain text ids of the tiny vocabulary (no special ids inside)


def make_model(seed: int = 0, image_size: int = 64, **layout) -> LlavaVideoForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_llava_config(overrides={"vision_config": {"image_size": image_size}})
    config.video_layout = layout
    return LlavaVideoForConditionalGeneration(config).eval()


def make_batch(model, num_frames: list[int], max_frames: int, prefix: int = 3, suffix: int = 5, seed: int = 1):
    """Right-padded batch: ``prefix`` text tokens, the video run, ``suffix`` text tokens, padding."""
    gen = torch.Generator().manual_seed(seed)
    side = model.patch_side
    runs = [model.video_layout.video_token_count(n, side) if n else 0 for n in num_frames]
    length = prefix + max(runs) + suffix
    ids = torch.randint(*TEXT_IDS, (len(num_frames), length), generator=gen)
    mask = torch.ones_like(ids)
    for b, run in enumerate(runs):
        ids[b, prefix:prefix + run] = model.config.video_token_id
        end = prefix + run + suffix
        ids[b, end:] = model.config.text_config.pad_token_id
        mask[b, end:] = 0
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(num_frames), max_frames, 3, size, size, generator=gen)
    for b, n in enumerate(num_frames):
        pixels[b, n:] = 0
    return ids, mask, pixels, torch.tensor(num_frames)


def capture_inputs_embeds(model):
    """Record the embeddings the language model receives."""
    seen = {}

    def hook(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def expected_roles(num_frames: int, side: int, stride: int, newline: str, faster: bool, faster_stride: int,
                   mode: str = "bilinear") -> list[str]:
    """Hand-written LLaVA-NeXT/LLaVA-Video layout: P patch, N newline, F faster token."""
    roles: list[str] = []
    for t in range(num_frames):
        frame_stride = stride if (not faster or t % faster_stride == 0) else 2 * stride
        s = math.ceil(side / frame_stride) if mode == "bilinear" else side // frame_stride
        for _ in range(s):
            roles += ["P"] * s + (["N"] if newline == "grid" else [])
        roles += ["N"] if newline == "frame" else []
        roles += ["F"] if faster else []
    return roles + (["N"] if newline == "one_token" else [])


@pytest.mark.parametrize("faster", [False, True])
@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("newline", ["grid", "frame", "one_token", "no_token"])
def test_layout_on_embedding_sequence(newline: str, stride: int, faster: bool) -> None:
    model = make_model(mm_spatial_pool_stride=stride, mm_newline_position=newline, add_faster_video=faster,
                       faster_token_stride=2)
    side = model.patch_side  # 8x8 patches
    frames = [4, 2, 0]  # full video, shorter video, text only
    ids, mask, pixels, num = make_batch(model, frames, max_frames=4)
    tower_batches = []
    tower_hook = model.vision_tower.register_forward_hook(lambda m, a, o: tower_batches.append(a[0].shape[0]))
    seen, handle = capture_inputs_embeds(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_num_frames=num)
    handle.remove()
    tower_hook.remove()
    assert tower_batches == [6]  # only the real frames went through the tower
    embeds = seen["embeds"]
    layout = out.video_token_layout
    newline_vec = model.model.image_newline.detach()
    with torch.no_grad():
        _, projected = model.encode_frames(pixels[num > 0].flatten(0, 1))
    projected = projected.view(2, 4, side * side, -1)

    for b, n in enumerate(frames):
        roles = expected_roles(n, side, stride, newline, faster, 2) if n else []
        video_pos = (ids[b] == model.config.video_token_id).nonzero().flatten()
        assert len(video_pos) == len(roles)
        got = []
        for pos in video_pos.tolist():
            vec = embeds[b, pos]
            if torch.equal(vec, newline_vec):
                got.append("N")
            elif faster and torch.equal(vec, model.faster_token.detach()):
                got.append("F")
            else:
                got.append("P")
        assert got == roles
        separators = layout.separator_mask[b].nonzero().flatten().tolist()
        assert separators == [p for p, r in zip(video_pos.tolist(), roles) if r != "P"]
        # Frame t's patch tokens: the t-th run of P tokens, in row-major order, holding its pooled features.
        patch_pos = [p for p, r in zip(video_pos.tolist(), roles) if r == "P"]
        cursor = 0
        for t in range(4):
            slow = not faster or t % 2 == 0
            index = layout.slow if slow else layout.fast
            other = layout.fast if slow else layout.slow
            if t >= n:
                assert not index.frame_mask[b, t] and (index.positions[b, t] == -1).all()
                continue
            count = index.grid_side ** 2
            assert index.frame_mask[b, t]
            assert index.positions[b, t].tolist() == patch_pos[cursor:cursor + count]
            if other is not None:
                assert not other.frame_mask[b, t] and (other.positions[b, t] == -1).all()
            cursor += count
            pooled = spatial_pool(projected[b, t], index.pool_stride, "bilinear")
            torch.testing.assert_close(embeds[b, index.positions[b, t]], pooled, rtol=1e-5, atol=1e-6)
        assert cursor == len(patch_pos)
    assert layout.num_frames.tolist() == frames
    assert layout.slow.pool_stride == stride
    assert layout.slow.grid_side == math.ceil(side / stride)
    if faster:
        assert layout.fast.pool_stride == 2 * stride and layout.fast.grid_side == math.ceil(side / (2 * stride))
    else:
        assert layout.fast is None


@pytest.mark.parametrize("mode", ["average", "max"])
def test_floor_pool_modes_scatter_pooled_features(mode: str) -> None:
    model = make_model(mm_spatial_pool_mode=mode, mm_newline_position="frame")
    ids, mask, pixels, num = make_batch(model, [3], max_frames=3)
    seen, handle = capture_inputs_embeds(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels)
        _, projected = model.encode_frames(pixels[0])
    handle.remove()
    positions = out.video_token_layout.slow.positions[0]
    assert positions.shape == (3, 16)  # 8x8 -> 4x4
    torch.testing.assert_close(seen["embeds"][0, positions], spatial_pool(projected, 2, mode), rtol=1e-5, atol=1e-6)


def test_llava_video_27x27_grid_counts_on_real_forward() -> None:
    """27x27 patches, bilinear, grid newlines, faster video: 210 tokens per slow frame + its faster token,
    57 per fast frame including its faster token."""
    layout = VideoLayoutConfig(mm_newline_position="grid", add_faster_video=True, faster_token_stride=2)
    assert layout.video_token_count(3, 27) == 211 + 57 + 211
    model = make_model(image_size=216, mm_newline_position="grid", add_faster_video=True, faster_token_stride=2)
    assert model.patch_side == 27
    ids, mask, pixels, num = make_batch(model, [3], max_frames=3)
    seen, handle = capture_inputs_embeds(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels)
    handle.remove()
    video_pos = (ids[0] == model.config.video_token_id).nonzero().flatten()
    faster_at = [i for i, p in enumerate(video_pos.tolist())
                 if torch.equal(seen["embeds"][0, p], model.faster_token.detach())]
    assert faster_at == [210, 210 + 57, 210 + 57 + 211]
    newlines = [i for i, p in enumerate(video_pos.tolist())
                if torch.equal(seen["embeds"][0, p], model.model.image_newline.detach())]
    assert newlines[:14] == [15 * (r + 1) - 1 for r in range(14)]  # one after each 14-token row
    assert len(newlines) == 14 + 7 + 14
    assert out.video_token_layout.slow.grid_side == 14 and out.video_token_layout.fast.grid_side == 7


def test_token_count_mismatch_names_sample_and_counts() -> None:
    model = make_model()
    ids, mask, pixels, num = make_batch(model, [2, 2], max_frames=2)
    ids[1, 3] = TEXT_IDS[0]  # one video token of sample 1 lost
    with pytest.raises(ValueError, match=r"sample 1 of the batch: expected 33 video tokens .* found 32"):
        model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_num_frames=num)
    ids, mask, pixels, num = make_batch(model, [2, 0], max_frames=2)
    with pytest.raises(ValueError, match=r"sample 0 of the batch: expected 0 video tokens .*no video.* found 33"):
        model(input_ids=ids, attention_mask=mask)


def test_a_video_cut_by_truncation_is_rejected_not_masked() -> None:
    """One behaviour for frames lost to truncation: the model raises and says how to keep videos whole
    (a cut inside the run would shift every later frame onto the wrong tokens)."""
    model = make_model()
    ids, mask, pixels, num = make_batch(model, [2, 2], max_frames=2)
    cut = int((ids[1] == model.config.video_token_id).nonzero().max()) - 5  # right truncation inside the video
    ids, mask = ids[:, :cut], mask[:, :cut]
    with pytest.raises(ValueError, match=r"sample 0 of the batch: expected 33 video tokens .* found 27 .*never "
                                         r"cut: truncate whole exchanges"):
        model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_num_frames=num, labels=ids)


def hf_twin(model: LlavaVideoForConditionalGeneration) -> LlavaOnevisionForConditionalGeneration:
    """Plain transformers' model with the same config and weights (strict: no key of ours is missing)."""
    reference = LlavaOnevisionForConditionalGeneration(model.config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def test_default_layout_equals_transformers_llava_onevision() -> None:
    model = make_model(seed=3)
    reference = hf_twin(model)
    ids, mask, pixels, _ = make_batch(model, [3, 3], max_frames=3, seed=4)
    mask[1, -4:] = 0  # padding inside the batch
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, labels=labels)
        theirs = reference(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, labels=labels)
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.loss, theirs.loss)
        # num_items_in_batch (gradient accumulation): the raw token sum over 500 is transformers' loss
        theirs_n = reference(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, labels=labels,
                             num_items_in_batch=torch.tensor(500))
    ours_n = ours.loss_terms.objective({"language_model": torch.tensor(500)})
    torch.testing.assert_close(ours_n, theirs_n.loss)
    local = int((labels[:, 1:] != -100).sum())
    assert int(ours.loss_terms.language_model.count) == local
    torch.testing.assert_close(ours.loss_components["main_loss"], ours_n * 500 / local)
    torch.testing.assert_close(ours.loss_components["main_loss"], ours.loss)


def test_image_inputs_match_transformers() -> None:
    model = make_model(seed=5)
    reference = hf_twin(model)
    pixels = torch.randn(1, 2, 3, 64, 64)  # base tile + one 64 px tile (pinpoints [[64, 64]])
    sizes = torch.tensor([[64, 64]])
    with torch.no_grad():
        count = reference.model.get_image_features(pixels, sizes, return_dict=True).pooler_output[0].shape[0]
    ids = torch.randint(*TEXT_IDS, (1, count + 6))
    ids[0, 2:2 + count] = model.config.image_token_id
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        theirs = reference(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_text_only_batch_matches_transformers() -> None:
    model = make_model(seed=6)
    reference = hf_twin(model)
    ids = torch.randint(*TEXT_IDS, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=ids, labels=ids)
        theirs = reference(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits)
    assert ours.loss_components.keys() == {"main_loss", "total_loss"}
    assert ours.video_token_layout.num_frames.tolist() == [0, 0]
    assert ours.video_token_layout.slow.positions.shape == (2, 0, 16)
    assert not ours.video_token_layout.separator_mask.any()


def test_generate_with_video_runs_cached_decoding_consistently() -> None:
    """generate() prefills with the video, then decodes from the cache: same tokens as greedy re-forwarding."""
    model = make_model(seed=7)
    ids, mask, pixels, num = make_batch(model, [2], max_frames=2, suffix=3)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels,
                                   video_num_frames=num, max_new_tokens=3, do_sample=False)
        seq = ids
        for _ in range(3):
            logits = model(input_ids=seq, pixel_values_videos=pixels, video_num_frames=num).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_vision_feature_size_reads_the_tower_width_rule() -> None:
    model = make_model()
    vision = model.config.vision_config
    assert model.vision_feature_size == vision.hidden_size
    model.config.vision_feature_layer = [-2, -1]
    assert model.vision_feature_size == 2 * vision.hidden_size
    # a tower config with its own block width (embed_dim, as Qwen2-VL's) is read by models.vision.vision_width
    vision.embed_dim = vision.hidden_size + 8
    assert model.vision_feature_size == 2 * (vision.hidden_size + 8)
