"""Compressed frames decoded by imagecodecs are bit-exact against pydicom's own decoders.

Every transfer syntax routed to imagecodecs (``processor.dicom.codecs``) is checked against every
pydicom plugin installed for it (pylibjpeg, pyjpegls, Pillow, pydicom's RLE) and against the
stored values that were encoded (the codecs are lossless): signed 16-bit CT with HU down to
−1024, 12-bit Bits Stored signed and unsigned, multi-frame files, pydicom's own sample files
(JPEG 2000 whose signedness disagrees with Pixel Representation among them), and whole volumes
built through the ingest path with and without imagecodecs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, HTJ2KLossless, JPEGLossless, JPEGLosslessSV1, JPEGLSNearLossless

from processor.dicom.codecs import fast_decoder, start_of_frame
from processor.dicom.scan import scan_members
from processor.dicom.volume import Volume, load_volume
from processor.errors import StepError
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen

SIZE = 64
# kind -> (Bits Stored, Pixel Representation, lowest, highest stored value)
KINDS = {
    "ct16": (16, 1, -1024, 3071),  # signed 16-bit, stored = HU (intercept 0): air at −1024
    "signed12": (12, 1, -2048, 2047),
    "unsigned12": (12, 0, 0, 4095),  # the classic CT layout (intercept −1024)
}


def _dataset(kind: str, frames: int = 1, seed: int = 7) -> tuple[Dataset, np.ndarray]:
    """One native file of ``frames`` random frames of ``kind``, and the stored values it holds."""
    bits, signed, lo, hi = KINDS[kind]
    stored = np.random.default_rng(seed).integers(lo, hi + 1, (frames, SIZE, SIZE))
    stored[:, 0, :8] = lo  # the extremes, always
    stored[:, 1, :8] = hi
    ds = dicomgen.make_series(1, stored=stored[:1].astype(np.int16), intercept=0.0 if signed else -1024.0)[0]
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, signed
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds, stored


def _with_frames(ds: Dataset, frames: list[bytes], uid: str) -> Dataset:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid
    return ds


def _jpeg_lossless_p14(ds: Dataset, stored: np.ndarray) -> Dataset:
    """JPEG lossless process 14 (.57), predictor 5, precision = Bits Stored (libjpeg-turbo's encoder):
    the codestream holds Bits Stored-bit patterns, which pydicom's unused-bits shift sign-extends."""
    bits = int(ds.BitsStored)
    patterns = (stored & ((1 << bits) - 1)).astype(np.uint16)
    frames = [imagecodecs.jpeg8_encode(f, lossless=True, predictor=5, bitspersample=bits) for f in patterns]
    return _with_frames(ds, frames, JPEGLossless)


def _htj2k(ds: Dataset, stored: np.ndarray) -> Dataset:
    dtype = np.int16 if ds.PixelRepresentation else np.uint16
    frames = [imagecodecs.htj2k_encode(f.astype(dtype), reversible=True) for f in stored]
    return _with_frames(ds, frames, HTJ2KLossless)


def _jpegls_near(ds: Dataset, stored: np.ndarray) -> Dataset:
    ds.compress(JPEGLSNearLossless, jls_error=3, generate_instance_uid=False)
    return ds


ENCODERS: dict[str, Callable[[Dataset, np.ndarray], Dataset]] = {
    **{name: (lambda ds, _, name=name: dicomgen.encode(ds, name)) for name in dicomgen.ENCODINGS[1:]},
    "jpeg-lossless-p14": _jpeg_lossless_p14,
    "htj2k": _htj2k,
    "jpeg-ls-near": _jpegls_near,
}


def _parsed(ds: Dataset) -> Dataset:
    """The dataset as the decoder meets it: written to bytes and read back."""
    return pydicom.dcmread(io.BytesIO(dicomgen.to_bytes(ds)))


def _references(ds: Dataset, index: int) -> dict[str, np.ndarray]:
    """Frame ``index`` decoded by each pydicom plugin installed for the file's syntax."""
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    assert decoder.available_plugins
    return {
        plugin: decoder.as_array(ds, index=index, raw=True, decoding_plugin=plugin)[0]
        for plugin in decoder.available_plugins
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("encoding", ENCODERS)
def test_imagecodecs_gives_pydicoms_stored_values(encoding: str, kind: str) -> None:
    source, stored = _dataset(kind, frames=2)
    ds = _parsed(ENCODERS[encoding](source, stored))
    ts = ds.file_meta.TransferSyntaxUID
    fast = fast_decoder(ds, ts)
    assert fast is not None and fast.name.startswith(f"imagecodecs {imagecodecs.__version__} ")
    for index in range(2):
        mine = fast.frame(index)
        assert mine is not None, (encoding, kind, index)
        assert mine.shape == (SIZE, SIZE) and mine.dtype == np.dtype("<i2" if KINDS[kind][1] else "<u2")
        for plugin, reference in _references(ds, index).items():
            assert reference.dtype == mine.dtype and np.array_equal(mine, reference), (plugin, index)
        if ts == JPEGLSNearLossless:  # off by at most NEAR (3) per sample, on the Bits Stored patterns
            bits = KINDS[kind][0]  # (signed values next to the ends wrap: JPEG-LS knows no sign)
            error = (mine.astype(np.int64) - stored[index] + (1 << bits - 1)) % (1 << bits) - (1 << bits - 1)
            assert np.abs(error).max() <= 3
        else:
            assert np.array_equal(mine, stored[index])


@pytest.mark.parametrize(
    "name",
    [
        "J2K_pixelrep_mismatch.dcm",  # signed data in an unsigned 13-bit J2K codestream
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "JPEGLSNearLossless_08.dcm",  # 8-bit samples
        "MR_small_RLE.dcm",
    ],
)
def test_pydicoms_sample_files_decode_the_same(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    fast = fast_decoder(ds, ds.file_meta.TransferSyntaxUID)
    assert fast is not None
    mine = fast.frame(0)
    assert mine is not None
    for plugin, reference in _references(ds, 0).items():
        assert reference.dtype == mine.dtype and np.array_equal(mine, reference), plugin


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",  # JPEG 2000 (.91): may be lossy, the 9/7 wavelet is floating point
        "693_J2KI.dcm",  # the same, irreversible
        "JPGExtended.dcm",  # JPEG extended (lossy DCT)
        "SC_rgb_rle.dcm",  # colour
        "rtdose_rle_1frame.dcm",  # 32-bit samples
    ],
)
def test_syntaxes_and_layouts_not_certain_to_match_stay_with_pydicom(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    assert fast_decoder(ds, ds.file_meta.TransferSyntaxUID) is None


def test_a_frame_imagecodecs_rejects_goes_to_pydicom(caplog: pytest.LogCaptureFixture) -> None:
    """A lossy baseline JPEG labelled JPEG lossless SV1: jpegsof3 decodes only lossless (SOF3)
    codestreams, so the frame is left to pydicom, which decodes what is there."""
    source, _ = _dataset("ct16")
    eight = dicomgen.jpeg_baseline(dicomgen.to_8bit(source))
    ds = _parsed(_with_frames(eight, [get_frame(eight.PixelData, 0, number_of_frames=1)], JPEGLosslessSV1))
    fast = fast_decoder(ds, ds.file_meta.TransferSyntaxUID)
    assert fast is not None
    with caplog.at_level(logging.WARNING, logger="processor.dicom.codecs"):
        assert fast.frame(0) is None
    assert any(
        "decode.fallback" in r.getMessage() and "SoF must be 0xC3" in r.getMessage() for r in caplog.records
    )


# --- whole volumes through the ingest path --------------------------------------------------------


def _volume(zip_path: Path, imagecodecs: bool) -> Volume:
    with open_arrival(zip_path, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        return load_volume(series, workers=2, imagecodecs=imagecodecs)


@pytest.mark.parametrize("encoding", [*dicomgen.ENCODINGS[1:], "enhanced-jpeg2000"])
def test_volume_equals_the_one_built_without_imagecodecs(tmp_path: Path, encoding: str) -> None:
    hu, _ = dicomgen.chest_phantom((6, SIZE, SIZE))
    stored = (np.rint(hu) + 1024).astype(np.int16)  # HU = stored − 1024, air at 24 stored
    series = dicomgen.make_series(6, stored=stored, intercept=-1024.0)
    if encoding == "enhanced-jpeg2000":
        files = [dicomgen.encode(dicomgen.make_enhanced(series, shuffle_seed=3), "jpeg2000")]
    else:
        files = [dicomgen.encode(ds, encoding) for ds in series]
    zip_path = dicomgen.write_zip(tmp_path / "study.zip", files, shuffle_seed=1)
    fast, reference = _volume(zip_path, True), _volume(zip_path, False)
    assert fast.hu.dtype == reference.hu.dtype == np.int16
    assert np.array_equal(fast.hu, reference.hu) and np.array_equal(fast.hu, np.rint(hu))
    assert [d.split()[0] for d in fast.provenance["decoder"]] == ["imagecodecs"]
    assert reference.provenance["decoder"][0].startswith("pydicom, plugins tried in order: ")


def test_a_broken_frame_fails_in_the_same_words_with_imagecodecs(tmp_path: Path) -> None:
    """A JPEG 2000 frame cut short: imagecodecs rejects it, pydicom's decoders too, and the study
    fails with the one StepError that names the file, whichever path decoded the others."""
    series = dicomgen.make_series(3, stored=np.zeros((3, SIZE, SIZE), np.int16))
    files = [dicomgen.encode(ds, "jpeg2000") for ds in series]
    frame = get_frame(files[1].PixelData, 0, number_of_frames=1)
    files[1].PixelData = encapsulate([frame[: len(frame) // 2 & ~1]])
    zip_path = dicomgen.write_zip(tmp_path / "broken.zip", files)
    messages = []
    for flag in (True, False):
        with pytest.raises(StepError, match=r"^cannot decode DICOM/IMG0002\.dcm: ") as caught:
            _volume(zip_path, flag)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(("encoding", "sof"), [("jpeg-ls", 0xF7), ("jpeg-lossless", 0xC3)])
def test_a_damaged_lossless_frame_fails_the_study_instead_of_going_to_pydicom(
    tmp_path: Path, encoding: str, sof: int
) -> None:
    """A JPEG-LS or lossless JPEG frame cut short inside a real file in a real ZIP: the lossless codec
    refuses it, and pylibjpeg's libjpeg (which pydicom would try next) decodes such frames without
    a word into wrong values — so the study fails, naming the file and the frame, and no volume is
    built (the frame is of its syntax's own kind: the mislabelled-stream fallback does not apply)."""
    hu, _ = dicomgen.chest_phantom((3, SIZE, SIZE))
    series = dicomgen.make_series(3, stored=(np.rint(hu) + 1024).astype(np.int16), intercept=-1024.0)
    files = [dicomgen.encode(ds, encoding) for ds in series]
    frame = get_frame(files[1].PixelData, 0, number_of_frames=1)
    assert start_of_frame(frame) == sof
    files[1].PixelData = encapsulate([frame[: len(frame) * 3 // 4 & ~1]])
    zip_path = dicomgen.write_zip(tmp_path / "damaged.zip", files)
    with pytest.raises(StepError, match=r"^cannot decode DICOM/IMG0002\.dcm: frame 1 of its .* is damaged"):
        _volume(zip_path, True)


def test_a_lossless_jpeg_frame_with_a_point_transform_is_refused(tmp_path: Path) -> None:
    """Lossless JPEG with Pt = 1: libjpeg-turbo gives the samples back × 2 as ITU-T T.81 says, but
    jpegsof3 leaves them halved and pylibjpeg's libjpeg offsets them — either would be a wrong HU
    that looks right, so the study fails naming the file and the point transform."""
    hu, _ = dicomgen.chest_phantom((3, SIZE, SIZE))
    stored = (np.rint(hu) + 1024).astype(np.int16)
    series = dicomgen.make_series(3, stored=stored, intercept=-1024.0)
    frames = [dicomgen.jpeg_lossless_sv1(f, point_transform=1) for f in stored]
    assert np.array_equal(imagecodecs.jpeg8_decode(frames[0]), stored[0] >> 1 << 1)  # a conforming stream
    files = [
        _with_frames(ds, [f + b"\0" * (len(f) & 1)], JPEGLosslessSV1)
        for ds, f in zip(series, frames, strict=True)
    ]
    zip_path = dicomgen.write_zip(tmp_path / "pt.zip", files)
    with pytest.raises(StepError, match=r"^cannot decode DICOM/IMG000\d\.dcm: .*point transform \(Pt = 1\)"):
        _volume(zip_path, True)


def test_a_decoder_that_panics_fails_the_study(tmp_path: Path) -> None:
    """An RLE frame with one byte changed: imagecodecs' output is too long, so pydicom's decoders take
    it, and pylibjpeg-rle panics (pyo3's PanicException, a BaseException that `except Exception`
    misses): the study fails with a StepError naming the file, it does not end the process."""
    pytest.importorskip("rle")
    hu, _ = dicomgen.chest_phantom((3, SIZE, SIZE))
    series = dicomgen.make_series(3, stored=(np.rint(hu) + 1024).astype(np.int16), intercept=-1024.0)
    files = [dicomgen.encode(ds, "rle") for ds in series]
    frame = get_frame(files[1].PixelData, 0, number_of_frames=1)
    middle = len(frame) // 2
    files[1].PixelData = encapsulate([frame[:middle] + bytes([frame[middle] ^ 0x5A]) + frame[middle + 1 :]])
    zip_path = dicomgen.write_zip(tmp_path / "panic.zip", files)
    with pytest.raises(StepError, match=r"^cannot decode DICOM/IMG0002\.dcm: "):
        _volume(zip_path, True)


def test_is_available_names_only_routed_syntaxes() -> None:
    from processor.dicom.codecs import is_available

    assert is_available(UID("1.2.840.10008.1.2.4.80")) and is_available(UID("1.2.840.10008.1.2.5"))
    assert not is_available(UID("1.2.840.10008.1.2.4.91")) and not is_available(UID("1.2.840.10008.1.2.4.50"))
