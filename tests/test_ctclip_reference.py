"""CT-CLIP v2 reimplementation against fixtures produced by the official code.

Fixtures: tests/fixtures/ct_clip (see SOURCE.md), computed by the official code on one CPU.
float32 kernels sum in a different order on each instruction set (AVX-512, AVX2, NEON, scalar),
and fused attention (SDPA) differently again, so the comparisons allow that rounding and no more:

* final outputs (probabilities, logits, latents): absolute ``ATOL`` 1e-5. Worst measured across
  AVX-512, AVX2 and scalar kernels (``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` /
  ``MKL_ENABLE_INSTRUCTIONS``, 1 and 2 threads): 6.0e-7 on probabilities, 2.4e-6 on logits
  (|logit| up to 6.8), 2.4e-7 on the image latent. A real bug moves them by 1e-3 or more.
* intermediate activations: ``|Δ| ≤ RTOL·|golden| + SCALE·max|golden|`` (rtol 1e-4, plus 1e-5 of
  the tensor's largest magnitude). Worst measured: 1.43e-5 absolute on ``temporal_out``
  (|x| up to 4.5, i.e. 3.2e-6 of its scale; scalar kernels with SDPA), 1.08e-5 reported on an
  AVX2-only CPU — above a flat 1e-5, well inside 4.5e-5.
* VQ indices: exact. A code flips only if rounding moves a cosine across the gap to the
  runner-up code; that gap is at least 4.4e-3 here, while the worst error the activation
  tolerance allows moves it by at most 2.2e-3 (the worst measured, by 6e-5):
  ``test_vq_codes_are_stable_under_cpu_rounding``. The codebook rows (``tokens``) and everything
  after them are then exact up to the final outputs' rounding.
* preprocessing: absolute 1e-6 (float64 arithmetic cast to float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from processor.errors import ConfigError, WeightsError
from processor.models.ctclip import (
    CTRATE_FINDINGS,
    CTClip,
    CTClipConfig,
    build_tokenizer,
    ctrate_xyz_from_dicom,
    inspect_checkpoint,
    load_ctclip,
    preprocess_volume,
)
from processor.models.device import resolve_device

FIX = Path(__file__).parent / "fixtures" / "ct_clip"
ATOL = 1e-5  # final outputs, absolute (see the module docstring for the measured figures)
RTOL, SCALE = 1e-4, 1e-5  # intermediate activations: RTOL·|golden| + SCALE·max|golden|
PROMPTS = [t.format(f) for f in CTRATE_FINDINGS for t in ("{} is present.", "{} is not present.")]


def _json(name: str) -> Any:
    return json.loads((FIX / name).read_text(encoding="utf-8"))


def _npy(name: str) -> np.ndarray:
    return np.load(FIX / name)


def _load_small(name: str = "small_ctclip.pt", **kwargs: Any) -> CTClip:
    return load_ctclip(FIX / name, FIX / "vocab.txt", FIX / "small_config.json", **kwargs)


def _close(actual: torch.Tensor, golden: np.ndarray, atol: float = ATOL) -> float:
    """A final output (or preprocessing) within an absolute tolerance; returns the largest error."""
    diff = float(np.abs(actual.detach().cpu().numpy() - golden).max())
    assert actual.shape == golden.shape
    assert diff <= atol, diff
    return diff


def _close_activation(actual: torch.Tensor, golden: np.ndarray) -> float:
    """An intermediate activation within CPU rounding: RTOL·|golden| + SCALE·max|golden|."""
    got = actual.detach().cpu().numpy()
    assert got.shape == golden.shape
    allowed = RTOL * np.abs(golden) + SCALE * float(np.abs(golden).max())
    excess = np.abs(got - golden) - allowed
    assert float(excess.max()) <= 0, f"{float(np.abs(got - golden).max()):.3g} beyond CPU rounding"
    return float(np.abs(got - golden).max())


@pytest.fixture(scope="module")
def small() -> CTClip:
    return _load_small()


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.from_numpy(_npy("e2e_preprocessed_1x24x32x32_float32.npy"))


# ---------------------------------------------------------------- loading and text
def test_small_loads_strict_eval_frozen(small: CTClip) -> None:
    assert len(small.tokenizer) == 128
    assert not small.training
    assert all(not p.requires_grad for p in small.parameters())
    names = [k for k in small.state_dict() if k != "text_transformer.embeddings.position_ids"]
    manifest = [e["key"] for e in _json("small_manifest.json")["keys"]]
    assert names == [k for k in manifest if k != "text_transformer.embeddings.position_ids"]
    assert not small.is_lipro


def test_tokenized_prompts_match_official(small: CTClip) -> None:
    for entry in _json("small_golden_tokenized_prompts.json"):
        name = entry["pathology"]
        pair = [f"{name} is present.", f"{name} is not present."]
        ids = small.tokenizer(pair)["input_ids"]
        assert ids == entry["input_ids_unpadded"], name
        padded = small._tokenize(pair)
        assert padded["input_ids"].shape == (2, 64)
        assert padded["attention_mask"].sum(1).tolist() == [len(x) for x in ids]


def test_text_cls_and_latents(small: CTClip) -> None:
    _close_activation(small.text_cls_hidden(PROMPTS), _npy("small_golden_text_cls_hidden_36x32.npy"))
    _close(small.encode_text(PROMPTS), _npy("small_golden_text_latents_36x16.npy"))


# ---------------------------------------------------------------- image side
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "sdpa"])
def test_image_intermediates(volume: torch.Tensor, fused: bool) -> None:
    model = _load_small(fused_attention=fused)
    inter = model.image_intermediates(volume)
    _close_activation(inter["patch_emb"], _npy("small_golden_patch_emb_1x6x4x4x48.npy"))
    _close_activation(inter["spatial_out"], _npy("small_golden_spatial_out_6x16x48.npy"))
    # the largest CPU-dependent error: 1.43e-5 with scalar kernels, 1.08e-5 on an AVX2-only CPU
    _close_activation(inter["temporal_out"], _npy("small_golden_temporal_out_16x6x48.npy"))
    assert np.array_equal(inter["vq_indices"].numpy(), _npy("small_golden_vq_indices_1x96.npy"))
    # the rows of the codes chosen: exact once the codes are (checked above)
    _close(inter["tokens"], _npy("small_golden_enc_image_tokens_1x6x4x4x48.npy"))
    _close(model.encode_image(volume), _npy("small_golden_image_latent_1x16.npy"))


def test_vq_codes_are_stable_under_cpu_rounding(small: CTClip) -> None:
    """The exact-index check above is sound: no error the activation tolerance allows can flip a code.

    A token's code is the codebook row of highest cosine. Moving the token x by δ moves its unit
    vector by at most 2·|δ|/|x|, so the gap between two cosines by at most 4·|δ|/|x|; |δ| is at
    most √d times the elementwise tolerance. The smallest best-to-runner-up gap (4.4e-3) must
    exceed that worst case (2.2e-3 at the tolerance; 6e-5 at the worst error measured, 1.43e-5).
    """
    golden = torch.from_numpy(_npy("small_golden_temporal_out_16x6x48.npy"))  # ((b h w), t, d)
    d = golden.shape[-1]
    tokens = golden.reshape(-1, d)
    embed = small.visual_transformer.vq._codebook.embed[0]
    unit = torch.nn.functional.normalize
    best, runner_up = (unit(tokens, dim=-1) @ unit(embed, dim=-1).t()).topk(2, dim=-1).values.unbind(-1)
    gap = float((best - runner_up).min())
    scale = float(golden.abs().max())
    delta = d**0.5 * (RTOL * scale + SCALE * scale)  # largest token error _close_activation allows
    worst_shift = 4 * delta / float(tokens.norm(dim=-1).min())
    assert gap > worst_shift, (gap, worst_shift)


def test_position_bias_golden_and_cache(small: CTClip) -> None:
    cpb = small.visual_transformer.spatial_rel_pos_bias
    with torch.inference_mode():
        first = cpb(4, 4)
        second = cpb(4, 4)
    assert first is second
    _close_activation(first, _npy("small_golden_cpb_bias_4x16x16.npy"))
    with torch.no_grad():
        fresh = cpb._compute(4, 4, torch.device("cpu"))
    assert torch.equal(fresh, first)
    cpb.load_state_dict(cpb.state_dict())
    assert not cpb._cache


# ---------------------------------------------------------------- heads
def test_zero_shot_matches_official(volume: torch.Tensor) -> None:
    model = _load_small()
    golden = _json("small_golden_zeroshot.json")
    assert list(CTRATE_FINDINGS) == golden["pathologies"]
    logits = model.zero_shot_logits(volume)
    probs = model.zero_shot(volume)
    want_logits = np.array([p["logits_present_notpresent"] for p in golden["per_pathology"]])
    _close(logits, want_logits[None])
    _close(probs, np.array([[p["prob_present"] for p in golden["per_pathology"]]]))
    assert float(model.temperature.exp()) == pytest.approx(golden["logit_scale_exp_temperature"])


def test_zero_shot_encodes_once_and_caches_text(volume: torch.Tensor) -> None:
    model = _load_small()
    calls = {"image": 0, "text": 0}
    model.visual_transformer.register_forward_hook(lambda *_: calls.__setitem__("image", calls["image"] + 1))
    model.text_transformer.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    first = model.zero_shot(volume)
    assert calls["image"] == 1 and calls["text"] >= 1
    text_calls = calls["text"]
    second = model.zero_shot(volume)
    assert calls == {"image": 2, "text": text_calls}  # all 36 prompts came from the cache
    assert torch.equal(first, second)
    assert len(model._text_cache) == 36


def test_zero_shot_custom_findings(small: CTClip, volume: torch.Tensor) -> None:
    golden = {p["pathology"]: p["prob_present"] for p in _json("small_golden_zeroshot.json")["per_pathology"]}
    probs = small.zero_shot(volume, ["Emphysema", "Cardiomegaly"])
    _close(probs, np.array([[golden["Emphysema"], golden["Cardiomegaly"]]]))
    # the same numbers computed with other matrix shapes (1 finding instead of 2, a batch of 2): the
    # summation order may change with the shape on some CPUs (1.2e-7 with scalar kernels), so 1e-6
    same = {"rtol": 0.0, "atol": 1e-6}
    custom = small.zero_shot(volume, [("Emphysema", "Emphysema is present.", "Emphysema is not present.")])
    torch.testing.assert_close(custom, probs[:, :1], **same)
    swapped = small.zero_shot(volume, [("x", "Emphysema is not present.", "Emphysema is present.")])
    assert float(swapped[0, 0]) == pytest.approx(1 - golden["Emphysema"], abs=ATOL)
    batch = small.zero_shot(torch.cat([volume[None], volume[None]]), ["Emphysema"])
    assert batch.shape == (2, 1)
    torch.testing.assert_close(batch[0], batch[1], **same)


def test_bfloat16_autocast_returns_float32(volume: torch.Tensor) -> None:
    model = _load_small("small_lipro.pt", autocast_dtype=torch.bfloat16)
    assert model.autocast_dtype is torch.bfloat16
    probs = model.zero_shot(volume)
    golden = np.array([[p["prob_present"] for p in _json("small_golden_zeroshot.json")["per_pathology"]]])
    assert probs.dtype == torch.float32 and model.classify(volume).dtype == torch.float32
    assert float(np.abs(probs.numpy() - golden).max()) < 0.1  # bf16 is approximate, not exact


def test_lipro_classify(volume: torch.Tensor) -> None:
    model = _load_small("small_lipro.pt")
    expected = _json("small_lipro_expected.json")
    assert model.is_lipro
    _close(model.classify_logits(volume), np.array([expected["logits"]], dtype=np.float32))
    _close(model.classify(volume), np.array([expected["sigmoid_probs"]], dtype=np.float32))
    _close(torch.relu(model.encode_image(volume)), np.array([expected["relu_image_latent"]]))


def test_classify_needs_lipro(small: CTClip, volume: torch.Tensor) -> None:
    with pytest.raises(WeightsError, match="CT_LiPro_v2.pt"):
        small.classify(volume)


# ---------------------------------------------------------------- errors
def test_v1_checkpoint_refused_without_allocating(tmp_path: Path) -> None:
    fake = tmp_path / "CT_CLIP_zeroshot.pt"
    # zero-stride view: the file stores one float, its tensor claims [512, 2097152]
    weight = torch.zeros((), dtype=torch.float32).expand(512, 2097152)
    torch.save({"temperature": torch.tensor(1.0), "to_visual_latent.weight": weight}, fake)
    assert fake.stat().st_size < 100_000
    with pytest.raises(WeightsError, match=r"v1.*CT-CLIP_v2\.pt"):
        inspect_checkpoint(fake)
    with pytest.raises(WeightsError, match="v1"):
        load_ctclip(fake, FIX / "vocab.txt", FIX / "small_config.json")
    lipro = tmp_path / "CT_LiPro.pt"
    torch.save({"trained_model.to_visual_latent.weight": weight, "classifier.bias": torch.zeros(18)}, lipro)
    with pytest.raises(WeightsError, match="v1"):
        inspect_checkpoint(lipro)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "CT-CLIP_v2.pt"
    with pytest.raises(WeightsError, match=str(missing)):
        load_ctclip(missing, FIX / "vocab.txt", FIX / "small_config.json")
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes((FIX / "small_ctclip.pt").read_bytes()[:5000])
    with pytest.raises(WeightsError, match="corrupt"):
        load_ctclip(corrupt, FIX / "vocab.txt", FIX / "small_config.json")
    with pytest.raises(WeightsError, match="vocab"):
        load_ctclip(FIX / "small_ctclip.pt", tmp_path / "vocab.txt", FIX / "small_config.json")
    with pytest.raises(WeightsError, match="does not match"):
        load_ctclip(FIX / "small_lipro.pt", FIX / "vocab.txt", _bad_config(tmp_path))


def _bad_config(tmp_path: Path) -> Path:
    raw = _json("small_config.json")
    raw["ctclip"]["dim_latent"] = 8
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError):
        load_ctclip(FIX / "small_ctclip.pt", FIX / "vocab.txt", FIX / "small_config.json", device="cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not understood"):
        resolve_device("gpu")


# ---------------------------------------------------------------- full architecture
@pytest.fixture(scope="module")
def full_meta() -> CTClip:
    with torch.device("meta"):
        model = CTClip(CTClipConfig.official(), build_tokenizer(FIX / "vocab.txt"))
    return model.place(torch.device("meta"), None)


def test_full_architecture_matches_manifest(full_meta: CTClip) -> None:
    manifest = _json("full_manifest.json")
    state = full_meta.state_dict(keep_vars=True)
    params = dict(full_meta.named_parameters())
    legacy = "text_transformer.embeddings.position_ids"
    entries = [e for e in manifest["keys"] if e["key"] != legacy]
    assert list(state) == [e["key"] for e in entries]
    for entry in entries:
        tensor = state[entry["key"]]
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert str(tensor.dtype) == f"torch.{entry['dtype']}", entry["key"]
        assert (entry["kind"] == "parameter") == (entry["key"] in params), entry["key"]
    assert sum(p.numel() for p in full_meta.parameters()) == manifest["n_parameters_trainable_and_frozen"]
    legacy_numel = 512
    assert sum(t.numel() for t in state.values()) + legacy_numel == manifest["n_state_dict_elements"]
    assert manifest["n_keys"] == len(state) + 1


@pytest.mark.parametrize("batch", [1, 4])
def test_full_shapes_on_meta(full_meta: CTClip, batch: int) -> None:
    volume = torch.empty(batch, 1, 240, 480, 480, device="meta")
    assert full_meta.encode_image_tokens(volume).shape == (batch, 24, 24, 24, 512)
    assert full_meta.encode_image(volume).shape == (batch, 512)


# ---------------------------------------------------------------- preprocessing
def test_preprocess_e2e() -> None:
    out = preprocess_volume(_npy("e2e_input_hu_xyz_int16.npy"), (1.6, 1.6, 1.2), (32, 32, 24))
    assert out.dtype == torch.float32
    _close(out, _npy("e2e_preprocessed_1x24x32x32_float32.npy"), atol=1e-6)


@pytest.mark.parametrize(
    ("after", "golden"),
    [
        (False, "preproc_small_output_1x24x32x48_float32.npy"),
        (True, "preproc_small_output_TRAINVARIANT_clip_after_resize_1x24x32x48_float32.npy"),
    ],
)
def test_preprocess_small_slope_intercept(after: bool, golden: str) -> None:
    stored = _npy("preproc_small_input_stored_xyz_int16.npy")
    out = preprocess_volume(
        stored, (0.6, 0.6, 2.5), (32, 48, 24), clip_after_resample=after, slope=2.0, intercept=-1500.0
    )
    _close(out, _npy(golden), atol=1e-6)


@pytest.mark.slow
def test_preprocess_full_official_case() -> None:
    meta = _json("preproc_meta.json")["preproc_full"]
    i = np.arange(640, dtype=np.int64)[:, None, None]
    j = np.arange(512, dtype=np.int64)[None, :, None]
    k = np.arange(160, dtype=np.int64)[None, None, :]
    stored = ((i * 37 + j * 91 + k * 53 + ((i * j * k) % 97) * 13) % 2800).astype(np.int16)
    out = preprocess_volume(stored, (0.6, 0.6, 2.5), intercept=-1024.0).numpy()
    stats = meta["output"]
    assert list(out.shape) == stats["shape"]
    _close(torch.from_numpy(out[0, 120]), _npy("preproc_full_slice_z120_480x480_float32.npy"), 1e-6)
    _close(torch.from_numpy(out[0, :, 240]), _npy("preproc_full_slice_h240_240x480_float32.npy"), 1e-6)
    _close(torch.from_numpy(out[0, :, :, 240]), _npy("preproc_full_slice_w240_240x480_float32.npy"), 1e-6)
    _close(
        torch.from_numpy(out[0, ::8, ::8, ::8]),
        _npy("preproc_full_subsample_step8_30x60x60_float32.npy"),
        1e-6,
    )
    as64 = out.astype(np.float64)
    assert as64.sum() == pytest.approx(stats["sum_float64"], abs=1.0)
    assert as64.mean() == pytest.approx(stats["mean_float64"], abs=1e-7)
    assert as64.std() == pytest.approx(stats["std_float64"], abs=1e-7)
    assert int((out == -1).sum()) == stats["count_eq_minus1"]
    assert int((out == 1).sum()) == stats["count_eq_plus1"]


# ---------------------------------------------------------------- DICOM → CT-RATE order
def _affine(col: list[float], row: list[float], slc: list[float]) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = col, row, slc
    return aff


@pytest.mark.parametrize(
    "affine",
    [
        _affine([0.7, 0, 0], [0, 0.7, 0], [0, 0, 2.5]),  # HFS, slices inferior → superior
        _affine([0.7, 0, 0], [0, 0.7, 0], [0, 0, -2.5]),  # HFS, slices superior → inferior
        _affine([-0.7, 0, 0], [0, -0.7, 0], [0, 0, 2.5]),  # prone
        _affine([0, 0.7, 0], [0.7, 0, 0], [0, 0, -2.5]),  # rows/cols swapped
    ],
)
def test_ctrate_xyz_from_dicom_orders_lps(affine: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    vol = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)  # [slice, row, col]
    spacing = (2.5, 0.7, 0.7)
    xyz, spacing_xyz = ctrate_xyz_from_dicom(vol, spacing, affine)
    direction = affine[:3, :3][:, [2, 1, 0]]  # LPS direction per (slice, row, col) axis
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1)
    world = idx @ direction.T  # LPS position of every input voxel
    # C order of the output = sorted by L, then P, then S (lexsort: last key is primary)
    order = np.lexsort((world[..., 2].ravel(), world[..., 1].ravel(), world[..., 0].ravel()))
    expected = vol.ravel()[order].reshape(xyz.shape)
    assert np.array_equal(xyz, expected)
    assert spacing_xyz == (0.7, 0.7, 2.5)


def test_ctrate_standard_series_is_transpose_and_flip() -> None:
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    xyz, _ = ctrate_xyz_from_dicom(vol, (1.0, 0.5, 0.5), _affine([1, 0, 0], [0, 1, 0], [0, 0, -1]))
    assert np.array_equal(xyz, vol.transpose(2, 1, 0)[:, :, ::-1])


@pytest.mark.parametrize("after", [False, True])
def test_preprocess_reads_strided_views_without_writing(after: bool) -> None:
    """ctrate_xyz_from_dicom returns a flipped, transposed view; preprocessing copies it once."""
    stored = _npy("preproc_small_input_stored_xyz_int16.npy")
    zyx = np.ascontiguousarray(stored.transpose(2, 1, 0)[::-1])
    before = zyx.copy()
    view, spacing = ctrate_xyz_from_dicom(
        zyx, (2.5, 0.6, 0.6), _affine([0.6, 0, 0], [0, 0.6, 0], [0, 0, -2.5])
    )
    assert np.shares_memory(view, zyx) and np.array_equal(view, stored)
    out, same = (
        preprocess_volume(v, spacing, (32, 48, 24), clip_after_resample=after, slope=2.0, intercept=-1500.0)
        for v in (view, stored)
    )
    assert torch.equal(out, same)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert np.array_equal(zyx, before)
