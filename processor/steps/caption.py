"""Captioning step ``caption.image_to_text``: describe the rendered key slices with a local captioner.

The site chooses the model: a folder under ``weights/`` written by ``save_pretrained`` (BLIP,
BLIP-2, or a chat-style VLM; see :mod:`processor.models.captioner`). The family is detected
from ``config.json`` when the pipeline is compiled, so an unsupported folder fails before the first
study, with the list of supported families.

* **Batching.** Every selected slice of a study goes into one padded ``generate`` call (up to
  ``batch_size`` images per call; larger sets are split, and halved on CUDA out-of-memory).
  :meth:`CaptionImages.caption_studies` takes several studies at once and lets their slices
  share calls; the per-study runner uses it with one study.
* **Content cache.** Captions are stored through ``env.content_cache`` (``get``/``put``; SQLite
  in the daemon) under a key made of the sha256 of the image pixels, the model folder's hash, the
  prompt's hash and the generation settings — never the image alone — so a re-run is instant
  and a changed model, prompt or setting always generates anew. Cached captions do not load the
  model at all.
* **Honesty.** Each caption carries the model name, the window and slice it describes and
  ``"diagnostic": false``; ``result["captioning"]`` records model folder hash, prompt text and
  hash, generation settings, dtype, device and how the work was batched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field, field_validator

from processor.errors import WeightsError
from processor.models import captioner as cap
from processor.models.image_tokens import blip2_folder_problems
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StepEnv, StudyContext
from processor.steps.ports import CAPTIONS, KEY_SLICES

log = logging.getLogger(__name__)

NOTICE = (
    "Automatically generated description of a rendered preview image by a general-purpose "
    "image-captioning model; not a diagnosis and not reviewed by a clinician."
)
CACHE_KEY_VERSION = 1
_SELECTOR = re.compile(r"^(all|\*|lung|mediastinal|bone)(?::([1-9][0-9]?))?$")
DTYPES: dict[str, str | None] = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ContentCache(Protocol):
    """Where results computed from content are kept (the daemon's is SQLite, in processor.state)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...


class CaptionParams(Params):
    model: str = Field(
        description="model folder written by save_pretrained, e.g. weights/caption/blip2-opt-2.7b"
    )
    prompt: str | None = Field(
        None,
        description="BLIP: caption prefix; BLIP-2: text after the image "
        "('Question: … Answer:'); chat VLMs: the user turn",
    )
    max_new_tokens: int = Field(40, ge=1, le=512, description="longest caption, in tokens")
    num_beams: int = Field(1, ge=1, le=16, description="beam search width (1 = greedy); never sampled")
    images: list[str] = Field(
        ["all"], min_length=1, description="which key slices: all, a window (lung), or window:number (lung:2)"
    )
    batch_size: int = Field(16, ge=1, le=256, description="most images per generate call")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CUDA, fp32 on CPU; bf16/fp16 need CUDA"
    )

    @field_validator("images")
    @classmethod
    def _selectors(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not _SELECTOR.match(v)]
        if bad:
            raise ValueError(
                f"cannot read image selector(s) {bad!r}; write all, a window name (lung, "
                "mediastinal, bone), or window:number such as lung:2 (* for any window)"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return value if value is None or value.strip() else None


@dataclass(frozen=True)
class _Item:
    """One slice of one study to caption."""

    study: int  # index into the contexts
    slice: Any  # processor.steps.render.KeySlice
    key: str | None


class CaptionImages(Step):
    uses = "caption.image_to_text"
    summary = (
        "Describe the rendered key slices with a local image captioner (BLIP, BLIP-2 or a chat VLM "
        "folder under weights/); one batched generate call per study, captions cached by image, "
        "model, prompt and settings; every caption marked diagnostic: false."
    )
    Params = CaptionParams
    needs = (KEY_SLICES,)
    provides = (CAPTIONS,)
    device = "gpu"
    batched = True

    def __init__(self, params: CaptionParams, env: StepEnv) -> None:
        super().__init__(params, env)
        self.p = params
        self.folder = env.path(self.p.model)
        self._digests: dict[tuple[tuple[str, int, int], ...], str] = {}
        self._own_models: Any = None
        self._last: weakref.ref[cap.Captioner] | None = None

    @property
    def last_captioner(self) -> cap.Captioner | None:
        """The captioner this step used last, while the model cache keeps it (its ``stats``)."""
        return self._last() if self._last is not None else None

    # ------------------------------------------------------------------ compile time
    def weight_files(self) -> list[Path]:
        return cap.weight_files(self.folder)

    def check(self) -> list[str]:
        problems = []
        if self.p.dtype in ("bf16", "fp16") and not self.env.device.startswith("cuda"):
            problems.append(
                f"with.dtype (value: {self.p.dtype!r}): {self.p.dtype} needs CUDA and this daemon "
                f"runs on {self.env.device}. Fix: use dtype: auto or fp32."
            )
        if (self.folder / "config.json").exists():
            try:
                if cap.detect(self.folder).family == "blip-2":  # legacy or half-converted folders
                    problems += [
                        f"with.model (value: {self.p.model!r}): {p}"
                        for p in blip2_folder_problems(self.folder)
                    ]
            except (cap.UnsupportedModel, WeightsError) as exc:
                problems.append(f"with.model (value: {self.p.model!r}): {exc}")
        return problems

    # ------------------------------------------------------------------ run
    def run(self, ctx: StudyContext) -> None:
        self.caption_studies([ctx])

    def run_batch(self, ctxs: list[StudyContext]) -> None:
        self.caption_studies(ctxs)

    def caption_studies(self, contexts: list[StudyContext]) -> None:
        """Caption the selected key slices of several studies; their slices share generate calls."""
        started = time.perf_counter()
        try:
            info = cap.detect(self.folder)
        except cap.UnsupportedModel as exc:  # the folder changed since the pipeline was compiled
            raise WeightsError(str(exc)) from exc
        fingerprint = cap.folder_fingerprint(self.folder)
        folder_hash = self._folder_hash(fingerprint)
        prompt = cap.effective_prompt(info, self.p.prompt)
        prompt_hash = hashlib.sha256(prompt.encode()).hexdigest() if prompt is not None else None
        dtype_name = self._dtype_name()
        generation = cap.Generation(self.p.max_new_tokens, self.p.num_beams)
        cache: ContentCache | None = self.env.content_cache
        items = [
            _Item(
                index,
                key_slice,
                None
                if cache is None
                else self._cache_key(key_slice.image, folder_hash, prompt_hash, generation, dtype_name),
            )
            for index, ctx in enumerate(contexts)
            for key_slice in self._select(ctx)
        ]
        texts: dict[int, str] = {}
        for n, item in enumerate(items):
            hit = cache.get(item.key) if cache is not None and item.key is not None else None
            if hit is not None:
                texts[n] = hit
        cached = set(texts)
        calls: list[list[int]] = []
        todo = [n for n in range(len(items)) if n not in cached]
        if todo:
            captioner = self._captioner(info, fingerprint, dtype_name)
            texts.update(self._generate(captioner, items, todo, prompt, generation, calls))
        seconds = time.perf_counter() - started
        for index, ctx in enumerate(contexts):
            mine = [n for n, item in enumerate(items) if item.study == index]
            my_calls = [c for c in calls if any(items[n].study == index for n in c)]
            self._record(
                ctx,
                info,
                [(items[n].slice, texts[n], n in cached) for n in mine],
                {
                    "model": {
                        "name": info.name,
                        "path": self.p.model,
                        "family": info.family,
                        "architecture": info.architecture,
                        "language_model": info.language_model,
                        "folder_sha256": folder_hash,
                    },
                    "prompt": {
                        "text": prompt,
                        "sha256": prompt_hash,
                        "applied_as": _applied_as(info, prompt),
                    },
                    "generation": {**generation.kwargs(), "dtype": dtype_name},
                    "device": self.env.device,
                    "batching": {
                        "generate_calls": len(my_calls),
                        "images_per_call": [len(c) for c in my_calls],
                        "studies_in_batch": len(contexts),
                        "generated": len(set(mine) - cached),
                        "cache_hits": len(set(mine) & cached),
                        "content_cache": "on" if cache is not None else "off",
                    },
                    "seconds": round(seconds, 3),
                },
            )

    def _generate(
        self,
        captioner: cap.Captioner,
        items: list[_Item],
        todo: list[int],
        prompt: str | None,
        generation: cap.Generation,
        calls: list[list[int]],
    ) -> dict[int, str]:
        """Caption ``items[todo]`` in calls of up to batch_size images (halved on CUDA OOM); cache them."""
        from processor.models.cache import run_with_oom_backoff

        def generate(chunk: Sequence[int]) -> list[str]:
            out = captioner.caption([items[n].slice.image for n in chunk], prompt, generation)
            calls.append(list(chunk))
            return out

        texts = dict(zip(todo, run_with_oom_backoff(generate, todo, self.p.batch_size), strict=True))
        cache: ContentCache | None = self.env.content_cache
        for n, text in texts.items():
            item_key = items[n].key
            if cache is not None and item_key is not None:
                cache.put(item_key, text)
        return texts

    def _record(
        self,
        ctx: StudyContext,
        info: cap.ModelInfo,
        done: list[tuple[Any, str, bool]],
        method: dict[str, Any],
    ) -> None:
        folder = ctx.out_dir.name
        captions = [
            {
                "text": text,
                "model": info.name,
                "window": s.window,
                "slice_number": s.number,
                "slice_index": s.slice_index,
                "z_mm": s.z_mm,
                "image": f"{folder}/{s.path.name}",
                "diagnostic": False,
                "cached": hit,
            }
            for s, text, hit in done
        ]
        ctx.values.setdefault("captions", []).extend(captions)
        ctx.result.setdefault("captions", []).extend(captions)
        ctx.result.setdefault("captioning", []).append(
            {"step": self.uses, "step_id": self.step_id, "diagnostic": False, "notice": NOTICE, **method}
        )
        b = method["batching"]
        log.info(
            "caption.done study=%s images=%d generated=%d cache_hits=%d calls=%d model=%s",
            ctx.label,
            len(captions),
            b["generated"],
            b["cache_hits"],
            b["generate_calls"],
            info.name,
        )

    # ------------------------------------------------------------------ helpers
    def _select(self, ctx: StudyContext) -> list[Any]:
        slices = list(ctx.values["key_slices"])
        chosen = []
        for s in slices:
            for selector in self.p.images:
                match = _SELECTOR.match(selector)
                assert match is not None  # validated with the params
                window, number = match.group(1), match.group(2)
                if window in ("all", "*", s.window) and (number is None or int(number) == s.number):
                    chosen.append(s)
                    break
        if not chosen:
            have = sorted({f"{s.window}:{s.number}" for s in slices})
            ctx.warnings.append(
                f"caption: images {self.p.images} matched none of the rendered slices "
                f"({', '.join(have) or 'none'}); nothing was captioned"
            )
        return chosen

    def _dtype_name(self) -> str:
        """The load dtype; ``auto`` follows the model cache's precision (bf16 on CUDA, fp32 on CPU)."""
        explicit = DTYPES[self.p.dtype]
        if explicit is not None:
            return explicit
        if not self.env.device.startswith("cuda"):
            return "float32"
        autocast = getattr(self.env.models, "autocast_dtype", None)
        if autocast is not None:
            chosen = autocast()
            return "float32" if chosen is None else str(chosen).removeprefix("torch.")
        return "bfloat16"

    def _folder_hash(self, fingerprint: tuple[tuple[str, int, int], ...]) -> str:
        known = self._digests.get(fingerprint)
        if known is None:
            known = self._digests[fingerprint] = cap.folder_digest(self.folder, fingerprint)
        return known

    @staticmethod
    def _cache_key(
        image: np.ndarray,
        folder_hash: str,
        prompt_hash: str | None,
        generation: cap.Generation,
        dtype_name: str,
    ) -> str:
        pixels = np.ascontiguousarray(image)
        image_hash = hashlib.sha256(
            f"{pixels.dtype.str}{pixels.shape}".encode() + pixels.tobytes()
        ).hexdigest()
        parts = {
            "v": CACHE_KEY_VERSION,
            "image_sha256": image_hash,
            "model": folder_hash,
            "prompt_sha256": prompt_hash,
            "generation": generation.kwargs(),
            "dtype": dtype_name,
        }
        return "caption:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _captioner(self, info: cap.ModelInfo, fingerprint: tuple[Any, ...], dtype_name: str) -> cap.Captioner:
        import torch

        models = self.env.models
        if models is None:  # check-config, or a caller that made no cache: one resident model for this step
            if self._own_models is None:
                from processor.models.cache import ModelCache

                self._own_models = ModelCache(capacity=1, device=self.env.device)
            models = self._own_models
        dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
        key = (
            self.uses,
            str(self.folder),
            hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:16],
            dtype_name,
            self.env.device,
        )
        captioner: cap.Captioner = models.get(key, lambda: cap.load_captioner(info, self.env.device, dtype))
        self._last = weakref.ref(captioner)
        return captioner


def _applied_as(info: cap.ModelInfo, prompt: str | None) -> str:
    if info.family == "chat":
        return "user turn [image, prompt] rendered with the processor's chat template + generation prompt"
    if info.family == "blip":
        return "caption prefix continued by the decoder" if prompt else "unconditional caption"
    return "text after the query tokens" if prompt else "unconditional caption (query tokens only)"


def register(registry: StepRegistry) -> None:
    registry.register(CaptionImages)
