"""Checkpoints of AutoregressiveTrainer: resume after an interruption reproduces the uninterrupted run
bit for bit, a save that dies half-way never leaves a complete-looking checkpoint, and the final model
(autoregressive module included) reloads, also with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from train_support import make_trainer, train_logs

from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration
from lmms_engine.train import last_complete_checkpoint

pytestmark = pytest.mark.slow

RUN = dict(max_steps=6, save_strategy="steps", save_steps=3, warmup_steps=2, gradient_accumulation_steps=2)


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Stops the run dead (like a kill) right after optimisation step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"interrupted after step {self.step}")


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = make_trainer(data_dir, out, **RUN)
    trainer.train()
    trainer.save_model()
    return trainer, out


def _losses(trainer, from_step=1):
    return [(e["step"], e["learning_rate"], e["main_loss"], e["autoregressive_loss"], e["total_loss"])
            for e in train_logs(trainer) if e["step"] >= from_step]


def test_resume_after_interruption_logs_identical_losses(data_dir, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    interrupted = make_trainer(data_dir, tmp_path, callbacks=[InterruptAt(4)], **RUN)
    with pytest.raises(Interrupt):
        interrupted.train()
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-3"

    resumed = make_trainer(data_dir, tmp_path, **RUN)  # a fresh process would build a fresh model too
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    # Same step count, learning-rate schedule, data order and weights: bit-identical losses.
    assert _losses(resumed, from_step=4) == _losses(reference, from_step=4)
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_save_that_dies_half_way_leaves_no_complete_looking_checkpoint(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)

    def die(output_dir):  # weights and optimizer are written by now; the RNG states never will be
        raise OSError("disk full")

    trainer._save_rng_state = die
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert not (tmp_path / "checkpoint-2").exists()
    staged = tmp_path / ".incomplete-checkpoint-2" / "checkpoint-2"
    assert (staged / "model.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    assert get_last_checkpoint(str(tmp_path)) is None and last_complete_checkpoint(tmp_path) is None

    # A later run cleans the leftover up and publishes complete checkpoints only.
    again = make_trainer(data_dir, tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    again.train()
    assert not (tmp_path / ".incomplete-checkpoint-2").exists()
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"} \
            <= {p.name for p in folder.iterdir()}
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-4")


def test_checkpoints_and_final_model_hold_the_autoregressive_module(uninterrupted):
    trainer, out = uninterrupted
    with safe_open(out / "checkpoint-6" / "model.safetensors", "pt") as weights:
        assert [k for k in weights.keys() if k.startswith("autoregressive_module.predictor.")]
    reloaded = LlavaVideoForConditionalGeneration.from_pretrained(out)
    trained = trainer.model.autoregressive_module.state_dict()
    for name, value in reloaded.autoregressive_module.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert json.loads((out / "config.json").read_text())["enable_autoregressive"] is True


def test_final_model_loads_with_plain_transformers_and_the_saved_tokenizer(uninterrupted, data_dir):
    trainer, out = uninterrupted
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<video>") == trainer.model.config.video_token_id
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    ours = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch.pop("labels")
    num_frames = batch.pop("video_num_frames")
    assert bool((num_frames == num_frames[0]).all())  # plain transformers takes equal-length videos
    with torch.no_grad():
        expected = ours(**batch, video_num_frames=num_frames).logits
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
