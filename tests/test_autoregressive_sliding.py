"""The one-pass predictor (``window: sliding``): banded mask, kernels, causality, targets, loss contract."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from lmms_engine.models.autoregressive_config import AutoregressiveConfig
from lmms_engine.models.autoregressive_reconstruction import create_autoregressive_reconstruction_module
from lmms_engine.models.frame_attention import attention_flops, banded_attention
from lmms_engine.utils.flops import count_flops, flops_by_op
from lmms_engine.video.masks import banded_frame_causal_mask, frame_causal_mask
from lmms_engine.video.pooling import spatial_pool

WIDTH, HIDDEN, P = 64, 32, 4  # stride-4 pooling of the 8x8 grid: 2x2 = 4 tokens per frame


def make(window: str = "sliding", seed: int = 0, **overrides):
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=64, patch_size=8))
    tower.requires_grad_(False)
    config = {"embedding_dim": WIDTH, "num_heads": 4, "num_layers": 2, "num_hist": 3, "window": window,
              "enable_multiscale_pooling": True, "mm_spatial_pool_stride": 4, **overrides}
    torch.manual_seed(seed)
    return create_autoregressive_reconstruction_module(tower, HIDDEN, config).eval()


def prefix_layout(lengths: list[int], t: int):
    """A slow-stream layout of ``len(lengths)`` rows of ``t`` frames x ``P`` tokens where row ``b`` holds
    only its first ``lengths[b]`` frames (the rest absent, position -1)."""
    from lmms_engine.models.layout import FrameTokenIndex, VideoTokenLayout

    positions = torch.arange(t * P).view(1, t, P).repeat(len(lengths), 1, 1)
    for b, n in enumerate(lengths):
        positions[b, n:] = -1
    return VideoTokenLayout(slow=FrameTokenIndex(positions, (positions >= 0).all(-1), 2, 4), fast=None,
                            separator_mask=torch.zeros(len(lengths), t * P, dtype=torch.bool), pool_mode="average",
                            num_frames=torch.tensor(lengths))


def test_banded_mask_is_the_band_of_the_frame_causal_mask():
    for frames, per, band in [(1, 1, 1), (5, 2, 2), (6, 3, 3), (4, 2, 9)]:
        mask = banded_frame_causal_mask(frames, per, band)
        q = torch.arange(frames).repeat_interleave(per)
        expected = torch.tensor([[0 <= int(a) - int(b) < band for b in q] for a in q])
        assert torch.equal(mask, expected)
        assert torch.equal(mask & frame_causal_mask(frames, per), mask)
    assert torch.equal(banded_frame_causal_mask(4, 2, 4), frame_causal_mask(4, 2))


def test_block_skipping_kernels_equal_the_dense_mask():
    """The chunked kernel (CPU default) against one SDPA call with the full banded mask, values and
    gradients; flex attention's block mask (the GPU default) in eager mode, forward (CPU flex has no
    backward)."""
    torch.manual_seed(0)
    frames, per, band = 7, 5, 3
    q, k, v = (torch.randn(2, 2, frames * per, 8, requires_grad=True) for _ in range(3))
    dense = banded_attention(q, k, v, tokens_per_frame=per, band=band, backend="dense")
    grads = torch.autograd.grad(dense.square().sum(), (q, k, v))
    out = banded_attention(q, k, v, tokens_per_frame=per, band=band, backend="chunked")
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from lmms_engine.models.frame_attention import band_block_mask

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is the unfused reference
        out = flex.flex_attention(q.detach(), k.detach(), v.detach(),
                                  block_mask=band_block_mask(frames * per, per, band, "cpu"))
    torch.testing.assert_close(out, dense.detach(), atol=1e-5, rtol=1e-5)


def test_future_frames_never_change_earlier_predictions_and_the_band_limits_one_layer():
    module = make(num_layers=1)
    x = torch.randn(2, 8, P, HIDDEN)
    base = module.predict(x)
    for t in range(7):
        changed = x.clone()
        changed[:, t + 1:] += 5 * torch.randn_like(changed[:, t + 1:])
        torch.testing.assert_close(module.predict(changed)[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
    # One layer: position 6 attends frames 4, 5, 6 only (num_hist = 3).
    changed = x.clone()
    changed[:, :4] += 5
    torch.testing.assert_close(module.predict(changed)[:, 6], base[:, 6], rtol=0, atol=1e-5)
    changed = x.clone()
    changed[:, 4] += 5
    assert (module.predict(changed)[:, 6] - base[:, 6]).abs().max() > 1e-2


def test_temporal_positions_do_not_depend_on_where_the_sequence_starts():
    """Rotary frame positions: the prediction at frame q from one pass over the whole video equals the
    prediction from a sequence that starts at q - num_hist + 1 (one layer: nothing earlier is seen)."""
    module = make(num_layers=1)
    x = torch.randn(1, 9, P, HIDDEN)
    whole = module.predict(x)
    for q in range(2, 9):
        window = module.predict(x[:, q - 2:q + 1])
        torch.testing.assert_close(window[:, -1], whole[:, q], atol=1e-5, rtol=1e-5)


def test_every_frame_is_a_target_once_with_the_windows_targets():
    module = make(loss_weight=0.5)
    t = 6
    hidden, feats = torch.randn(2, t * P, HIDDEN), torch.randn(2, t, 64, WIDTH)
    out = module.compute_autoregressive_loss(hidden, target_features=feats, return_output=True)
    pooled = spatial_pool(feats, 4, "average")
    pred = module.predict(hidden.view(2, t, P, HIDDEN)[:, :-1])
    mse = (pred - pooled[:, 1:]).pow(2).mean()
    assert out.num_targets == 2 * (t - 1) * P
    torch.testing.assert_close(out.mse, mse.detach())
    torch.testing.assert_close(out.loss, 0.5 * mse)
    torch.testing.assert_close(out.copy_last_mse, (pooled[:, :-1] - pooled[:, 1:]).pow(2).mean())
    term = out.terms["all"]
    torch.testing.assert_close(term.total, (pred - pooled[:, 1:]).pow(2).mean(-1).sum())
    assert int(term.count) == 2 * (t - 1) * P


def test_last_frame_never_reaches_its_prediction():
    module = make()
    hidden = torch.randn(1, 5 * P, HIDDEN, requires_grad=True)
    feats = torch.randn(1, 5, 64, WIDTH)
    loss = module.compute_autoregressive_loss(hidden, target_features=feats)
    loss.backward()
    grad = hidden.grad.view(5, P, HIDDEN).abs().sum((1, 2))
    assert grad[4] == 0 and (grad[:4] > 0).all()
    perturbed = hidden.detach().clone()
    perturbed[0, 4 * P:] += 10
    assert module.compute_autoregressive_loss(perturbed, target_features=feats) == loss


def test_samples_of_unequal_length_add_up_and_nothing_supervised_is_a_connected_zero():
    """The loss contract per sample: a batch's sums and counts are those of its samples alone; a
    truncated video supervises its present prefix, a sample without video nothing."""
    module = make()
    t = 6
    hidden, feats = torch.randn(3, t * P, HIDDEN), torch.randn(3, t, 64, WIDTH)
    lengths = [6, 3, 0]
    layout = prefix_layout(lengths, t)
    out = module.compute_autoregressive_loss(hidden, target_features=feats, video_token_layout=layout,
                                             return_output=True)
    assert out.num_targets == (5 + 2) * P
    alone = [module.compute_autoregressive_loss(hidden[b:b + 1, :n * P], target_features=feats[b:b + 1, :n],
                                                return_output=True) for b, n in enumerate(lengths[:2])]
    torch.testing.assert_close(out.terms["all"].total, sum(a.terms["all"].total for a in alone))
    nothing = module.compute_autoregressive_loss(torch.randn(1, P, HIDDEN), target_features=feats[:1, :1],
                                                 return_output=True)
    assert nothing.num_targets == 0 and nothing.loss == 0
    nothing.loss.backward()
    assert all(p.grad is not None for p in module.predictor.parameters())


@pytest.mark.parametrize("frames", [7, 25])  # 28 tokens: the dense kernel; 100: chunked
def test_training_after_an_evaluation_under_inference_mode_backpropagates(frames):
    """Rotary tables and masks are cached per shape: built first under ``torch.inference_mode`` (an
    evaluation), they still serve a later training step's backward."""
    from lmms_engine.models import frame_attention

    frame_attention.frame_rotary_tables.cache_clear()
    frame_attention._mask.cache_clear()
    module = make()
    hidden, feats = torch.randn(1, frames * P, HIDDEN), torch.randn(1, frames, 64, WIDTH)
    with torch.inference_mode():
        evaluated = module.compute_autoregressive_loss(hidden, target_features=feats)
    trained = module.train().compute_autoregressive_loss(hidden.requires_grad_(True), target_features=feats)
    trained.backward()
    torch.testing.assert_close(trained.detach(), evaluated)
    assert hidden.grad.abs().sum() > 0 and all(p.grad is not None for p in module.predictor.parameters())


def test_sliding_needs_the_frame_causal_mask():
    with pytest.raises(ValueError, match=r"window: sliding .* use_frame_causal_mask: true .* window: all or random"):
        AutoregressiveConfig(use_frame_causal_mask=False)
    assert AutoregressiveConfig(use_frame_causal_mask=False, window="all").window == "all"


def test_one_pass_costs_a_fraction_of_all_windows_and_the_count_includes_attention():
    """FLOPs as torch counts them (CPU attention kernels included): the one pass over 16 frames costs
    well under half of the 13 overlapping windows; the attention FLOPs match the kernel's blocks."""
    hidden, feats = torch.randn(1, 16 * P, HIDDEN), torch.randn(1, 16, 64, WIDTH)
    cost = {}
    for window in ("all", "sliding"):
        module = make(window).train()
        cost[window] = count_flops(lambda: module.compute_autoregressive_loss(hidden, target_features=feats).backward())
    assert cost["sliding"] < 0.45 * cost["all"]
    torch.manual_seed(0)
    q = torch.randn(1, 4, 15 * P, 16, requires_grad=True)
    counted = count_flops(lambda: banded_attention(q, q, q, tokens_per_frame=P, band=3, backend="chunked").sum().backward())
    forward, backward = attention_flops(15, P, 3, 4 * 16, "chunked")
    assert forward == 4 * 4 * 16 * P * P * (3 * 3 + 3 * 5 * 4)  # chunks of 3 query frames: 3x3, then 3x5 frames
    assert counted == forward + backward
    full = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert full == attention_flops(15, P, None, 4 * 16)[0]


@pytest.mark.parametrize("window", ["sliding", "all"])
def test_throughput_accounting_equals_the_counted_flops(window):
    """``ModelFlops``' predictor term against torch's count of the real step: weight matmuls exactly,
    attention's forward exactly (MFU counts its backward as 2x the forward, torch's counter as 2.5x)."""
    from lmms_engine.models.tiny import tiny_llava_config
    from lmms_engine.train.throughput import ModelFlops

    module = make(window).train()
    t = 9
    hidden = torch.randn(1, t * P, HIDDEN, requires_grad=True)
    feats = torch.randn(1, t, 64, WIDTH)
    counted = flops_by_op(lambda: module.compute_autoregressive_loss(hidden, target_features=feats).backward())
    attention_ops = {k: v for k, v in counted.items() if "attention" in k}
    forward_attention = sum(v for k, v in attention_ops.items() if "backward" not in k)
    config = tiny_llava_config()
    config.text_config.hidden_size = HIDDEN
    estimate = ModelFlops.from_config(config, autoregressive=dict(module.config.to_dict()), ar_tokens_per_frame=P)
    matmuls, attention = estimate.predictor_parts(t)
    assert matmuls == sum(counted.values()) - sum(attention_ops.values())
    assert attention == 3 * forward_attention


def test_units_counted_before_the_step_equal_the_forwards_counts():
    """The trainer normalises over units counted from ``video_num_frames`` before the forward: for the
    one pass they must be the forward's own counts, per stream (fast/slow too)."""
    for extra in ({}, {"use_fast_slow_frames": True, "num_fast": 4, "num_slow": 3, "slow_stride": 2}):
        module = make(**extra)
        lengths, t = [7, 2, 5], 7
        layout = prefix_layout(lengths, t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # streams clipped to short videos
            out = module.compute_autoregressive_loss(torch.randn(3, t * P, HIDDEN), target_features=torch.randn(3, t, 64, WIDTH),
                                                     video_token_layout=layout, return_output=True)
            counted = module.supervised_target_counts(lengths, P)
        assert counted == {name: int(term.count) for name, term in out.terms.items()}
