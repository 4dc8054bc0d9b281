"""Generate ``docs/config.md``, the reference of every pipeline config key, from the code itself.

Keys, types and defaults come from the dataclasses (``dataclasses.fields`` and their type hints);
meanings from each dataclass's docstring (``name: text`` entries, as in ``Attributes:`` sections),
from transformers' ``metadata["help"]`` for TrainingArguments, and from :data:`EXTRA_MEANINGS` for the
keys a docstring only describes in prose. A test regenerates the file and compares, so the reference
cannot drift from the code::

    python -m lmms_engine.launch.config_doc --write docs/config.md
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, get_args, get_origin, get_type_hints

#: Meanings of keys that their dataclass documents in prose only (the guide's own table wording).
EXTRA_MEANINGS: dict[str, dict[str, str]] = {
    "AutoregressiveConfig": {
        "use_fast_slow_frames": "enable the fast/slow frame mechanism: the predictor runs on a fast and a "
                                "slow temporal stream of the frames the LLM saw; the loss is their mean",
        "fast_stride": "sampling stride of fast frames",
        "slow_stride": "sampling stride of slow frames",
        "num_fast": "number of fast frames (clipped, with a warning, to the frames available)",
        "num_slow": "number of slow frames (clipped, with a warning, to the frames available)",
        "enable_multiscale_pooling": "enable multi-scale pooling: the three keys below pool the targets and "
                                     "set the model's video-token layout",
        "mm_spatial_pool_stride": "spatial pooling stride (with enable_multiscale_pooling)",
        "mm_spatial_pool_mode": "pooling mode: average / max / bilinear (with enable_multiscale_pooling)",
        "add_faster_video": "add LLaVA-Video's faster video stream (with enable_multiscale_pooling)",
    },
    "TinyConfig": {
        "vision_config": "keys of SiglipVisionConfig overriding the tiny tower (64 px, patch 8, width 64, "
                         "2 layers)",
        "text_config": "keys of Qwen2Config overriding the tiny LLM (width 64, 2 layers)",
        "vision_feature_layer": "tower layer the LLM (and a shared autoregressive target) reads: -1 = the last "
                                "(LLaVA-OneVision's choice), 0 = the patch embeddings, a linear function of "
                                "the pixels; a list of layers is read concatenated",
        "vocab_size": "vocabulary size; None = the tokenizer's length",
        "video_token_id": "id of <video>; None = the tokenizer's",
        "image_token_id": "id of <image>; None = the tokenizer's",
        "pad_token_id": "padding id; None = the tokenizer's",
        "eos_token_id": "end-of-sequence id; None = the tokenizer's",
        "bos_token_id": "beginning-of-sequence id; None = the tokenizer's",
    },
}

_ENTRY = re.compile(r"^(\s+)([A-Za-z_][\w]*(?:,\s*[A-Za-z_][\w]*)*):\s*(.*)$")


def docstring_meanings(cls: type) -> dict[str, str]:
    """``{field: text}`` from ``name: text`` / ``a, b: text`` lines of ``cls.__doc__`` (continuation
    lines, indented deeper, are joined)."""
    doc = textwrap.dedent(cls.__doc__ or "")
    names = {f.name for f in dataclasses.fields(cls)}
    found: dict[str, str] = {}
    current: list[str] | None = None
    indent = 0
    lines: list[str] = []
    for line in doc.splitlines():
        # "a, b," on one line and "c: text" on the next: one entry naming a, b and c
        if lines and re.fullmatch(r"\s+([A-Za-z_]\w*,\s*)+", lines[-1]) and \
                all(n.strip() in names for n in lines[-1].split(",") if n.strip()):
            lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        else:
            lines.append(line)
    for line in lines:
        match = _ENTRY.match(line)
        if match and all(n.strip() in names for n in match.group(2).split(",")):
            current = [n.strip() for n in match.group(2).split(",")]
            indent = len(match.group(1))
            for name in current:
                found[name] = match.group(3).strip()
            continue
        stripped = line.strip()
        if current and stripped and len(line) - len(line.lstrip()) > indent:
            for name in current:
                found[name] = f"{found[name]} {stripped}".strip()
        else:
            current = None
    # "a: text. b: more" on one line: two entries
    for name in list(found):
        pieces = re.split(r"(?<=\.)\s+([A-Za-z_]\w*):\s+", found[name])
        if len(pieces) > 1 and all(p in names for p in pieces[1::2]):
            found[name] = pieces[0]
            for other, text in zip(pieces[1::2], pieces[2::2]):
                found.setdefault(other, text)
    return {name: re.sub(r"``([^`]*)``", r"`\1`", text) for name, text in found.items()}


def type_name(tp: Any) -> str:
    """A short, readable rendering of a type hint (``int | None``, ``'a' | 'b'``, ``list[str]``)."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(dict.fromkeys(type_name(a) for a in get_args(tp)))
    if origin is not None:
        args = ", ".join(type_name(a) for a in get_args(tp))
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]" if args else name
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, str) and tp is not str:  # transformers' str enums
        return "str"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "**required**"
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):  # enum members
        value = value.value
    return f"`{value!r}`" if not isinstance(value, bool) and value is not None else f"`{str(value).lower() if isinstance(value, bool) else 'null'}`"


def _cell(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)  # Sphinx roles
    text = " ".join(text.split()).replace("%%", "%")  # transformers' help strings are argparse-escaped
    # Markdown shows code spans verbatim (an entity there prints as "&lt;"): escape <, > outside them only.
    parts = text.split("`")
    text = "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))
    return text.replace("|", "\\|")


def _first_sentences(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 40 else text[:limit].rstrip() + " ..."


def field_table(cls: type, meanings: dict[str, str], skip: Iterable[str] = ()) -> str:
    hints = get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        rows.append(f"| `{f.name}` | {type_name(hints[f.name])} | {default_text(f)} | {_cell(meanings[f.name])} |")
    return "\n".join(rows)


def meanings_for(cls: type) -> dict[str, str]:
    """Docstring meanings plus :data:`EXTRA_MEANINGS`; raises KeyError naming undocumented fields."""
    meanings = {**EXTRA_MEANINGS.get(cls.__name__, {}), **docstring_meanings(cls)}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in meanings]
    if missing:
        raise KeyError(f"{cls.__module__}.{cls.__name__}: no meaning documented for {', '.join(missing)}: "
                       f"describe them in its docstring ('name: meaning') or in EXTRA_MEANINGS")
    return meanings


HEADER = """\
# Config reference

<!-- Generated by `python -m lmms_engine.launch.config_doc --write docs/config.md` from the code; a test
keeps it current. Edit the dataclass docstrings, not this file. -->

`python -m lmms_engine.launch.cli --config FILE.yaml [--set KEY=VALUE ...] [--dry-run]` (also under
`torchrun --nproc_per_node=N -m lmms_engine.launch.cli ...`, and as the `lmms-video` command).

## The file

A YAML (or JSON) **list of blocks**, run in order. Each block has exactly two keys: `type`
(`demo_data`, `trainer` or `evaluate`) and `config` (a mapping).

```yaml
- type: demo_data                 # optional: generate the demo dataset if it is missing
  config: {output_dir: output/quickstart/data}
- type: trainer
  config:
    trainer_type: autoregressive_trainer
    model_config: {...}           # the model (section below)
    dataset_config: {...}         # the data (section below)
    output_dir: ./output/run      # ...and any transformers.TrainingArguments field, flattened here
    per_device_train_batch_size: 2
- type: evaluate                  # optional: evaluate the trained model on held-out records
  config: {checkpoint: ./output/run, data_path: output/quickstart/data/eval.json}
```

Everything is checked before anything is built (no model or data is loaded by a bad config): unknown
keys at any level are errors naming the nearest valid key; values are type-checked (`2e-5` reads as a
number); data files, video folders, local model folders and checkpoints must exist (files that an
earlier `demo_data` block writes count as present); the video-layout keys may not disagree between
`model_config` and `model_config.autoregressive_config`; `autoregressive_config.embedding_dim` must
equal the vision tower's width (64 for the tiny model, 1152 for SigLIP-so400m); `fsdp` needs an
accelerator. The same key twice in one mapping is an error (never "the last one wins"), and so is a
config file that is not UTF-8. `TrainingArguments` are built during the check, as the run builds them
(so `deepspeed` without DeepSpeed installed fails here), and what transformers accepts but no run
survives is refused: a negative or NaN `learning_rate`, a batch size or `gradient_accumulation_steps`
below 1, `save_steps`/`logging_steps`/`eval_steps` <= 0, an unknown or uninstalled `report_to`
integration (with the nearest name), `eval_strategy` other than `no` without
`dataset_config.eval_data_path`, an `output_dir` that cannot be created or written, and two trainer
blocks with one `output_dir` (unless the later one resumes the earlier run). Each data file is read up
to its first usable record (not UTF-8, not a JSON list or JSONL, empty, `[]`, a single object, or no
usable record: a `data error:`). The process exits with status 2 and the message on stderr (`config
error:` or `data error:`). A run that will log no training step (`logging_steps` larger than the run)
says so in a warning when training starts. Relative paths are relative to the current directory.

`--set KEY=VALUE` (repeatable) changes a key of every trainer block before the checks: a dotted path
inside `config` (`--set max_steps=10`, `--set model_config.autoregressive_config.loss_weight=0.05`),
or `demo_data.KEY` for the demo_data block. VALUE is read as YAML (`true`, `null`, `[a, b]`).
`--dry-run` checks and prints the resolved blocks without training.

Files of the guide and their runnable versions (all run here on the tiny model and the demo data;
`examples/real/` holds the same setups on LLaVA-OneVision-0.5B for GPUs):

| file | what |
|---|---|
| `examples/quickstart.yaml` | `make quickstart`: tiny model, demo data, autoregressive loss, ~1 min on 2 CPU cores |
| `examples/config_basic_autoregressive.yaml` | the guide's basic config |
| `examples/config_llava_next_autoregressive.yaml` | the guide's full LLaVA-NeXT feature config (average pooling, faster video) |
| `configs/llava_ov_fast_slow_autoregressive.yaml` | fast/slow frame streams for the autoregressive loss |
| `examples/real/*.yaml` | the three above on `llava-hf/llava-onevision-qwen2-0.5b-ov-hf` (bf16, gradient checkpointing) |
| `examples/train_with_autoregressive.py` | the guide's Python route (section 3) |

What a trainer block writes into `output_dir`: `checkpoint-N/` folders (complete or absent: they are
written under `.incomplete-checkpoint-N/` and renamed when every file is there), the final model
(`config.json`, safetensors weights, tokenizer), `trainer_state.json`, `train_log.jsonl` (one JSON line
per log: `loss`, `main_loss`, `autoregressive_loss`, `total_loss`, `ar_mse`, `ar_copy_last_mse`,
`ar_fast_loss`/`ar_slow_loss` where on, learning rate, ...) and `loss_curve.png`.
"""

TRAINER_SECTION = """\
## `trainer` block

Besides the keys below, `config` takes every field of `transformers.TrainingArguments`
([table at the end](#trainingarguments-fields)).

| key | type | default | meaning |
|---|---|---|---|
| `trainer_type` | 'autoregressive_trainer' \\| 'hf_trainer' \\| 'sft' | `'autoregressive_trainer'` | `autoregressive_trainer` trains with the autoregressive loss: with `model_config.enable_autoregressive` unset the module is attached (with `autoregressive_config`, or its defaults), so a config with only `dataset_config` trains it; with `enable_autoregressive: false` it is the plain-SFT baseline through the same trainer. `hf_trainer` / `sft`: no autoregressive loss (a module the model carries is removed before training); `enable_autoregressive: true` with them is an error. All use `AutoregressiveTrainer` (transformers' Trainer), so logs, checkpoints and the loss plot are the same. |
| `model_config` | mapping | `{}` (the tiny model) | [below](#model_config) |
| `dataset_config` | mapping | **required** | [below](#dataset_config) |
| `resume_from_checkpoint` | str \\| bool \\| null | `null` | a `checkpoint-N` folder, or `true`: the newest complete checkpoint in `output_dir` (start fresh if there is none). Resuming restores weights (the autoregressive module included), optimizer, LR schedule, RNG and data position: the resumed run logs the same losses as an uninterrupted one. |

Changes to transformers' TrainingArguments (`lmms_engine.train.TrainingArguments`): on a machine
without any accelerator, `use_cpu` is set to true (so `bf16: true` trains with bfloat16 autocast on the
CPU instead of failing, and `torchrun` on CPU runs real DDP over gloo) and `dataloader_pin_memory` to
false. On CPU the launcher also uses one intra-op thread per process unless `OMP_NUM_THREADS` is set.

Distributed: `torchrun --nproc_per_node=N -m lmms_engine.launch.cli --config X.yaml` trains with DDP
(gloo on CPU, NCCL on GPUs); the SigLIP parts LLaVA-OneVision never uses (`post_layernorm`, `head`) are
frozen. transformers sets DDP's `find_unused_parameters` to true unless activation checkpointing is
on; with checkpointing on (`model_config.gradient_checkpointing`), data where some rank's batch leaves
a part unused (text-only samples: no tower or projector; `mm_newline_position: no_token`: no
`image_newline`) needs `ddp_find_unused_parameters: true`. FSDP (transformers 5: FSDP2 by default):
`fsdp: true` with e.g. `fsdp_config: {version: 2, activation_checkpointing: true}` (layers are wrapped
by the model's `_no_split_modules`); accelerate enables FSDP on GPUs only, so on CPU the config is
rejected instead of silently training with DDP.
DeepSpeed: `deepspeed: path/to/ds_config.json` where DeepSpeed is installed.

How the trainer treats the losses and checkpoints (`lmms_engine.train.AutoregressiveTrainer`):

- The model returns raw loss sums and their counts (`loss_terms`); the trainer normalises them over
  the whole optimisation step (all accumulation micro-batches, all ranks, counted before the step):
  the language-model loss over the step's label tokens, as transformers does, and the autoregressive
  term over the step's supervised target tokens, so a text-only micro-batch or rank dilutes nothing
  and the step does not depend on how its samples are split. `main_loss + autoregressive_loss =
  total_loss` holds for the objective and for every logged value. Each logged component is the mean
  over the logging window's steps of that step's value (logged `total_loss` equals transformers'
  `loss`); `ar_mse`, `ar_copy_last_mse`, `ar_fast_loss`, `ar_slow_loss` average over the steps that
  had targets. Evaluation logs `eval_main_loss` etc. averaged over samples.
- With the autoregressive loss off (`sft`, `hf_trainer`, or `enable_autoregressive: false`) a model
  that carries the module has it removed before training: no autoregressive parameters in the
  optimiser, no extra compute, none in the checkpoints.
- Resuming restores the weights through the model's own checkpoint key mapping (transformers 5 saves
  LLaVA-OneVision under its legacy key names and its Trainer restores them without renaming, which
  silently leaves the language model at its initial weights), so a resumed run is bit-identical to
  an uninterrupted one on the same machine.
"""


LORA_SECTION = (
    "### `model_config.lora`\n\n`lmms_engine.models.lora.LoraSettings` (needs the `lora` extra: "
    "`pip install 'lmms-video[lora]'`), for every family: LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL / Qwen3-VL. "
    "Adapters go on the language model's linear layers named in `target_modules`, matched only under "
    "`model.language_model.`: the vision tower's own linear layers (SigLIP's `q_proj`/`v_proj`, Qwen2.5-VL's "
    "vision `gate_proj`/`up_proj`/`down_proj`) never get one. The LLM's base weights and `lm_head` freeze; the "
    "projector (LLaVA-OneVision's `multi_modal_projector`, `image_newline`, `faster_token`; Qwen-VL's merger and "
    "Qwen3-VL's deepstack mergers; unless `freeze_projector`) and the autoregressive predictor train in full; the "
    "vision tower follows `freeze_vision_tower`.\n"
)

LORA_CHECKPOINTS = """#### LoRA checkpoints

`config.json` records `lora`, so the engine's `from_pretrained` and the Trainer's `resume_from_checkpoint`
re-create the adapters before the weights load (resume is exact: the tests compare a run resumed from
`checkpoint-1` with the uninterrupted one). Every save also writes `adapter_model.safetensors` (the trained
tensors alone: adapters and fully trained modules) and `adapter_settings.json`. The weights carry peft's layer
names (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`), so plain transformers loads a LoRA run
once merged: `python -m lmms_engine.export merge-lora --checkpoint C --output D` (C = `output_dir` or a
`checkpoint-N`) folds `W + (alpha / r) * B @ A` into each base weight; D is a plain checkpoint of the family
(`AutoModelForImageTextToText`, `LlavaOnevisionForConditionalGeneration`) with the adapter model's logits.

`checkpoint-N` folders hold the frozen base weights too, on purpose. A folder with only the trained tensors
and a pointer to the base (as peft writes) would resume exactly only while the base stays bit-identical
at that pointer (a hub id resolves to its newest revision at resume time; a local folder can be replaced),
and not every frozen tensor comes from the base: rows added by a vocabulary growth and a `copy` target
encoder are made when the model is built. Evaluation, `merge-lora` and the exports would also need the base
reachable from wherever they run. Disk per checkpoint (LoRA `r: 8` on the default seven projections, the
autoregressive module (7B: default sizes; tiny: the tests' one-layer module); optimizer = AdamW states of
the trained tensors):

| model | `model.safetensors` | `adapter_model.safetensors` | `optimizer.pt` | whole folder | trained tensors + optimizer only |
| --- | --- | --- | --- | --- | --- |
| tiny Qwen2.5-VL (measured) | 1.87 MB | 0.67 MB | 1.36 MB | 3.96 MB | 2.08 MB |
| Qwen2.5-VL-7B, bf16 (estimate) | 17.0 GB | 0.43 GB | 0.86 GB | 18.3 GB | 1.3 GB |

The 7B estimate: 8.29 B base parameters in bf16 (16.6 GB); trained 130 M: adapters 20.2 M (float32, as peft's `get_peft_model` makes them),
merger 44.6 M (bf16), predictor 64.9 M (float32, `_keep_in_fp32_modules_strict`). To bound the disk, keep the last checkpoints only
(`save_total_limit: 2` = 37 GB for the 7B run) and share `adapter_model.safetensors` or the merged folder.
"""


def render_config_reference() -> str:
    """The full text of docs/config.md."""
    from lmms_engine.data.dataset import DatasetConfig
    from lmms_engine.eval.config import EvaluateConfig
    from lmms_engine.data.demo import DemoDataConfig
    from lmms_engine.models.autoregressive_config import AutoregressiveConfig
    from lmms_engine.models.builder import ModelConfig
    from lmms_engine.models.lora import LoraSettings
    from lmms_engine.models.tiny import TinyConfig
    from lmms_engine.train.arguments import TrainingArguments

    ta_meanings = {f.name: _first_sentences(f.metadata.get("help", "")) for f in dataclasses.fields(TrainingArguments)}
    parts = [
        HEADER,
        "## `demo_data` block\n\nGenerates the demo dataset (coloured shapes; by default the `flash` question, the one the "
        "tiny model learns in minutes; questions about motion, order and colour change too) unless `output_dir` already holds one made with the same settings. Writes `train.json`, "
        "`eval.json`, `videos/` and the marker `demo_config.json` (its settings). It never deletes or overwrites what "
        "it did not write: a folder holding anything else (or a `train.json` without the marker) is a config "
        "error, also with `overwrite: true`; replacing a demo dataset made with other settings is logged.\n",
        field_table(DemoDataConfig, meanings_for(DemoDataConfig)),
        "",
        TRAINER_SECTION,
        "## `model_config`\n\n`lmms_engine.models.builder.ModelConfig`. Without `model_name_or_path` the tiny offline "
        "model is built (random weights, the engine's byte-level BPE tokenizer); with it, the checkpoint and its "
        "own tokenizer are loaded.\n",
        field_table(ModelConfig, meanings_for(ModelConfig)),
        "",
        "### `model_config.autoregressive_config`\n\n`lmms_engine.models.autoregressive_config.AutoregressiveConfig`; "
        "the guide's three parameter tables plus the design's keys.\n",
        field_table(AutoregressiveConfig, meanings_for(AutoregressiveConfig)),
        "",
        "### `model_config.tiny_config`\n\n`lmms_engine.models.tiny.TinyConfig` (only without "
        "`model_name_or_path`).\n",
        field_table(TinyConfig, meanings_for(TinyConfig)),
        "",
        LORA_SECTION,
        field_table(LoraSettings, meanings_for(LoraSettings)),
        "",
        LORA_CHECKPOINTS,
        "",
        "## `dataset_config`\n\n`lmms_engine.data.DatasetConfig`. Records: LLaVA `conversations` (with `video` / "
        "`image`) or OpenAI-style `messages`, in JSON lists, JSONL, Parquet, Arrow or `datasets` folders, one file, "
        "a list of files or a mixture file: see docs/data.md for every format with an example.\n",
        field_table(DatasetConfig, meanings_for(DatasetConfig)),
        "",
        "## TrainingArguments fields\n\nEvery field of `transformers.TrainingArguments` "
        f"(transformers {__import__('transformers').__version__}), flattened into the trainer block's `config`, "
        "and the engine's per-part learning rates (`vision_tower_lr`, `projector_lr`, `language_model_lr`, "
        "`autoregressive_lr`: `lmms_engine.train.param_groups`). Meanings are transformers' own (first "
        "sentences); `resume_from_checkpoint` is read by the launcher as described above.\n",
        field_table(TrainingArguments, ta_meanings),
        "",
        "## `evaluate` block\n\n`lmms_engine.eval.EvaluateConfig`: held-out accuracy (by question type) and the "
        "predictor's next-frame reconstruction against the copy-last-frame baseline, written to `output_dir` "
        "(see docs/evaluation.md). Runs on the main process; its files are checked when it runs, so it may name "
        "the `output_dir` an earlier trainer block writes.\n",
        field_table(EvaluateConfig, meanings_for(EvaluateConfig)),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_engine.launch.config_doc",
                                     description="Print (or write) the config reference, docs/config.md.")
    parser.add_argument("--write", metavar="PATH", help="write to PATH instead of stdout")
    args = parser.parse_args(argv)
    text = render_config_reference()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
