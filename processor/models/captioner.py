"""Image captioners from local Hugging Face folders: family detection, loading, prompts, batched generate.

Supported families, detected from the folder's ``config.json`` (``architectures``/``model_type``):

* **BLIP** — ``BlipForConditionalGeneration``. No prompt: unconditional caption. A prompt is a
  caption *prefix* the decoder continues ("a CT image of"); the returned text includes it.
* **BLIP-2** — ``Blip2ForConditionalGeneration`` with an OPT (decoder-only) or Flan-T5
  (encoder-decoder) language model. The prompt goes in as text after the query tokens, the way
  the BLIP-2 model cards write it (``"Question: … Answer:"``); only the new text is returned.
* **Chat-style VLMs** — any architecture that ``AutoModelForImageTextToText`` knows (Gemma 3,
  LLaVA, Idefics3/SmolVLM, InternVL-HF, Qwen2-VL, …) whose processor has a chat template. The
  prompt becomes one user turn ``[image, text]`` rendered with that template plus the generation
  prompt; only the assistant's new text is returned. Without a prompt, :data:`DEFAULT_CHAT_PROMPT`.

Everything loads with ``from_pretrained(folder, local_files_only=True)``: nothing downloads. Image
processors fall back to their PIL ("slow") versions when torchvision is absent. In transformers 5
the Qwen2-VL and InternVL *processors* also build a video processor that needs torchvision; such
a folder fails to load with a :class:`WeightsError` saying so.

:class:`Captioner` batches: one ``generate`` call per list of images (left-padded for decoder-only
models) and keeps counters (``stats``) of the calls it made and of the images the vision encoder
saw per forward pass (a forward hook), so callers and tests can see how work was batched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from processor.errors import WeightsError
from processor.models.image_tokens import BLIP2_FIX, blip2_problems, check_image_tokens

log = logging.getLogger(__name__)

DEFAULT_CHAT_PROMPT = "Describe this axial chest CT image."
BLIP2_LANGUAGE_MODELS = ("opt", "t5")
SUPPORTED_FAMILIES = (
    "BLIP (BlipForConditionalGeneration)",
    "BLIP-2 (Blip2ForConditionalGeneration with an OPT or Flan-T5 language model)",
    "chat-style vision-language models loadable with AutoModelForImageTextToText whose processor has a "
    "chat template (e.g. Gemma3ForConditionalGeneration, LlavaForConditionalGeneration, "
    "Idefics3ForConditionalGeneration, InternVLForConditionalGeneration, Qwen2VLForConditionalGeneration)",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SMALL_FILE_BYTES = 64 * 2**20  # files below this are content-hashed; weight files by name, size, mtime


class UnsupportedModel(ValueError):
    """The folder is not one of the supported captioning families; the message lists them."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder is, read from its config.json without loading any weights."""

    folder: Path
    family: str  # blip | blip-2 | chat
    architecture: str
    model_type: str
    language_model: str | None = None  # BLIP-2: opt | t5

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def decoder_only(self) -> bool:
        return self.family == "chat" or (self.family == "blip-2" and self.language_model == "opt")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{path}: cannot read the model config ({exc}). Fix: point `model:` at a folder "
            "written by save_pretrained (it holds config.json and the weights)."
        ) from exc


def detect(folder: Path) -> ModelInfo:
    """Which captioning family the folder holds; UnsupportedModel (listing the families) otherwise."""
    config = read_config(folder)
    architectures = config.get("architectures") or []
    model_type = str(config.get("model_type", ""))
    architecture = architectures[0] if architectures else f"(none; model_type {model_type or '?'})"
    supported = "Supported: " + "; ".join(SUPPORTED_FAMILIES) + "."
    if "BlipForConditionalGeneration" in architectures or (not architectures and model_type == "blip"):
        return ModelInfo(folder, "blip", "BlipForConditionalGeneration", model_type)
    if "Blip2ForConditionalGeneration" in architectures or (not architectures and model_type == "blip-2"):
        language = str((config.get("text_config") or {}).get("model_type", "opt"))
        if language not in BLIP2_LANGUAGE_MODELS:
            raise UnsupportedModel(
                f"{folder}: BLIP-2 with a {language!r} language model is not supported "
                f"(only OPT and Flan-T5). {supported}"
            )
        return ModelInfo(folder, "blip-2", "Blip2ForConditionalGeneration", model_type, language)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

    known = set(MAPPING.values())
    chat_arch = next((a for a in architectures if a in known), None)
    if chat_arch is None and not architectures and model_type in MAPPING:
        chat_arch = MAPPING[model_type]
    if chat_arch is None or model_type in ("blip", "blip-2"):
        raise UnsupportedModel(
            f"{folder}: architecture {architecture} cannot caption images here. {supported}"
        )
    if not has_chat_template(folder):
        raise UnsupportedModel(
            f"{folder}: {chat_arch} is an image-text-to-text model but its processor has "
            "no chat template (chat_template.jinja / chat_template.json), so there is no "
            f"defined way to give it the prompt. {supported}"
        )
    return ModelInfo(folder, "chat", chat_arch, model_type)


def effective_prompt(info: ModelInfo, prompt: str | None) -> str | None:
    """The prompt as given; chat models, which need one, get :data:`DEFAULT_CHAT_PROMPT` when it is empty."""
    if info.family == "chat" and not prompt:
        return DEFAULT_CHAT_PROMPT
    return prompt or None


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("chat_template"):
                    return True
            except (OSError, ValueError):
                continue
    return False


def weight_files(folder: Path) -> list[Path]:
    """The weight files a saved folder needs (config.json, and the shards its index names)."""
    files = [folder / "config.json"]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                why = f"no weight_map: {exc}" if isinstance(exc, KeyError) else str(exc)
                raise WeightsError(
                    f"{index}: the model's weight index cannot be read ({why}), so the model cannot "
                    "be loaded. Fix: copy the model folder again from its source",
                    path=index,
                ) from exc
            return files + [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return files + [folder / name]
    return files + [folder / "model.safetensors"]


def folder_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of every file in the folder: cheap, and changes when the model does."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        out.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def folder_digest(folder: Path, fingerprint: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the folder: content of config, tokenizer, processor and template files; name,
    size and mtime of the large weight files (hashing gigabytes per run would make re-runs slow)."""
    digest = hashlib.sha256()
    for rel, size, mtime_ns in fingerprint:
        digest.update(rel.encode() + b"\0")
        if size < _SMALL_FILE_BYTES and not rel.endswith(_WEIGHT_SUFFIXES):
            digest.update(hashlib.sha256((folder / rel).read_bytes()).digest())
        else:
            digest.update(f"{size}:{mtime_ns}".encode())
    return digest.hexdigest()


@dataclass
class CaptionStats:
    """What a captioner did since it was loaded (shared by every study that used it)."""

    generate_calls: int = 0
    images: int = 0
    images_per_call: list[int] = field(default_factory=list)
    vision_batches: list[int] = field(default_factory=list)  # pixel batch size per vision-encoder pass


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    num_beams: int

    def kwargs(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False}


class Captioner:
    """One loaded model + processor; ``caption(images, prompt, generation)`` runs one generate call."""

    def __init__(self, info: ModelInfo, model: Any, processor: Any, device: Any, dtype: Any) -> None:
        self.info = info
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.stats = CaptionStats()
        self._lock = threading.Lock()  # generate is not re-entrant on one model
        vision = _vision_module(model)
        if vision is not None:
            vision.register_forward_hook(self._on_vision_forward, with_kwargs=True)

    def _on_vision_forward(
        self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if pixels is not None and hasattr(pixels, "shape"):
            self.stats.vision_batches.append(int(pixels.shape[0]))

    def caption(self, images: Sequence[np.ndarray], prompt: str | None, generation: Generation) -> list[str]:
        """Caption ``images`` (uint8 grayscale or RGB arrays) in one padded batch: one generate call."""
        import torch

        if not images:
            return []
        inputs = self._inputs(images, effective_prompt(self.info, prompt))
        # never a caption of the prompt alone: the image tokens must be there (StepError otherwise)
        check_image_tokens(self.info.family, self.model.config, inputs.get("input_ids"), self.info.folder)
        with self._lock, torch.inference_mode():
            inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
            if "pixel_values" in inputs and self.dtype is not None:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            output = self.model.generate(**inputs, **generation.kwargs())
            self.stats.generate_calls += 1
            self.stats.images += len(images)
            self.stats.images_per_call.append(len(images))
        return self._decode(output, inputs.get("input_ids"))

    def _inputs(self, images: Sequence[np.ndarray], prompt: str | None) -> dict[str, Any]:
        from PIL import Image

        pil = [Image.fromarray(np.asarray(a)).convert("RGB") for a in images]
        n = len(pil)
        family = self.info.family
        if family == "blip":
            if prompt:
                return dict(self.processor(images=pil, text=[prompt] * n, padding=True, return_tensors="pt"))
            return dict(self.processor(images=pil, return_tensors="pt"))
        if family == "blip-2":
            # Text (possibly empty) always goes in, so the query-token placeholders are in input_ids.
            return dict(
                self.processor(images=pil, text=[prompt or ""] * n, padding=True, return_tensors="pt")
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        return dict(
            self.processor(
                images=[[image] for image in pil],
                text=[text] * n,
                padding=True,
                add_special_tokens=not (bos and text.startswith(bos)),
                return_tensors="pt",
            )
        )

    def _decode(self, output: Any, input_ids: Any) -> list[str]:
        tokens = output
        if self.info.decoder_only and input_ids is not None:
            length = input_ids.shape[1]
            if tokens.shape[1] >= length and bool((tokens[:, :length] == input_ids).all()):
                tokens = tokens[:, length:]  # only what the model added after the prompt
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def _vision_module(model: Any) -> Any:
    for attr in ("vision_model", "vision_tower"):
        module = getattr(model, attr, None)
        if module is not None:
            return module
    inner = getattr(model, "model", None)
    for attr in ("vision_tower", "vision_model"):
        module = getattr(inner, attr, None) if inner is not None else None
        if module is not None:
            return module
    return None


def load_captioner(info: ModelInfo, device: str, dtype: Any) -> Captioner:
    """Load model and processor from the local folder (never from a hub) onto ``device`` at ``dtype``."""
    import torch
    import transformers

    folder = str(info.folder)
    if info.family == "blip":
        model_cls: Any = transformers.BlipForConditionalGeneration
    elif info.family == "blip-2":
        model_cls = transformers.Blip2ForConditionalGeneration
    else:
        model_cls = transformers.AutoModelForImageTextToText
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (ImportError, AttributeError) as exc:
        raise WeightsError(
            f"{folder}: the {info.architecture} processor cannot be built here ({exc}). In "
            "transformers 5 some VLM processors (e.g. Qwen2-VL, InternVL) need torchvision "
            "for their video part. Fix: pip install torchvision, or use a BLIP, BLIP-2 or "
            "Gemma 3 folder."
        ) from exc
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{folder}: cannot load the processor/tokenizer ({exc}). Fix: save it into the "
            "same folder with processor.save_pretrained(folder)."
        ) from exc
    try:
        model = model_cls.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{folder}: cannot load {info.architecture} weights ({exc}). Fix: copy the "
            "complete folder written by model.save_pretrained(folder)."
        ) from exc
    if info.family == "blip-2":
        problems = blip2_problems(processor, model.config)
        if problems:
            raise WeightsError(
                f"{folder}: this BLIP-2 folder cannot show the image to the model: "
                f"{'; '.join(problems)}. {BLIP2_FIX}"
            )
    model.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and info.decoder_only:
        tokenizer.padding_side = "left"  # generation continues right after each prompt
    log.info(
        "caption.model_loaded folder=%s family=%s architecture=%s device=%s dtype=%s",
        folder,
        info.family,
        info.architecture,
        device,
        dtype or "float32",
    )
    return Captioner(info, model, processor, torch.device(device), dtype)
