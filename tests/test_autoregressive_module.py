"""The autoregressive reconstruction module: windows, causality, target encoders, layouts, the guide's snippets."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from lmms_engine.models.autoregressive_reconstruction import (
    AutoregressiveReconstructionModule,
    create_autoregressive_reconstruction_module,
)
from lmms_engine.models.layout import (
    ROLE_PATCH,
    FrameTokenIndex,
    VideoLayoutConfig,
    VideoTokenLayout,
    build_video_template,
)
from lmms_engine.video.masks import frame_causal_mask
from lmms_engine.video.pooling import pooled_side, spatial_pool

PATCH_SIDE = 8  # 64 px / patch 8
WIDTH = 64


def tiny_tower(frozen: bool = False, seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=64, patch_size=8))
    return tower.requires_grad_(not frozen)


def make_module(tower=None, hidden: int = 32, seed: int = 0, **overrides) -> AutoregressiveReconstructionModule:
    config = {"embedding_dim": WIDTH, "num_heads": 4, "num_layers": 2, "num_hist": 3, "window": "all", **overrides}
    torch.manual_seed(seed)
    module = create_autoregressive_reconstruction_module(tower if tower is not None else tiny_tower(frozen=True),
                                                         hidden, config)
    return module.eval()


def dinowm_mask(num_patches: int, num_frames: int) -> torch.Tensor:
    """DINO-WM's predictor mask: row block i = i+1 blocks of ones, then zeros (1 = attend)."""
    ones, zeros = torch.ones(num_patches, num_patches), torch.zeros(num_patches, num_patches)
    rows = [torch.cat([ones] * (i + 1) + [zeros] * (num_frames - i - 1), dim=1) for i in range(num_frames)]
    return torch.cat(rows, dim=0)


def build_layout(frames_per_sample, layout_cfg: VideoLayoutConfig, seq_len: int, prefix: int = 5):
    """A batch's VideoTokenLayout: ``prefix`` text tokens, then the video run, cut at ``seq_len``."""
    batch, t_max = len(frames_per_sample), max(max(frames_per_sample), 1)
    mode, stride = layout_cfg.mm_spatial_pool_mode, layout_cfg.mm_spatial_pool_stride
    slow_side = pooled_side(PATCH_SIDE, stride, mode)
    fast_side = pooled_side(PATCH_SIDE, 2 * stride, mode)
    slow = torch.full((batch, t_max, slow_side ** 2), -1, dtype=torch.long)
    fast = torch.full((batch, t_max, fast_side ** 2), -1, dtype=torch.long)
    separators = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b, n in enumerate(frames_per_sample):
        if n == 0:
            continue
        template = build_video_template(n, PATCH_SIDE, layout_cfg)
        for j, (role, frame, patch) in enumerate(zip(template.role.tolist(), template.frame.tolist(),
                                                     template.patch.tolist())):
            pos = prefix + j
            if pos >= seq_len:
                break
            if role == ROLE_PATCH:
                (slow if layout_cfg.is_slow_frame(frame) else fast)[b, frame, patch] = pos
            else:
                separators[b, pos] = True
    fast_index = None
    if layout_cfg.add_faster_video:
        fast_index = FrameTokenIndex(fast, (fast >= 0).all(-1), fast_side, 2 * stride)
    return VideoTokenLayout(
        slow=FrameTokenIndex(slow, (slow >= 0).all(-1), slow_side, stride), fast=fast_index,
        separator_mask=separators, pool_mode=mode, num_frames=torch.tensor(frames_per_sample),
    )


def dense_hidden(hidden: torch.Tensor, index: FrameTokenIndex, b: int, frames: int) -> torch.Tensor:
    """[1, frames * P', H]: the video tokens of sample b, frame-major."""
    return hidden[b, index.positions[b, :frames].reshape(-1)][None]


# -- config against the tower ----------------------------------------------------------------------


def test_embedding_dim_must_match_tower_and_names_both_numbers():
    with pytest.raises(ValueError, match=r"autoregressive_config\.embedding_dim=1152 differs from the vision tower's feature size 64 "
                       r"at vision_feature_layer=-1.*set embedding_dim: 64"):
        create_autoregressive_reconstruction_module(tiny_tower(), 896, {})
    with pytest.raises(TypeError, match="vision_tower must be a vision encoder"):
        create_autoregressive_reconstruction_module(nn.Linear(2, 2), 896, {"embedding_dim": 64})
    with pytest.raises(ValueError, match="did you mean 'embedding_dim'"):
        create_autoregressive_reconstruction_module(tiny_tower(), 896, {"embeding_dim": 64})


# -- windows, masks and causality ------------------------------------------------------------------


def test_predictor_mask_is_dinowm_block_lower_triangular(monkeypatch):
    for frames, patches in [(1, 1), (2, 3), (3, 4), (4, 2)]:
        assert torch.equal(frame_causal_mask(frames, patches), dinowm_mask(patches, frames).bool())
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4)  # 2x2 = 4 tokens/frame
    module.predict(torch.randn(1, 3, 4, 32))
    assert len(seen) == 2 and all(torch.equal(m, dinowm_mask(4, 3).bool()) for m in seen)
    seen.clear()
    make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4, use_frame_causal_mask=False).predict(
        torch.randn(1, 3, 4, 32))
    assert seen == [None, None]


def test_causality_future_frames_never_change_earlier_predictions():
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=2)
    x = torch.randn(2, 3, 16, 32)
    base = module.predict(x)
    for t in range(2):
        changed = x.clone()
        changed[:, t + 1:] += torch.randn_like(changed[:, t + 1:]) * 5
        out = module.predict(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-2
    # Without the mask the earliest position does see later frames (the test above could fail).
    full = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=2, use_frame_causal_mask=False)
    changed = x.clone()
    changed[:, 2] += 5
    assert (full.predict(changed)[:, 0] - full.predict(x)[:, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_windows_teacher_forcing_and_supervised_positions(causal):
    """Loss equals a hand-written sum over all windows: inputs i..i+2, targets i+1..i+3."""
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4, use_frame_causal_mask=causal,
                         loss_weight=0.5)
    t, p = 6, 4
    hidden = torch.randn(2, t * p, 32)
    targets = torch.randn(2, t, 64, WIDTH)
    out = module.compute_autoregressive_loss(hidden, target_features=targets, return_output=True)
    frames, pooled = hidden.view(2, t, p, 32), spatial_pool(targets, 4, "average")
    errors, base = [], []
    for i in range(t - 3):
        pred = module.predict(frames[:, i:i + 3])
        tgt, prev = pooled[:, i + 1:i + 4], pooled[:, i:i + 3]
        if not causal:
            pred, tgt, prev = pred[:, -1:], tgt[:, -1:], prev[:, -1:]
        errors.append((pred - tgt).pow(2).flatten())
        base.append((prev - tgt).pow(2).flatten())
    mse = torch.cat(errors).mean()
    assert out.num_targets == 2 * (t - 3) * (3 if causal else 1) * p
    torch.testing.assert_close(out.mse, mse.detach())
    torch.testing.assert_close(out.loss, 0.5 * mse)
    torch.testing.assert_close(out.copy_last_mse, torch.cat(base).mean())


@pytest.mark.parametrize("causal", [True, False])
def test_target_frame_never_reaches_its_prediction(causal):
    """T = num_hist + 1: frame 3 is only ever a target, so its hidden states get no gradient at all."""
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4, use_frame_causal_mask=causal)
    hidden = torch.randn(1, 4 * 4, 32, requires_grad=True)
    targets = torch.randn(1, 4, 64, WIDTH)
    loss = module.compute_autoregressive_loss(hidden, target_features=targets)
    loss.backward()
    grad = hidden.grad.view(4, 4, 32).abs().sum((1, 2))
    assert grad[3] == 0 and (grad[:3] > 0).all()
    perturbed = hidden.detach().clone()
    perturbed[0, 12:] += 10
    assert module.compute_autoregressive_loss(perturbed, target_features=targets) == loss


def test_random_window_and_short_and_too_short_videos():
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4, window="random")
    out = module.compute_autoregressive_loss(torch.randn(2, 6 * 4, 32), target_features=torch.randn(2, 6, 64, 64),
                                             return_output=True)
    assert out.num_targets == 2 * 3 * 4  # one window of 3 supervised frames per sample
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4)
    with pytest.warns(UserWarning, match="2 history"):
        out = module.compute_autoregressive_loss(torch.randn(1, 3 * 4, 32), target_features=torch.randn(1, 3, 64, 64),
                                                 return_output=True)
    assert out.num_targets == 2 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per module
        module.compute_autoregressive_loss(torch.randn(1, 3 * 4, 32), target_features=torch.randn(1, 3, 64, 64))
    hidden = torch.randn(1, 4, 32)
    out = module.compute_autoregressive_loss(hidden, target_features=torch.randn(1, 1, 64, 64), return_output=True)
    assert out.num_targets == 0 and out.loss == 0
    out.loss.backward()
    assert all(p.grad is not None for p in module.predictor.parameters())


def test_fast_slow_streams_are_the_mean_of_two_sequences():
    cfg = dict(enable_multiscale_pooling=True, mm_spatial_pool_stride=4, num_hist=2, loss_weight=0.2)
    module = make_module(use_fast_slow_frames=True, num_fast=4, fast_stride=1, num_slow=3, slow_stride=4, **cfg)
    plain = make_module(**cfg)
    plain.load_state_dict(module.state_dict())
    hidden, targets = torch.randn(1, 9, 4, 32), torch.randn(1, 9, 64, 64)
    out = module.compute_autoregressive_loss(hidden.flatten(1, 2), target_features=targets, return_output=True)
    fast = plain.compute_autoregressive_loss(hidden[:, :4].flatten(1, 2), target_features=targets[:, :4],
                                             return_output=True)
    slow = plain.compute_autoregressive_loss(hidden[:, [0, 4, 8]].flatten(1, 2), target_features=targets[:, [0, 4, 8]],
                                             return_output=True)
    torch.testing.assert_close(out.fast_loss, fast.loss.detach())
    torch.testing.assert_close(out.slow_loss, slow.loss.detach())
    torch.testing.assert_close(out.mse, (fast.mse + slow.mse) / 2)
    torch.testing.assert_close(out.copy_last_mse, (fast.copy_last_mse + slow.copy_last_mse) / 2)
    assert out.num_targets == fast.num_targets + slow.num_targets == (2 * 2 + 1 * 2) * 4
    with pytest.warns(UserWarning, match="slow stream wants 3 frames 4 apart .* has 5; using 2"), \
            pytest.warns(UserWarning, match="2 usable frames"):
        out = module.compute_autoregressive_loss(hidden[:, :5].flatten(1, 2), target_features=targets[:, :5],
                                                 return_output=True)
    assert out.num_targets == (2 * 2 + 1) * 4  # fast: 2 windows x 2 frames; slow: one short window of 2 frames


# -- target encoders -------------------------------------------------------------------------------


def count_calls(tower: nn.Module) -> list:
    calls = []
    tower.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_shared_mode_adds_nothing_and_reuses_the_models_features():
    tower = tiny_tower(frozen=True)
    calls = count_calls(tower)
    module = make_module(tower)
    assert module.target_encoder_mode == "shared" and module.target_encoder is None
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.predictor.parameters()}
    assert all(key.startswith("predictor.") for key in module.state_dict())
    frames = torch.randn(2, 4, 3, 64, 64)
    features = tower(pixel_values=frames.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
    calls.clear()
    hidden = torch.randn(2, 4 * 64, 32)
    shared = module.compute_autoregressive_loss(hidden, frames, target_features=features.view(2, 4, 64, 64))
    assert calls == []  # no vision forward
    own = module.compute_autoregressive_loss(hidden, frames)  # frames only: the tower runs once, no grad
    assert calls == [1]
    torch.testing.assert_close(own, shared)
    assert all(p.grad is None for p in tower.parameters())


def test_gradients_reach_hidden_states_and_predictor_never_the_target_encoder():
    tower = tiny_tower(frozen=False)
    module = make_module(tower)
    assert module.target_encoder_mode == "copy"
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("predictor.") for name in trainable)
    hidden = torch.randn(1, 4 * 64, 32, requires_grad=True)
    module.compute_autoregressive_loss(hidden, torch.randn(1, 4, 3, 64, 64)).backward()
    assert hidden.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.predictor.parameters())
    assert all(p.grad is None for p in module.target_encoder.parameters())
    assert all(p.grad is None for p in tower.parameters())
    # Features handed over with a graph (a tower that trains, forced shared) are detached.
    shared = make_module(tower, target_encoder="shared")
    feats = tower(pixel_values=torch.randn(4, 3, 64, 64), output_hidden_states=True).hidden_states[-1]
    with pytest.warns(UserWarning, match="vision tower trains"):
        loss = shared.compute_autoregressive_loss(torch.randn(1, 4 * 64, 32), target_features=feats.view(1, 4, 64, 64))
    loss.backward()
    assert all(p.grad is None for p in tower.parameters())


def test_copy_mode_targets_stay_fixed_while_the_tower_trains():
    tower = tiny_tower(frozen=False)
    module = make_module(tower).train()
    assert module.target_encoder.training is False and module.predictor.training is True
    assert any(k.startswith("target_encoder.") for k in module.state_dict())  # the snapshot is saved
    frames, hidden = torch.randn(1, 4, 3, 64, 64), torch.randn(1, 4 * 64, 32)
    before_targets = module.encode_targets(frames)
    before_loss = module.compute_autoregressive_loss(hidden, frames)
    before_tower = tower(pixel_values=frames[0]).last_hidden_state.detach()
    optimiser = torch.optim.SGD(tower.parameters(), lr=1.0)
    tower(pixel_values=frames[0]).last_hidden_state.pow(2).mean().backward()
    optimiser.step()
    assert (tower(pixel_values=frames[0]).last_hidden_state - before_tower).abs().max() > 1e-3
    assert torch.equal(module.encode_targets(frames), before_targets)
    assert torch.equal(module.compute_autoregressive_loss(hidden, frames), before_loss)
    with pytest.raises(ValueError, match="needs video_frames"):
        module.compute_autoregressive_loss(hidden, target_features=before_targets)
    module.sync_target_encoder()
    assert not torch.equal(module.encode_targets(frames), before_targets)


# -- layouts ---------------------------------------------------------------------------------------


def test_layout_gathering_with_truncation_and_no_video_equals_dense():
    layout_cfg = VideoLayoutConfig(mm_spatial_pool_stride=2, mm_spatial_pool_mode="average",
                                   mm_newline_position="grid")  # 4x4 grid, 20 tokens per frame
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=2)
    seq_len = 5 + 6 * 20
    # sample 0: 6 frames; sample 1: 5 frames cut inside frame 3 (3 usable); sample 2: no video
    layout = build_layout([6, 5, 0], layout_cfg, seq_len)
    layout.slow.positions[1][layout.slow.positions[1] >= 5 + 3 * 20 + 7] = -1
    layout.slow.frame_mask = (layout.slow.positions >= 0).all(-1)
    assert layout.slow.frame_mask.sum(1).tolist() == [6, 3, 0]
    hidden = torch.randn(3, seq_len, 32)
    patch = torch.zeros(3, seq_len, dtype=torch.bool)
    for b in range(3):
        patch[b, layout.slow.positions[b][layout.slow.positions[b] >= 0]] = True
    hidden[~patch] = float("nan")  # text, newlines, cut frames, the no-video sample: never read
    hidden.requires_grad_(True)
    targets = torch.randn(3, 6, 64, WIDTH)
    targets[2] = float("nan")
    with pytest.warns(UserWarning, match="3 usable frames"):
        out = module.compute_autoregressive_loss(hidden, target_features=targets, video_token_layout=layout,
                                                 return_output=True)
    dense = [module.compute_autoregressive_loss(dense_hidden(hidden.detach(), layout.slow, b, n),
                                                target_features=targets[b:b + 1, :n], return_output=True)
             for b, n in [(0, 6), (1, 3)]]
    assert out.num_targets == sum(d.num_targets for d in dense) == (3 * 3 + 2) * 16
    expected = sum(d.mse * d.num_targets for d in dense) / out.num_targets
    torch.testing.assert_close(out.mse, expected)
    torch.testing.assert_close(out.loss, 0.1 * expected)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad[~patch].abs().sum() == 0


def test_faster_video_layout_equals_dense_on_the_fast_grid():
    layout_cfg = VideoLayoutConfig(mm_spatial_pool_stride=2, mm_spatial_pool_mode="average",
                                   mm_newline_position="frame", add_faster_video=True, faster_token_stride=2)
    frames = 5  # slow 0, 2, 4 at 4x4; fast 1, 3 at 2x2
    seq_len = 5 + layout_cfg.video_token_count(frames, PATCH_SIDE)
    layout = build_layout([frames], layout_cfg, seq_len)
    assert layout.slow.frame_mask[0].tolist() == [True, False, True, False, True]
    assert layout.fast.frame_mask[0].tolist() == [False, True, False, True, False]
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4)  # dense: the fast grid
    hidden, targets = torch.randn(1, seq_len, 32), torch.randn(1, frames, 64, WIDTH)
    out = module.compute_autoregressive_loss(hidden, target_features=targets, video_token_layout=layout,
                                             return_output=True)
    per_frame = []
    for t in range(frames):
        if layout_cfg.is_slow_frame(t):
            per_frame.append(spatial_pool(hidden[0, layout.slow.positions[0, t]], 2, "average"))
        else:
            per_frame.append(hidden[0, layout.fast.positions[0, t]])
    dense = module.compute_autoregressive_loss(torch.cat(per_frame)[None], target_features=targets,
                                               return_output=True)
    assert out.num_targets == dense.num_targets == 2 * 3 * 4
    torch.testing.assert_close(out.loss, dense.loss)


def test_batch_without_any_video_is_a_connected_zero():
    layout = build_layout([0, 0], VideoLayoutConfig(), seq_len=12)
    module = make_module()
    hidden = torch.full((2, 12, 32), float("nan"), requires_grad=True)
    out = module.compute_autoregressive_loss(hidden, target_features=torch.zeros(2, 1, 64, WIDTH),
                                             video_token_layout=layout, return_output=True)
    assert out.loss == 0 and out.mse == 0 and out.num_targets == 0 and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in module.predictor.parameters())
    no_frames = FrameTokenIndex(torch.zeros(2, 0, 16, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool), 4, 2)
    empty = VideoTokenLayout(no_frames, None, torch.zeros(2, 12, dtype=torch.bool), "bilinear",
                             torch.zeros(2, dtype=torch.long))
    out = module.compute_autoregressive_loss(hidden, target_features=torch.zeros(2, 0, 64, WIDTH),
                                             video_token_layout=empty, return_output=True)
    assert out.loss == 0 and out.num_targets == 0


def test_bad_inputs_name_what_is_expected():
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=2)
    with pytest.raises(ValueError, match=r"T x P' = 4 x 16 = 64 tokens \(P' = 4x4.*got 70"):
        module.compute_autoregressive_loss(torch.randn(1, 70, 32), target_features=torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, L, 32\]"):
        module.compute_autoregressive_loss(torch.randn(1, 64, 31), target_features=torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="needs video_frames or target_features"):
        module.compute_autoregressive_loss(torch.randn(1, 64, 32))
    with pytest.raises(ValueError, match="expected the tower's 8x8 = 64 patches of size 64"):
        module.compute_autoregressive_loss(torch.randn(1, 64, 32), target_features=torch.randn(1, 4, 63, 64))


# -- learning ----------------------------------------------------------------------------------------


def test_tiny_predictor_overfits_one_sequence_below_copy_last():
    module = make_module(num_layers=1, enable_multiscale_pooling=True, mm_spatial_pool_stride=4, loss_weight=1.0)
    module.train()
    torch.manual_seed(1)
    # x4: unit-variance targets after average-pooling 4x4 patches
    hidden, targets = torch.randn(1, 5 * 4, 32), 4 * torch.randn(1, 5, 64, WIDTH)
    optimiser = torch.optim.Adam(module.predictor.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = module.compute_autoregressive_loss(hidden, target_features=targets, return_output=True)
        first = out if first is None else first
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    assert out.mse < 0.05 * out.copy_last_mse and out.mse < 0.05 * first.mse
    assert out.copy_last_mse == first.copy_last_mse


# -- the guide's snippets ------------------------------------------------------------------------------


class _Model(nn.Module):
    def __init__(self, vision_tower: nn.Module) -> None:
        super().__init__()
        self.vision_tower = vision_tower


def test_guide_snippets_run_as_written(capsys):
    model = _Model(tiny_tower())
    video_frames = torch.randn(1, 4, 3, 64, 64)

    # basic configuration (embedding_dim = the tiny tower's width)
    autoregressive_module = create_autoregressive_reconstruction_module(
        vision_tower=model.vision_tower,
        hidden_size=4096,
        config={
            "embedding_dim": 64,
            "loss_weight": 0.1,
            "use_frame_causal_mask": True,
        }
    )
    llm_hidden_states = torch.randn(1, 4 * 64, 4096)
    loss = autoregressive_module.compute_autoregressive_loss(
        hidden_states=llm_hidden_states,  # [B, seq_len, hidden_size]
        video_frames=video_frames          # [B, T, 3, H, W]
    )
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0

    # full LLaVA-NeXT feature set
    autoregressive_module = create_autoregressive_reconstruction_module(
        vision_tower=model.vision_tower,
        hidden_size=4096,
        config={
            # basics
            "embedding_dim": 64,
            "num_hist": 3,
            "loss_weight": 0.1,
            "num_heads": 8,
            "num_layers": 3,
            # frame-level causal mask
            "use_frame_causal_mask": True,
            # fast / slow frames
            "use_fast_slow_frames": False,
            # LLaVA-NeXT multi-scale
            "enable_multiscale_pooling": True,
            "mm_spatial_pool_stride": 2,
            "mm_spatial_pool_mode": "average",
            "add_faster_video": True,
        }
    )
    llm_hidden_states = torch.randn(1, 4 * 16, 4096)  # 4x4 tokens per frame after average stride 2
    loss = autoregressive_module.compute_autoregressive_loss(
        hidden_states=llm_hidden_states,  # [B, seq_len, hidden_size]
        video_frames=video_frames          # [B, T, 3, H, W]
    )
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    assert autoregressive_module.config.layout_overrides()["add_faster_video"] is True

    model.autoregressive_module = autoregressive_module
    if hasattr(model, 'autoregressive_module'):
        print("autoregressive module loaded")
        print(f"loss weight: {model.autoregressive_module.loss_weight}")
        print(f"multi-scale pooling: {model.autoregressive_module.enable_multiscale_pooling}")
    else:
        print("no autoregressive module found")
    assert capsys.readouterr().out.splitlines() == [
        "autoregressive module loaded", "loss weight: 0.1", "multi-scale pooling: True"]


def test_llava_onevision_tower_is_accepted():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    vision = tiny_tower().config
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_select_strategy="full"))
    model.model.vision_tower.requires_grad_(False)
    module = create_autoregressive_reconstruction_module(model.model.vision_tower, 64, {"embedding_dim": 64})
    assert module.target_encoder_mode == "shared" and sum(p.numel() for p in module.parameters()) == \
        sum(p.numel() for p in module.predictor.parameters())
    frames = torch.randn(1, 4, 3, 64, 64)
    own = module.compute_autoregressive_loss(torch.randn(1, 4 * 64, 64), frames, return_output=True)
    assert own.num_targets == 3 * 64


def test_short_clip_warnings_say_how_often_they_happened():
    """A stream clipped to a short video, and a video shorter than a window, are counted per forward;
    the warning comes at the 1st, 10th, 100th ... time and says in how many of how many batches."""
    module = make_module(enable_multiscale_pooling=True, mm_spatial_pool_stride=4, use_fast_slow_frames=True,
                         num_fast=4, num_slow=3, slow_stride=4)
    long_enough = (torch.randn(1, 9 * 4, 32), torch.randn(1, 9, 64, WIDTH))
    short = (torch.randn(1, 5 * 4, 32), torch.randn(1, 5, 64, WIDTH))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            hidden, targets = short if i % 2 else long_enough
            module.compute_autoregressive_loss(hidden, target_features=targets)
        for _ in range(8):
            module.compute_autoregressive_loss(*short[:1], target_features=short[1])
    messages = [str(w.message) for w in caught]
    assert module.forward_count == 20 and module.event_counts == {"clip-slow": 14, "short": 20}  # slow: 3 frames < num_hist + 1
    slow = [m for m in messages if "slow stream wants 3 frames 4 apart" in m]
    assert len(slow) == 2 and slow[0].endswith("(in 1 of 2 batches so far)")
    assert slow[1].endswith("(in 10 of 16 batches so far)")
    assert len([m for m in messages if "usable frames" in m]) == 2
