"""CT-CLIP steps: ``ctclip.zero_shot`` (CT-CLIP_v2 / CT_VocabFine_v2) and ``ctclip.classify`` (CT_LiPro_v2).

Both take the ``volume`` port, map it to CT-RATE's (X, Y, Z) array order
(:func:`ctrate_xyz_from_dicom`), apply the official v2 inference preprocessing
(:func:`preprocess_volume`), encode the image once with a model from the shared cache, and add
``result["models"][<step id>]``: kind, model file, sha256, licence, per-finding probabilities,
the preprocessing record, the saved latent's file (``save_latent``), and what ran: ``precision``
(the step's ``precision``: fp32 by default on every device, bf16/fp16 only as an explicit opt-in;
``models.precision`` never applies) and ``tf32`` (False on CUDA, where it is turned off; None on
the CPU). See docs/precision.md. They provide the ports
``ctclip_latent`` (the first CT-CLIP step's image latent, (dim_latent,) float32), ``features``
(``zs.<finding>`` / ``lipro.<finding>``) and ``scores`` (:mod:`processor.steps.ports`), and
``values["ctclip_latent.<step id>"]``.
CT-CLIP steps with the same ``target_xyz`` (zero-shot and LiPro, both 480×480×240 with the
released models) preprocess a volume once (~0.5 CPU-s): the first keeps the input in
``values["ctclip_inputs"]`` when the pipeline has a later CT-CLIP step of that size, and the last
such step takes it out, so the 221 MB are not held for the rest of the study.

Millimetres are never invented: when the volume's pixel spacing is unknown
(``volume.spacing_unknown``, or a spacing that is not a positive number) the step does not run
and is skipped with "pixel spacing unknown: <reason>" (a WithheldError: the study is Partial; the
model is not even loaded).
On an irregular slice grid (gaps, uneven steps; :class:`processor.dicom.grid.SliceGrid`) the
slice axis is resampled at its true positions (``preprocess_volume(positions=...)``) instead of a
uniform median step, and the step's own section says so: ``preprocessing.slice_grid`` and
``warnings: ["resampled from irregular slice positions: N gap(s), ..."]``. Regular grids take the
official path, bit for bit.

torch and transformers are imported when a model is first needed, so listing or compiling the
pipeline stays quick.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from processor.atomic import write_bytes_atomic
from processor.dicom.grid import SliceGrid
from processor.errors import ConfigError, WeightsError, WithheldError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StepEnv, StudyContext
from processor.safename import safe_name
from processor.steps.ports import (
    CTCLIP_LATENT,
    FEATURES,
    KIND_PREFIX,
    SCORES,
    VOLUME,
    ModelScores,
    add_features,
    add_scores,
    model_identity,
    set_latent,
)

if TYPE_CHECKING:
    import torch

    from processor.models.cache import ModelCache
    from processor.models.ctclip import CTClip

log = logging.getLogger(__name__)

LICENCE = "CC-BY-NC-SA-4.0 (non-commercial)"
DEFAULT_VOCAB = "weights/ct_clip/vocab.txt"
OFFICIAL_TARGET_XYZ = (480, 480, 240)
DICOM_AXES = ("slice", "row", "column")


class FindingPrompt(Params):
    """A finding with its own prompt pair (instead of "{name} is present." / "... is not present.")."""

    name: str = Field(min_length=1)
    present: str = Field(min_length=1)
    absent: str = Field(min_length=1)


class CTClipParams(Params):
    checkpoint: str = Field(description="CT-CLIP v2 .pt file (CT_VocabFine_v2.pt or CT-CLIP_v2.pt)")
    vocab: str = Field(DEFAULT_VOCAB, description="CXR-BERT vocab.txt (30522 entries)")
    config: str | None = Field(None, description="architecture JSON for non-official models; omit for v2")
    target_xyz: tuple[int, int, int] = Field(OFFICIAL_TARGET_XYZ, description="model input size (X, Y, Z)")
    save_latent: bool = Field(False, description="write the image latent as .npy next to the JSON")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32 (default, every device: the official numbers) or an opt-in bf16/fp16 autocast "
        "(faster on CUDA; moves probabilities, see docs/precision.md); fp16 needs CUDA",
    )

    @field_validator("target_xyz")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 1:
            raise ValueError("every target_xyz size must be at least 1")
        return value


class ZeroShotParams(CTClipParams):
    checkpoint: str = Field(
        "weights/ct_clip/CT_VocabFine_v2.pt",
        description="CT-CLIP v2 .pt file (CT_VocabFine_v2.pt or CT-CLIP_v2.pt)",
    )
    findings: list[str | FindingPrompt] | None = Field(
        None, description="finding names or {name, present, absent}; default: the 18 CT-RATE findings"
    )
    batch_size: int = Field(
        8, ge=1, le=1024, description="prompts per text-encoder micro-batch (halved on OOM)"
    )


class ClassifyParams(CTClipParams):
    checkpoint: str = Field("weights/ct_clip/CT_LiPro_v2.pt", description="CT_LiPro_v2.pt")


class _CTClipStep(Step):
    """Shared loading, preprocessing and result writing of the CT-CLIP steps."""

    kind = ""
    needs = (VOLUME,)
    provides = (CTCLIP_LATENT, FEATURES, SCORES)
    device = "gpu"

    shares_input = False  # a later CT-CLIP step of the pipeline takes the same input (set by link)

    def __init__(self, params: Params, env: StepEnv) -> None:
        super().__init__(params, env)
        self._own_cache: ModelCache | None = None

    @property
    def p(self) -> CTClipParams:
        return self.params  # type: ignore[return-value]

    @property
    def sid(self) -> str:
        return self.step_id or self.uses

    def _paths(self) -> tuple[Path, Path, Path | None]:
        config = self.env.path(self.p.config) if self.p.config else None
        return self.env.path(self.p.checkpoint), self.env.path(self.p.vocab), config

    def weight_files(self) -> list[Path]:
        checkpoint, vocab, config = self._paths()
        return [checkpoint, vocab, *([config] if config else [])]

    def check(self) -> list[str]:
        from processor.models.ctclip_config import load_config

        problems = []
        if self.p.precision == "fp16" and not self.env.device.startswith("cuda"):
            problems.append(
                f"with.precision (value: 'fp16'): fp16 autocast needs CUDA and this daemon runs on "
                f"{self.env.device}. Fix: remove the key (fp32, the official numbers) or use bf16."
            )
        _, _, config = self._paths()
        if config is not None and not config.is_file():
            return problems  # a missing config is reported as missing weights when a study runs
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            return [*problems, f"with.config: {exc}"]
        x, y, z = self.p.target_xyz
        side, frames = cfg.ctvit.image_size, cfg.ctvit.temporal_patch_size
        if (x, y) != (side, side):
            problems.append(
                f"with.target_xyz (value: {list(self.p.target_xyz)}): this model takes "
                f"{side}x{side} images. Fix: use target_xyz [{side}, {side}, {z}]"
                + (" (the released v2 models: [480, 480, 240])." if config is None else ".")
            )
        if z % frames:
            problems.append(
                f"with.target_xyz (value: {list(self.p.target_xyz)}): Z must be a multiple of "
                f"the temporal patch size {frames}. Fix: e.g. {max(frames, z // frames * frames)}."
            )
        return problems + self._vocab_problems()

    def _vocab_problems(self) -> list[str]:
        """The vocabulary's layout, and its sha256 where the manifest pins one. Absent files and a size
        that does not fit the model are reported when the model loads (``weights`` still lists them)."""
        from processor.models.cache import sha256_file
        from processor.models.ctclip_vocab import check_vocab, sha256_problem

        _, vocab, _ = self._paths()
        if not vocab.is_file():
            return []
        try:
            problems = check_vocab(vocab)
        except WeightsError as exc:
            problems = [str(exc)]
        pinned = self.env.pinned_sha256.get(vocab.resolve())
        mismatch = sha256_problem(vocab, sha256_file(vocab), pinned) if pinned else None
        return [f"with.vocab (value: {self.p.vocab!r}): {p}" for p in [*problems, *filter(None, [mismatch])]]

    # ---------------------------------------------------------------- model
    def _cache(self) -> ModelCache:
        if self.env.models is not None:
            return self.env.models  # type: ignore[no-any-return]
        if self._own_cache is None:  # StepEnv built without the shared cache (e.g. a script)
            from processor.models.cache import ModelCache

            self._own_cache = ModelCache(1, self.env.device)
        return self._own_cache

    def model(self) -> CTClip:
        from processor.models.ctclip import load_ctclip
        from processor.models.ctclip_vocab import sha256_problem
        from processor.models.device import precision_dtype

        checkpoint, vocab, config = self._paths()
        cache = self._cache()
        amp = precision_dtype(self.p.precision)  # CT-CLIP's own setting; models.precision never applies
        key = (
            "ctclip",
            str(checkpoint),
            str(vocab),
            str(config) if config else None,
            self.env.device,
            self.p.precision,
        )

        def load() -> CTClip:
            pinned = self.env.pinned_sha256.get(vocab.resolve())
            mismatch = sha256_problem(vocab, cache.digest(vocab), pinned) if pinned else None
            if mismatch:
                raise WeightsError(mismatch)
            model = load_ctclip(checkpoint, vocab, config, self.env.device, autocast_dtype=amp)
            log.warning(
                "ctclip.licence file=%s licence=%r: the CT-CLIP weights (CT-RATE release) may be "
                "used for non-commercial purposes only",
                checkpoint.name,
                LICENCE,
            )
            return model

        return cache.get(key, load)

    # ---------------------------------------------------------------- study
    def _input(self, ctx: StudyContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """The preprocessed CT-CLIP input and its record, computed once per study and target size."""
        inputs = ctx.values.setdefault("ctclip_inputs", {})
        key = tuple(self.p.target_xyz)
        found = inputs.get(key) if self.shares_input else inputs.pop(key, None)
        if found is None:
            found = self._preprocess(ctx)
            log.info("ctclip.preprocessed step=%s target_xyz=%s", self.sid, "x".join(map(str, key)))
            if self.shares_input:
                inputs[key] = found
        return found

    def prepare(self, ctx: StudyContext) -> None:
        """The preprocessed input (float64 resampling, ~1 CPU-s a study) in the CPU stage; the step's
        run takes it from ``ctclip_inputs`` as if it had computed it (:meth:`_input`)."""
        _require_spacing(ctx.values[VOLUME.name])
        inputs = ctx.values.setdefault("ctclip_inputs", {})
        key = tuple(self.p.target_xyz)
        if key not in inputs:
            inputs[key] = self._preprocess(ctx)
            log.info("ctclip.preprocessed step=%s target_xyz=%s stage=cpu", self.sid, "x".join(map(str, key)))

    def link(self, later: Sequence[Step]) -> None:
        self.shares_input = any(
            isinstance(s, _CTClipStep) and tuple(s.p.target_xyz) == tuple(self.p.target_xyz) for s in later
        )

    def output_sha256(self, output: str) -> str | None:
        """The checkpoint's sha256 for the latent and this step's features (compile-time binding)."""
        checkpoint = self._paths()[0]
        if output not in (CTCLIP_LATENT.name, KIND_PREFIX[self.kind]) or not checkpoint.is_file():
            return None
        return model_identity(self._cache().digest(checkpoint), self.p.precision)

    def _preprocess(self, ctx: StudyContext) -> tuple[torch.Tensor, dict[str, Any]]:
        from processor.models.ctclip_preprocess import (
            HU_MAX,
            HU_MIN,
            PAD_VALUE,
            TARGET_SPACING_ZXY,
            _axis_plan,
            ctrate_slice_positions,
            ctrate_xyz_from_dicom,
            planned_shape_zxy,
            preprocess_volume,
        )

        volume = ctx.values[VOLUME.name]
        hu_xyz, spacing_xyz = ctrate_xyz_from_dicom(volume.hu, volume.spacing_zyx, volume.affine)
        grid = SliceGrid.of(volume.positions_mm)
        positions: tuple[int, Sequence[float]] | None = None
        if grid.irregular:
            axis, where = ctrate_slice_positions(volume.positions_mm, volume.affine)
            positions = (axis, where.tolist())
        tensor = preprocess_volume(hu_xyz, spacing_xyz, self.p.target_xyz, positions=positions)
        order, flips = _axis_plan(np.asarray(volume.affine, dtype=np.float64)[:3, :3][:, [2, 1, 0]])
        record: dict[str, Any] = {
            "method": "CT-CLIP v2 inference preprocessing (official data_inference_nii.py)",
            "orientation": {
                "from": "DICOM volume [slice, row, column]",
                "to": "CT-RATE NIfTI array (X, Y, Z) = (patient left, posterior, superior)",
                "axes": {
                    out: {"from": DICOM_AXES[src], "flipped": flip}
                    for out, src, flip in zip("XYZ", order, flips, strict=True)
                },
            },
            "input_shape_xyz": list(hu_xyz.shape),
            "input_spacing_xyz_mm": [round(s, 6) for s in spacing_xyz],
            "hu_clip": [HU_MIN, HU_MAX],
            "clip": "before resampling",
            "target_spacing_zxy_mm": list(TARGET_SPACING_ZXY),
            "resampling": "trilinear, float64, align_corners=False, int()-truncated sizes",
            "slice_positions": (
                "true positions (irregular grid): linear along the slice axis at the target "
                "positions, then trilinear in-plane"
                if positions is not None
                else "uniform median step (regular grid)"
            ),
            "slice_grid": {**grid.as_dict(), "note": grid.note("resampled from") if grid.irregular else None},
            "resampled_shape_zxy": list(planned_shape_zxy(hu_xyz.shape, spacing_xyz, positions)),
            "scale": "HU / 1000",
            "crop_pad": "centre crop, centre pad with -1",
            "pad_value": PAD_VALUE,
            "target_xyz": list(self.p.target_xyz),
            "model_input_zxy": list(tensor.shape[1:]),
        }
        return tensor, record

    def run(self, ctx: StudyContext) -> None:
        from processor.models.device import exact_float32

        _require_spacing(ctx.values[VOLUME.name])
        model = self.model()
        tf32 = exact_float32(model.device)  # re-asserted per study: the flags are process-wide
        checkpoint, vocab, config = self._paths()
        tensor, preprocessing = self._input(ctx)
        latent_t = model.encode_image(tensor)
        probabilities = self.probabilities(model, latent_t)
        latent = latent_t[0].detach().cpu().numpy().astype(np.float32)
        cache = self._cache()
        checkpoint_sha = cache.digest(checkpoint)  # in the result and with each output (provenance)
        entry: dict[str, Any] = {
            "kind": self.kind,
            "model": checkpoint.name,
            "sha256": checkpoint_sha,
            "vocab": vocab.name,
            "vocab_sha256": cache.digest(vocab),
            "config": config.name if config else None,
            "licence": LICENCE,
            "device": str(model.device),
            "precision": self.p.precision,
            "tf32": tf32,
            "probabilities": probabilities,
            "preprocessing": preprocessing,
            "latent_dim": int(latent.shape[0]),
            "latent_file": self._save_latent(ctx, latent) if self.p.save_latent else None,
            "warnings": _grid_warnings(preprocessing),
        }
        ctx.result.setdefault("models", {})[self.sid] = entry
        identity = model_identity(checkpoint_sha, self.p.precision)  # what fits bind to
        set_latent(ctx, latent, identity)
        ctx.values[f"ctclip_latent.{self.sid}"] = latent
        prefix = KIND_PREFIX[self.kind]
        add_features(
            ctx,
            {f"{prefix}.{finding}": p for finding, p in probabilities.items()},
            model_sha256=identity,
        )
        add_scores(ctx, ModelScores(self.sid, prefix, probabilities))
        top = max(probabilities, key=probabilities.__getitem__)
        log.info(
            "ctclip.done study=%s step=%s kind=%s findings=%d top=%r p=%.3f",
            ctx.label,
            self.sid,
            self.kind,
            len(probabilities),
            top,
            probabilities[top],
        )

    def probabilities(self, model: CTClip, latent: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def _save_latent(self, ctx: StudyContext, latent: np.ndarray) -> str:
        name = f"ctclip_latent_{safe_name(self.sid)}.npy"
        buffer = io.BytesIO()
        np.save(buffer, latent)
        write_bytes_atomic(ctx.out_dir / name, buffer.getvalue())
        return f"{ctx.out_dir.name}/{name}"


def _require_spacing(volume: Any) -> None:
    """WithheldError unless every voxel spacing is known: the model input is resampled to mm."""
    reason = volume.spacing_unknown
    if reason is None and not all(math.isfinite(float(v)) and float(v) > 0 for v in volume.spacing_zyx):
        reason = f"voxel spacing (z, y, x) {tuple(float(v) for v in volume.spacing_zyx)} mm is not positive"
    if reason is not None:
        reason = reason.removeprefix("pixel spacing unknown: ")
        raise WithheldError(
            f"pixel spacing unknown: {reason}. CT-CLIP resamples the volume to 1.5 x 0.75 x 0.75 mm "
            "and a guessed spacing would give wrong numbers, so this step did not run. Fix: export "
            "the series with PixelSpacing (0028,0030) and ImagePositionPatient on every slice."
        )


def _grid_warnings(preprocessing: dict[str, Any]) -> list[str]:
    """The irregular-grid note, repeated where a consumer of this model's section reads it."""
    note = preprocessing["slice_grid"]["note"]
    return [note] if note else []


class ZeroShot(_CTClipStep):
    uses = "ctclip.zero_shot"
    summary = (
        "CT-CLIP v2 zero-shot: probability of each CT-RATE finding (or custom prompts) from the "
        '"is present" / "is not present" prompt pair; the image latent for later steps.'
    )
    Params = ZeroShotParams
    kind = "ctclip_zero_shot"

    def check(self) -> list[str]:
        params: ZeroShotParams = self.params  # type: ignore[assignment]
        names = [f if isinstance(f, str) else f.name for f in params.findings or []]
        twice = sorted({n for n in names if names.count(n) > 1})
        problems = (
            [f"with.findings (value: {twice}): listed twice. Fix: name each finding once."] if twice else []
        )
        if params.findings == []:
            problems.append("with.findings: empty. Fix: remove the key for the 18 CT-RATE findings.")
        return problems + super().check()

    def _findings(self) -> list[tuple[str, str, str]]:
        from processor.models.ctclip import ABSENT_TEMPLATE, CTRATE_FINDINGS, PRESENT_TEMPLATE

        params: ZeroShotParams = self.params  # type: ignore[assignment]
        out = []
        for item in params.findings if params.findings is not None else CTRATE_FINDINGS:
            if isinstance(item, str):
                out.append((item, PRESENT_TEMPLATE.format(item), ABSENT_TEMPLATE.format(item)))
            else:
                out.append((item.name, item.present, item.absent))
        return out

    def probabilities(self, model: CTClip, latent: torch.Tensor) -> dict[str, float]:
        import torch

        from processor.models.cache import run_with_oom_backoff

        params: ZeroShotParams = self.params  # type: ignore[assignment]
        items = self._findings()
        prompts = list(dict.fromkeys([p for _, p, _ in items] + [a for _, _, a in items]))
        # fills the model's per-prompt cache in micro-batches; later studies hit the cache
        run_with_oom_backoff(lambda chunk: list(model.text_latents(chunk)), prompts, params.batch_size)
        present = model.text_latents([p for _, p, _ in items])
        absent = model.text_latents([a for _, _, a in items])
        # the same arithmetic as CTClip.zero_shot_logits, on the latent already encoded
        with torch.inference_mode():
            scale = model.temperature.float().exp()
            pair = torch.stack((latent @ present.t(), latent @ absent.t()), dim=-1) * scale
            probs = pair.softmax(dim=-1)[0, :, 0]
        return {name: float(p) for (name, _, _), p in zip(items, probs.tolist(), strict=True)}


class Classify(_CTClipStep):
    uses = "ctclip.classify"
    summary = (
        "CT-LiPro (CT_LiPro_v2): supervised linear-probe probabilities of the 18 CT-RATE findings "
        "from the CT-CLIP image latent."
    )
    Params = ClassifyParams
    kind = "ctclip_lipro"

    def probabilities(self, model: CTClip, latent: torch.Tensor) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        from processor.models.ctclip import CTRATE_FINDINGS

        if model.classifier is None:
            raise WeightsError(
                f"{Path(self.p.checkpoint).name} is not a CT-LiPro checkpoint (no classifier.* "
                "keys). Fix: point ctclip.classify at CT_LiPro_v2.pt, or use ctclip.zero_shot "
                "for CT-CLIP_v2.pt / CT_VocabFine_v2.pt."
            )
        # the same arithmetic as CTClip.classify, on the latent already encoded
        with torch.inference_mode():
            probs = torch.sigmoid(model.classifier(F.relu(latent)))[0]
        if probs.shape[0] != len(CTRATE_FINDINGS):
            raise WeightsError(
                f"the CT-LiPro head has {probs.shape[0]} outputs, expected "
                f"{len(CTRATE_FINDINGS)} (the CT-RATE findings)."
            )
        return {name: float(p) for name, p in zip(CTRATE_FINDINGS, probs.tolist(), strict=True)}


def register(registry: StepRegistry) -> None:
    registry.register(ZeroShot)
    registry.register(Classify)
