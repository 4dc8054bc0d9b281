"""The evaluate block's reconstruction on records with several videos and with images, both families.

Windows per offset are hand-counted; what each video's numbers may depend on is checked directly: a
video first in its record gives what it gives alone (the LLM is causal and the prefix is the same), a
video after another one or after an image depends on them, and on the image's pixels (images are
passed to the model, not only their placeholder tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clips import make_clip
from lmms_engine.eval.generation import PromptCollator
from lmms_engine.eval.reconstruction import OffsetSums, batch_reconstruction_errors, batch_video_count

AR = {"num_hist": 2, "num_heads": 4, "num_layers": 1}


def _turns(question: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "Yes."}]


#: R0 a then b; R1 a alone; R2 b then a; R3 image then b; R4 b alone; R5 as R3 with another image.
RECORDS = [
    {"video": ["a.mp4", "b.mp4"], "conversations": _turns("<video> then <video>: same?")},
    {"video": "a.mp4", "conversations": _turns("<video> what moves?")},
    {"video": ["b.mp4", "a.mp4"], "conversations": _turns("<video> then <video>: same?")},
    {"video": "b.mp4", "image": "one.png", "conversations": _turns("<image> and <video>: same colour?")},
    {"video": "b.mp4", "conversations": _turns("<video> what moves?")},
    {"video": "b.mp4", "image": "two.png", "conversations": _turns("<image> and <video>: same colour?")},
]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multimedia")
    make_clip(root / "a.mp4", 30, fps=10, size=(48, 96))
    make_clip(root / "b.mp4", 40, fps=10, size=(96, 48))
    rng = np.random.default_rng(0)
    for name in ("one.png", "two.png"):
        Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(root / name)
    (root / "records.json").write_text(json.dumps(RECORDS))
    return root


def _errors(model, dataset, collator_cls, pad: int, indices: list[int]) -> tuple[dict[int, OffsetSums], dict]:
    """Pooled per-offset sums of the records ``indices`` collated as one evaluation batch, and the batch."""
    batch = PromptCollator(pad, collator_cls)([dataset.generation_sample(i) for i in indices]).inputs
    pooled = {k: OffsetSums() for k in range(1, int(model.autoregressive_module.config.num_hist) + 1)}
    for table in batch_reconstruction_errors(model, batch).values():
        for k, sums in table.items():
            sums.target_sum = sums.target_sq_sum = None
            pooled[k].add(sums)
    return pooled, batch


def _check(model, dataset, collator_cls, pad: int, windows: dict[str, tuple[int, int]]) -> None:
    """Windows per offset (``windows``: hand-counted for videos a and b), the image's pixels, and batching."""
    a, b = windows["a"], windows["b"]
    alone = {name: _errors(model, dataset, collator_cls, pad, [i])[0] for name, i in (("a", 1), ("b", 4))}
    assert [alone["a"][k].windows for k in (1, 2)] == list(a)
    assert [alone["b"][k].windows for k in (1, 2)] == list(b)
    for index in (0, 2):
        two, batch = _errors(model, dataset, collator_cls, pad, [index])
        assert batch_video_count(batch) == 2
        assert [two[k].windows for k in (1, 2)] == [a[0] + b[0], a[1] + b[1]]
        assert [two[k].elements for k in (1, 2)] == [alone["a"][k].elements + alone["b"][k].elements for k in (1, 2)]
    images = [_errors(model, dataset, collator_cls, pad, [i])[0] for i in (3, 5)]
    for k in (1, 2):
        assert images[0][k].windows == images[1][k].windows == b[k - 1]
        assert images[0][k].sq_error != pytest.approx(images[1][k].sq_error, rel=1e-4)  # the pixels count
        assert images[0][k].sq_error != pytest.approx(alone["b"][k].sq_error, rel=1e-4)
    # all records in one left-padded batch: the same sums as record by record
    every, batch = _errors(model, dataset, collator_cls, pad, list(range(len(RECORDS))))
    assert batch_video_count(batch) == 8
    separate = [_errors(model, dataset, collator_cls, pad, [i])[0] for i in range(len(RECORDS))]
    for k in (1, 2):
        assert every[k].windows == sum(s[k].windows for s in separate) == 3 * a[k - 1] + 5 * b[k - 1]
        assert every[k].sq_error == pytest.approx(sum(s[k].sq_error for s in separate), rel=1e-4)


def _equals_training(model, dataset, collator_cls, pad: int) -> None:
    """With ``num_hist: 1`` (sliding) the training loss supervises exactly offset 1's windows: per record
    (several videos, an image before a video) the evaluation's squared errors and copy-last errors are
    the training forward's autoregressive sums on the same record, and its windows are the frames after
    each video's first."""
    for index in range(len(RECORDS)):
        errors = _errors(model, dataset, collator_cls, pad, [index])[0][1]
        train = collator_cls(pad_token_id=pad)([dataset[index]])
        with torch.no_grad():
            term = model(**train).loss_terms.autoregressive["all"]
        dim = int(model.autoregressive_module.config.embedding_dim)  # training sums per-token means over dims
        assert errors.elements == int(term.count) * dim and errors.windows > 0, index
        assert errors.sq_error / dim == pytest.approx(float(term.total), rel=1e-5), index
        assert errors.copy_last_sq_error / dim == pytest.approx(float(term.baseline), rel=1e-5), index


def test_llava_onevision_records_with_several_videos_and_images(media):
    from lmms_engine.data.collator import VideoSFTCollator
    from lmms_engine.data.dataset import DatasetConfig, build_dataset
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.data.tokenizer import build_tiny_tokenizer
    from lmms_engine.models.builder import build_model

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": {"embedding_dim": 64, **AR}},
                        tok).eval()
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    config = DatasetConfig(data_path=str(media / "records.json"), video_folder=str(media), image_folder=str(media),
                           max_frames=5)
    dataset = build_dataset(config, tok, info)
    # 5 frames each: offset 1 has 4 windows per video, offset 2 has 3
    assert dataset.generation_sample(0)["video_num_frames"] == [5, 5]
    _check(model, dataset, VideoSFTCollator, tok.pad_token_id, {"a": (4, 3), "b": (4, 3)})
    torch.manual_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": {
        "embedding_dim": 64, **AR, "num_hist": 1}}, tok).eval()
    _equals_training(model, dataset, VideoSFTCollator, tok.pad_token_id)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_records_with_several_videos_and_images(media, tmp_path_factory, family):
    from transformers import AutoConfig, AutoTokenizer

    from lmms_engine.data.qwen_dataset import QwenVideoCollator, build_qwen_dataset
    from lmms_engine.models.qwen_vl_common import qwen_model_class
    from qwen_support import QWEN_AR, small_processing, tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    model = qwen_model_class(family).from_pretrained(checkpoint)
    model.attach_autoregressive_module(dict(QWEN_AR))
    model.eval()
    dataset = build_qwen_dataset({"data_path": str(media / "records.json"), "video_folder": str(media),
                                  "image_folder": str(media), "max_frames": 8}, tok,
                                  small_processing(AutoConfig.from_pretrained(checkpoint)))
    # Qwen's 2 fps: a (3 s) gives 6 frames = 3 temporal groups, b (4 s) 8 frames = 4 groups
    grids = dataset.generation_sample(0)["video_grid_thw"][:, 0].tolist()
    assert grids == [3, 4]
    _check(model, dataset, QwenVideoCollator, tok.pad_token_id, {"a": (2, 1), "b": (3, 2)})
    del model.autoregressive_module
    torch.manual_seed(0)
    model.attach_autoregressive_module({**QWEN_AR, "num_hist": 1})
    _equals_training(model.eval(), dataset, QwenVideoCollator, tok.pad_token_id)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_evaluate_block_on_several_videos_and_images(media, tmp_path_factory, tmp_path, family):
    """run_evaluate end to end: windows per offset hand-counted over all records (a 3 times, b 5 times),
    8 videos; greedy answers of the mixed batch equal those of each record alone."""
    from lmms_engine.eval.config import run_evaluate

    if family == "llava_onevision":
        from lmms_engine.data.tokenizer import build_tiny_tokenizer
        from lmms_engine.models.builder import build_model

        tok = build_tiny_tokenizer()
        torch.manual_seed(0)
        model = build_model({"enable_autoregressive": True, "autoregressive_config": {"embedding_dim": 64, **AR}}, tok)
        windows, extra = {"a": (4, 3), "b": (4, 3)}, {"max_frames": 5}
    else:
        from transformers import AutoTokenizer

        from lmms_engine.models.qwen_vl_common import qwen_model_class
        from qwen_support import QWEN_AR, tiny_checkpoint

        checkpoint = tiny_checkpoint(tmp_path_factory, family)
        tok = AutoTokenizer.from_pretrained(checkpoint)
        torch.manual_seed(0)
        model = qwen_model_class(family).from_pretrained(checkpoint)
        model.attach_autoregressive_module(dict(QWEN_AR))
        f = model.config.vision_config.patch_size * 2
        windows = {"a": (2, 1), "b": (3, 2)}
        extra = {"max_frames": 8, "video_min_pixels": 4 * f * f, "video_max_pixels": 8 * f * f}
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    def evaluate(batch_size: int, out: str, metrics: list[str]) -> dict:
        return run_evaluate({"checkpoint": str(tmp_path / "model"), "data_path": str(media / "records.json"),
                             "dataset_config": {"video_folder": str(media), "image_folder": str(media), **extra},
                             "output_dir": str(tmp_path / out), "batch_size": batch_size, "max_new_tokens": 3,
                             "device": "cpu", "progress": False, "metrics": metrics})

    results = evaluate(len(RECORDS), "all", ["accuracy", "reconstruction"])
    recon = results["reconstruction"]
    a, b = windows["a"], windows["b"]
    assert recon["num_videos"] == 8
    assert [r["windows"] for r in recon["by_offset"]] == [3 * a[k] + 5 * b[k] for k in (0, 1)]
    assert results["accuracy"]["overall"]["num_samples"] == len(RECORDS)
    one = evaluate(1, "one", ["accuracy"])
    batched = [json.loads(line) for line in (tmp_path / "all" / "predictions.jsonl").read_text().splitlines()]
    alone = [json.loads(line) for line in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert one["num_samples"] == len(RECORDS)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
