"""Processor files in every checkpoint: what ``AutoProcessor.from_pretrained(checkpoint)`` needs.

HF's Trainer calls ``processing_class.save_pretrained(dir)`` for every checkpoint and the final model.
:func:`build_processing_class` returns a :class:`CheckpointProcessor` to pass as that
``processing_class``: it holds the training tokenizer and the LLaVA-OneVision processor files, and its
``save_pretrained`` writes both, so each checkpoint loads with ``AutoProcessor`` as a
``LlavaOnevisionProcessor`` (image processor, video processor, tokenizer, chat template) on a machine
with torchvision (transformers' video processors and fast image processors need it for processing).

Files (the legacy flat layout the ``llava-hf`` checkpoints use; transformers 5 reads it, and unlike the
nested ``processor_config.json`` transformers 5 writes, so do earlier versions):

- ``preprocessor_config.json``: the image processor (``LlavaOnevisionImageProcessor``);
- ``video_preprocessor_config.json``: the video processor (``LlavaOnevisionVideoProcessor``);
- ``processor_config.json``: ``num_image_tokens``, ``vision_feature_select_strategy``, image/video tokens,
  ``vision_aspect_ratio``;
- ``chat_template.json``: the processor's chat template (list-of-parts messages);
- the tokenizer as the tokenizer saves itself, its ``tokenizer_config.json`` made readable by
  transformers 4 as well (:func:`make_tokenizer_config_portable`).

With a source checkpoint (``model_name_or_path``: a folder or a hub id) its processor files are copied
as they are (a hub download that fails falls back to generated files, with a warning); otherwise, or for
files the source lacks, they are generated from the model config: frame size ``vision_config.image_size``,
mean/std as :class:`~lmms_engine.data.preprocess.ProcessorInfo` reads them (0.5 for SigLIP), ``resample``
= the training resize filter (:data:`lmms_engine.video.decode.RESIZE_FILTER`, bicubic in RGB like
LLaVA-OneVision's), ``num_image_tokens = (image_size // patch_size) ** 2``. The tokenizer is
always the training tokenizer (loaded from the source when there is one): copying the source's raw
tokenizer files could silently undo tokens added for training.

Without torchvision the image processor is built with its PIL backend
(``LlavaOnevisionImageProcessorPil``, saved under the class name ``LlavaOnevisionImageProcessor``), and
the video processor class (imported from its module) can be created and saved, not run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transformers import ProcessorMixin

logger = logging.getLogger(__name__)

PROCESSOR_CLASS = "LlavaOnevisionProcessor"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
PROCESSOR_CHAT_TEMPLATE_FILE = "chat_template.json"
#: The processor-level files a source checkpoint's copy is made of (tokenizer files excluded, see above).
PROCESSOR_FILES: tuple[str, ...] = (IMAGE_PROCESSOR_FILE, VIDEO_PROCESSOR_FILE, PROCESSOR_CONFIG_FILE,
                                    PROCESSOR_CHAT_TEMPLATE_FILE)
#: The entry of a nested ``processor_config.json`` (transformers 5) holding the settings a flat file holds.
NESTED_PROCESSOR_KEYS: dict[str, str] = {IMAGE_PROCESSOR_FILE: "image_processor", VIDEO_PROCESSOR_FILE: "video_processor"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_CHAT_TEMPLATE_FILE = "chat_template.jinja"

# ChatML (Qwen2) rendering of messages whose content is a string or a list of parts
# ({"type": "video"}, {"type": "image"}, {"type": "text", "text": ...}); parts are joined with "\n", so
# [video, text] renders "<video>\n<text>", the engine's training prompt. Used only when it renders
# string-content conversations exactly as the training tokenizer's own template does.
_CHATML_MULTIMODAL = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if part['type'] == 'video' %}{{ '__VIDEO__' }}"
    "{% elif part['type'] == 'image' %}{{ '__IMAGE__' }}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ProcessorFiles:
    """Processor files ready to write: name -> bytes, and where each came from (``source <id>`` or
    ``generated``)."""

    files: Mapping[str, bytes]
    origin: Mapping[str, str] = field(default_factory=dict)

    def write(self, directory: str | os.PathLike) -> list[str]:
        """Write every file into ``directory`` (created if needed); return the paths written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, content in self.files.items():
            (out / name).write_bytes(content)
            written.append(str(out / name))
        return written

    @property
    def processor_config(self) -> dict[str, Any]:
        """The parsed ``processor_config.json``."""
        return json.loads(self.files[PROCESSOR_CONFIG_FILE])


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _model_config(model: Any) -> Any:
    """The HF config of ``model`` (a model or a config)."""
    return getattr(model, "config", model)


def _processor_info(config: Any) -> Any:
    from lmms_engine.data.preprocess import ProcessorInfo

    return ProcessorInfo.from_model_config(config)


def _token(tokenizer: Any, token: str, expected_id: int | None, what: str, required: bool = True) -> None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        message = (f"the tokenizer has no {token!r} token, which the LLaVA-OneVision processor uses as its {what} "
                   f"placeholder")
        if required:
            raise ValueError(f"{message}; add it as a special token")
        logger.warning("%s: the saved processor cannot take %s inputs", message, what)
        return
    if expected_id is not None and token_id != expected_id:
        raise ValueError(f"the tokenizer's {token!r} id {token_id} differs from the model config's {what} token id "
                         f"{expected_id}; save the tokenizer the model was trained with")


def num_image_tokens(config: Any) -> int:
    """``processor_config.num_image_tokens``: tower tokens of one frame as HF's processor counts them
    (``(image_size // patch_size) ** 2``, plus 1 with ``vision_feature_select_strategy: default``, which
    the processor subtracts again)."""
    from lmms_engine.models.vision import patch_grid_side

    side = patch_grid_side(config.vision_config)
    return side * side + (1 if config.vision_feature_select_strategy == "default" else 0)


def processor_chat_template(tokenizer: Any, video_token: str = "<video>", image_token: str = "<image>") -> str | None:
    """A multimodal ChatML template for the processor, or None when the tokenizer's own template does
    not render string-content conversations exactly like it (the processor then has no template of
    its own; lmms-eval's ``llava_hf`` renders prompts with the tokenizer's template anyway)."""
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str):
        return None
    template = _CHATML_MULTIMODAL.replace("__VIDEO__", video_token).replace("__IMAGE__", image_token)
    probes = [
        [{"role": "user", "content": f"{video_token}\nWhat happens?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}],
    ]
    try:
        for messages in probes:
            for prompt in (True, False):
                ours = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                     add_generation_prompt=prompt)
                theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
                if ours != theirs:
                    return None
    except Exception as err:  # noqa: BLE001 - any template that cannot render the probes is not ChatML
        logger.info("the tokenizer's chat template could not render the probe conversations (%s)", err)
        return None
    return template


def resize_resample() -> int:
    """The processors' ``resample`` (a ``PILImageResampling`` value) for the training resize filter."""
    from transformers.image_utils import PILImageResampling

    from lmms_engine.video.decode import RESIZE_FILTER

    return int(PILImageResampling[RESIZE_FILTER.upper()])


def generate_processor_files(tokenizer: Any, model: Any) -> dict[str, bytes]:
    """The four processor files generated from the model config (see the module docstring).

    Args:
        tokenizer: the training tokenizer (holds ``<video>`` and ``<image>``).
        model: the model or its HF config (LLaVA-OneVision: ``vision_config``, ``image_grid_pinpoints``,
            ``vision_feature_select_strategy``, ``vision_aspect_ratio``).
    """
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    config = _model_config(model)
    info = _processor_info(config)
    _token(tokenizer, info.video_token, getattr(config, "video_token_id", None), "video")
    _token(tokenizer, "<image>", getattr(config, "image_token_id", None), "image", required=False)
    size = {"height": info.image_size, "width": info.image_size}
    common = {"size": size, "image_mean": list(info.image_mean), "image_std": list(info.image_std),
              "resample": resize_resample()}
    pinpoints = getattr(config, "image_grid_pinpoints", None) or [[info.image_size, info.image_size]]
    image_processor = LlavaOnevisionImageProcessorPil(**common, image_grid_pinpoints=[list(p) for p in pinpoints])
    video_processor = LlavaOnevisionVideoProcessor(**common)
    files: dict[str, bytes] = {}
    for name, processor in ((IMAGE_PROCESSOR_FILE, image_processor), (VIDEO_PROCESSOR_FILE, video_processor)):
        data = json.loads(processor.to_json_string())
        data["processor_class"] = PROCESSOR_CLASS
        files[name] = _json_bytes(data)
    files[PROCESSOR_CONFIG_FILE] = _json_bytes({
        "processor_class": PROCESSOR_CLASS,
        "image_token": "<image>",
        "video_token": info.video_token,
        "num_image_tokens": num_image_tokens(config),
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": getattr(config, "vision_aspect_ratio", "anyres_max_9"),
    })
    template = processor_chat_template(tokenizer, info.video_token)
    if template is not None:
        files[PROCESSOR_CHAT_TEMPLATE_FILE] = _json_bytes({"chat_template": template})
    return files


def source_processor_files(source: str) -> dict[str, bytes]:
    """The processor files present in ``source`` (a local folder, else a hub id, downloaded once).

    Raises:
        OSError or a huggingface_hub error: the hub cannot be reached (offline) or ``source`` names no repo.
    """
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=list(PROCESSOR_FILES)))
    return folder_processor_files(folder)


def folder_processor_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """The processor files (:data:`PROCESSOR_FILES`) present in the local ``folder``."""
    folder = Path(folder)
    return {name: (folder / name).read_bytes() for name in PROCESSOR_FILES if (folder / name).is_file()}


def sub_processor_settings(files: Mapping[str, bytes], name: str) -> dict[str, Any] | None:
    """The settings of the sub-processor whose flat file is ``name`` (``IMAGE_PROCESSOR_FILE`` or
    ``VIDEO_PROCESSOR_FILE``) in a checkpoint's processor ``files``: the flat file where there is one,
    else its entry (:data:`NESTED_PROCESSOR_KEYS`) of a nested ``processor_config.json``; None when neither."""
    if name in files:
        return json.loads(files[name])
    nested = json.loads(files[PROCESSOR_CONFIG_FILE]).get(NESTED_PROCESSOR_KEYS[name]) \
        if PROCESSOR_CONFIG_FILE in files else None
    return nested if isinstance(nested, dict) else None


def _check_copied(files: Mapping[str, bytes], config: Any, source: str) -> None:
    """Warn when a copied file contradicts the model (the model is what the weights were trained as)."""
    if PROCESSOR_CONFIG_FILE in files:
        copied = json.loads(files[PROCESSOR_CONFIG_FILE])
        if "num_image_tokens" in copied and copied["num_image_tokens"] != num_image_tokens(config):
            logger.warning("%s's processor_config.json has num_image_tokens=%s but the model's tower gives %d",
                           source, copied["num_image_tokens"], num_image_tokens(config))
    for name in (IMAGE_PROCESSOR_FILE, VIDEO_PROCESSOR_FILE):
        resample = json.loads(files[name]).get("resample") if name in files else None
        if resample is not None and resample != resize_resample():
            from lmms_engine.video.decode import RESIZE_FILTER

            logger.warning("%s's %s resizes with resample=%s, training resized with %s (resample=%d): evaluation "
                           "through these files sees other pixels than training", source, name, resample,
                           RESIZE_FILTER, resize_resample())
    if IMAGE_PROCESSOR_FILE in files:
        size = (json.loads(files[IMAGE_PROCESSOR_FILE]).get("size") or {}).get("height")
        if size is not None and size != config.vision_config.image_size:
            logger.warning("%s's image processor resizes to %s px but the model's tower takes %d px",
                           source, size, config.vision_config.image_size)


def resolve_processor_files(tokenizer: Any, model: Any, source: str | None = None) -> ProcessorFiles:
    """Copy ``source``'s processor files, generate the others (module docstring).

    A source that cannot be read (hub offline, unknown repo) logs a warning and everything is generated.
    """
    config = _model_config(model)
    generated = generate_processor_files(tokenizer, config)
    copied: dict[str, bytes] = {}
    if source:
        try:
            copied = source_processor_files(source)
        except Exception as err:  # noqa: BLE001 - offline/unknown repo must not stop training
            logger.warning("could not read the processor files of %r (%s: %s); generating them from the model "
                           "config instead", source, type(err).__name__, err)
        _check_copied(copied, config, source)
    files: dict[str, bytes] = {}
    origin: dict[str, str] = {}
    nested = json.loads(copied.get(PROCESSOR_CONFIG_FILE, b"{}"))  # transformers 5 nests the sub-processors
    has_video = VIDEO_PROCESSOR_FILE in copied or "video_processor" in nested
    has_image = IMAGE_PROCESSOR_FILE in copied or "image_processor" in nested
    for name in PROCESSOR_FILES:
        if name in copied:
            files[name], origin[name] = copied[name], f"source {source}"
        elif name == VIDEO_PROCESSOR_FILE and has_video or name == IMAGE_PROCESSOR_FILE and has_image:
            continue  # the source's nested processor_config.json holds it
        elif name == PROCESSOR_CHAT_TEMPLATE_FILE and copied:
            continue  # a source without one keeps its template where it has it (the tokenizer's)
        elif name in generated:
            files[name], origin[name] = generated[name], "generated"
    return ProcessorFiles(files, origin)


def make_tokenizer_config_portable(directory: str | os.PathLike) -> None:
    """Rewrite ``tokenizer_config.json`` in ``directory`` so transformers 4 reads it too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (absent from transformers 4), the extra
    special tokens as a list under ``extra_special_tokens`` (transformers 4 expects a mapping there) and
    the chat template only in ``chat_template.jinja`` (transformers < 4.50 reads it from the config).
    They become ``PreTrainedTokenizerFast``, ``additional_special_tokens`` and a ``chat_template`` entry;
    transformers 5 loads the result as the same tokenizer.
    """
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("backend", None)
    extra = data.get("extra_special_tokens")
    if isinstance(extra, list):
        data.pop("extra_special_tokens")
        known = list(data.get("additional_special_tokens") or [])
        data["additional_special_tokens"] = known + [t for t in extra if t not in known]
    jinja = Path(directory) / TOKENIZER_CHAT_TEMPLATE_FILE
    if "chat_template" not in data and jinja.is_file():
        data["chat_template"] = jinja.read_text(encoding="utf-8")
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class CheckpointProcessor(ProcessorMixin):
    """The Trainer's ``processing_class``: the training tokenizer plus the LLaVA-OneVision processor files.

    The Trainer treats it as a processor whose tokenizer is ``.tokenizer`` (special-token alignment,
    ``model_input_names`` for length grouping); ``save_pretrained(dir)`` writes the tokenizer (its
    config made portable) and the processor files. It is not a LLaVA-OneVision processor itself: load
    one from a saved checkpoint with ``AutoProcessor.from_pretrained``.
    """

    def __init__(self, tokenizer: Any, processor_files: ProcessorFiles, processor_class: str = PROCESSOR_CLASS) -> None:
        super().__init__(tokenizer)
        self.processor_files = processor_files
        self.processor_class_name = processor_class  # recorded in tokenizer_config.json for AutoProcessor

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def to_dict(self) -> dict[str, Any]:
        return {"processor_class": type(self).__name__, "files": dict(self.processor_files.origin)}

    def __repr__(self) -> str:
        files = dict(self.processor_files.origin)
        return f"{type(self).__name__}(tokenizer={type(self.tokenizer).__name__}, files={files})"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Write the tokenizer and the processor files into ``save_directory``; return the files written."""
        if push_to_hub:
            raise NotImplementedError("push the saved folder with huggingface_hub instead")
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer._set_processor_class(self.processor_class_name)
        written = [str(p) for p in self.tokenizer.save_pretrained(save_directory)]
        make_tokenizer_config_portable(save_directory)
        stale = Path(save_directory) / PROCESSOR_CHAT_TEMPLATE_FILE
        if PROCESSOR_CHAT_TEMPLATE_FILE not in self.processor_files.files and stale.is_file():
            stale.unlink()  # a template from an earlier save must not outlive the tokenizer it matched
        return written + self.processor_files.write(save_directory)


def build_processing_class(tokenizer: Any, model: Any, source: str | None = None) -> CheckpointProcessor:
    """The ``processing_class`` to give HF's Trainer so that every checkpoint loads with ``AutoProcessor``.

    Args:
        tokenizer: the training tokenizer.
        model: the model (or its HF config) being trained.
        source: the checkpoint the model was loaded from (``model_config.model_name_or_path``: a folder or
            a hub id); None (the tiny model) generates every file.

    The files are resolved once, here (a hub source is downloaded now, not at every save). A layout that
    plain transformers cannot express is saved all the same, with a warning: ``llava_hf`` would expand
    ``<video>`` to a different token count than the model was trained with.
    """
    config = _model_config(model)
    files = resolve_processor_files(tokenizer, config, source)
    layout = _processor_info(config).layout
    if not layout.is_hf_native:
        from lmms_engine.export.routes import describe_routes, evaluation_routes

        logger.warning("the video layout %s is not HF LLaVA-OneVision's: checkpoints are saved with model_type "
                       "lmms_video_llava, which plain transformers (and lmms-eval's llava_hf) refuse to load. "
                       "Evaluation routes:\n%s", layout.to_dict(), describe_routes(evaluation_routes(config)))
    logger.info("processor files for checkpoints: %s", dict(files.origin))
    return CheckpointProcessor(tokenizer, files)


def checkpoint_config(checkpoint: str | os.PathLike) -> Any:
    """The HF config of a LLaVA-OneVision ``checkpoint`` folder saved by training (clear errors otherwise)."""
    from transformers import AutoConfig

    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: give a checkpoint folder saved by training")
    from lmms_engine.models.llava_video_config import LLAVA_MODEL_TYPES  # registers lmms_video_llava

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in LLAVA_MODEL_TYPES:
        raise ValueError(f"{folder}/config.json is a {config.model_type!r} model; a llava_onevision checkpoint "
                         f"is needed")
    return config


def add_processor_files(checkpoint: str | os.PathLike, source: str | None = None) -> list[str]:
    """Write the processor files into an existing ``checkpoint`` folder (saved without them): its
    tokenizer is re-saved (portable config) and the files generated from its ``config.json`` or copied
    from ``source``. Returns the files written."""
    from transformers import AutoTokenizer

    folder = Path(checkpoint)
    config = checkpoint_config(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return build_processing_class(tokenizer, config, source).save_pretrained(folder)


__all__ = ["CheckpointProcessor", "PROCESSOR_CLASS", "PROCESSOR_FILES", "ProcessorFiles", "add_processor_files",
           "build_processing_class", "generate_processor_files", "make_tokenizer_config_portable", "num_image_tokens",
           "processor_chat_template", "resolve_processor_files", "source_processor_files",
           "folder_processor_files", "sub_processor_settings", "NESTED_PROCESSOR_KEYS"]
