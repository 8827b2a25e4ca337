"""Compressed frames decoded by imagecodecs, which lets go of the GIL, inside pydicom's own pipeline.

pydicom's pylibjpeg plugins hold the GIL while they decode, so the decode threads take turns and a
compressed study decodes no faster on two cores than on one. imagecodecs' codecs release it. Each
is plugged in as the only plugin of a private pydicom ``Decoder`` per transfer syntax (pydicom's
plugin interface: ``is_available``, ``DECODER_DEPENDENCIES`` and a frame function, see
https://pydicom.github.io/pydicom/stable/guides/decoding/decoder_plugins.html). pydicom still finds
the frame in the encapsulated data, checks the options, picks the dtype from Pixel Representation
and Bits Allocated, and applies its JPEG-LS / JPEG 2000 sign correction and its unused-bits shift;
only the codec differs, and this module sizes the sample container the way the pylibjpeg plugin
does. The codestreams routed here decode to samples fixed by their standard (no floating point),
so any conforming codec gives the same stored values:

=====================================  ================================  =======================
transfer syntax                        imagecodecs function              library
=====================================  ================================  =======================
JPEG Lossless P14 (.57), SV1 (.70)     ``jpegsof3_decode`` (SOF3 only)   jpegsof3
JPEG-LS Lossless (.80), Near (.81)     ``jpegls_decode``                 CharLS
JPEG 2000 Lossless (.90)               ``jpeg2k_decode``                 OpenJPEG
HTJ2K Lossless (.201), RPCL (.202)     ``jpeg2k_decode``                 OpenJPEG
RLE Lossless (.5)                      ``dicomrle_decode``               imagecodecs
=====================================  ================================  =======================

Everything else stays with pydicom's decoders: JPEG baseline/extended (lossy DCT, whose rounding
differs between libraries), JPEG 2000 and HTJ2K that may be lossy (.91, .203: the 9/7 wavelet is
floating point), colour or multi-sample images, Bits Allocated other than 8 or 16, and any
frame imagecodecs rejects (it then fails, if it fails, in pydicom's words) — except a lossless
JPEG or JPEG-LS frame whose codestream is what its transfer syntax names (SOF3, SOF55) and that
the codec refuses: such a frame is damaged (cut short, bytes changed), and pylibjpeg's libjpeg
decodes many damaged ones without a word into wrong values, so it fails as
:class:`RefusedFrame` instead. A stream of another kind under such a label (a lossy baseline
JPEG labelled lossless) still goes to pydicom. A lossless JPEG frame with a point transform
(Pt > 0, rare) is refused too: jpegsof3 leaves its samples divided by 2^Pt and pylibjpeg's libjpeg
offsets them, where libjpeg-turbo gives them back as ITU-T T.81 H.1.2.1 says (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import Decoder, DecodeRunner
from pydicom.uid import (
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    RLELossless,
)

imagecodecs: Any
try:
    import imagecodecs
except ImportError:  # a dependency, but without it every frame goes to pydicom's decoders
    imagecodecs = None

log = logging.getLogger(__name__)

# transfer syntax -> (imagecodecs decode function, imagecodecs codec class that says if it was built)
_FUNCTIONS: dict[str, tuple[str, str]] = {
    JPEGLossless: ("jpegsof3_decode", "JPEGSOF3"),
    JPEGLosslessSV1: ("jpegsof3_decode", "JPEGSOF3"),
    JPEGLSLossless: ("jpegls_decode", "JPEGLS"),
    JPEGLSNearLossless: ("jpegls_decode", "JPEGLS"),
    JPEG2000Lossless: ("jpeg2k_decode", "JPEG2K"),
    HTJ2KLossless: ("jpeg2k_decode", "JPEG2K"),
    HTJ2KLosslessRPCL: ("jpeg2k_decode", "JPEG2K"),
    RLELossless: ("dicomrle_decode", "DICOMRLE"),
}
_LIBRARY = {"jpegsof3_decode": "jpegsof3", "jpegls_decode": "CharLS", "jpeg2k_decode": "OpenJPEG"}
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2026.3.6",) for uid in _FUNCTIONS}
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# what a frame the plugin rejects raises out of pydicom's as_array (it wraps the codec's own error
# in RuntimeError; validation and frame lookup raise ValueError, AttributeError and the like)
_REJECTED = (RuntimeError, ValueError, AttributeError, TypeError, KeyError, IndexError, NotImplementedError)
# lossless syntaxes whose codec's refusal of a codestream of their own kind means a damaged frame:
# the Start Of Frame marker that kind has (ITU-T T.81 B.1.1.3 and table B.1: SOF3, lossless
# Huffman; ITU-T T.87 C.2.2: SOF55, JPEG-LS)
_LOSSLESS_SOF: dict[str, int] = {
    JPEGLossless: 0xC3,
    JPEGLosslessSV1: 0xC3,
    JPEGLSLossless: 0xF7,
    JPEGLSNearLossless: 0xF7,
}
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # not DHT, JPG, DAC


class RefusedFrame(ValueError):
    """A lossless JPEG or JPEG-LS frame that its codec refuses although its codestream is of the
    kind its transfer syntax names: damaged, so no other decoder is asked (see the module text).
    Also a lossless JPEG frame with a point transform (Pt > 0), which jpegsof3 and pylibjpeg's
    libjpeg both decode to values other than ITU-T T.81 H.1.2.1 gives (libjpeg-turbo's, tested)."""


def is_available(uid: str) -> bool:
    """pydicom's plugin hook: imagecodecs is installed and was built with the codec for ``uid``."""
    if imagecodecs is None or uid not in _FUNCTIONS:
        return False
    codec = getattr(imagecodecs, _FUNCTIONS[uid][1], None)
    return bool(getattr(codec, "available", False))


def _header_segments(codestream: bytes) -> Iterator[tuple[int, int]]:
    """(marker code, offset of the marker) of each marker segment of a JPEG or JPEG-LS ``codestream``
    from SOI up to and including the first Start Of Scan (ITU-T T.81 B.1.1: a 2-byte marker, then
    a 2-byte length that counts itself; fill bytes 0xFF may precede a marker). Nothing when the
    bytes do not start with SOI; stops where they stop making sense."""
    if codestream[:2] != b"\xff\xd8":
        return
    at = 2
    while at + 4 <= len(codestream) and codestream[at] == 0xFF:
        code = codestream[at + 1]
        if code == 0xFF:  # a fill byte (T.81 B.1.1.2)
            at += 1
            continue
        yield code, at
        if code == 0xDA:
            return
        at += 2 + int.from_bytes(codestream[at + 2 : at + 4], "big")


def start_of_frame(codestream: bytes) -> int | None:
    """The Start Of Frame marker's code of a JPEG or JPEG-LS ``codestream`` (0xC0-0xCF but
    DHT/JPG/DAC: 0xC3 is lossless Huffman; 0xF7 is JPEG-LS), or None when there is none before the
    first Start Of Scan."""
    return next((code for code, _ in _header_segments(codestream) if code in _SOF_MARKERS), None)


def point_transform(codestream: bytes) -> int | None:
    """The point transform Pt (the Al nibble of the first Start Of Scan header, T.81 B.2.3) of a
    JPEG ``codestream``, or None when it has no Start Of Scan header. A lossless stream with
    Pt > 0 holds samples divided by 2^Pt; the decoder multiplies them back (T.81 H.1.2.1)."""
    for code, at in _header_segments(codestream):
        if code == 0xDA and at + 5 <= len(codestream):
            components = codestream[at + 4]
            ahal = at + 5 + 2 * components + 2  # after Ns component specs, Ss and Se
            return codestream[ahal] & 0x0F if ahal < len(codestream) else None
    return None


def _container_bits(precision: int) -> int:
    """The sample size pylibjpeg's JPEG-LS and JPEG 2000 decoders return for a codestream precision."""
    return 8 if precision <= 8 else 16 if precision <= 16 else 32


def decode_pixel_data(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's plugin hook: one encoded frame → its samples, little endian, Rows × Columns.

    Sets the runner's options as pydicom's pylibjpeg plugin does (JPEG-LS and JPEG 2000 samples
    come in a container sized by the codestream's precision; planar configuration), so pydicom's
    processing after it is the same. Raises ``ValueError`` when the codec's output is not the
    size or sample width pydicom expects (pydicom's own decoder then takes the frame).
    """
    ts = runner.transfer_syntax
    name = _FUNCTIONS[ts][0]
    if ts == RLELossless:
        runner.set_option("planar_configuration", 1)  # as pylibjpeg-rle; one sample: no effect
        out = imagecodecs.dicomrle_decode(src, f"<u{runner.bits_allocated // 8}")  # segments -> LE bytes
        if len(out) != runner.frame_length(unit="bytes"):
            raise ValueError(
                f"RLE frame decoded to {len(out)} bytes, not {runner.frame_length(unit='bytes')}"
            )
        return bytes(out)
    if ts in JPEG2000TransferSyntaxes:
        runner.set_option(
            "bits_allocated", _container_bits(runner.get_option("j2k_precision", runner.bits_stored))
        )
        arr = imagecodecs.jpeg2k_decode(src, numthreads=1)  # one thread a frame: frames run in parallel
    elif ts in JPEGLSTransferSyntaxes:
        runner.set_option("planar_configuration", 0)
        runner.set_option(
            "bits_allocated", _container_bits(runner.get_option("jls_precision", runner.bits_stored))
        )
        arr = imagecodecs.jpegls_decode(src)
    else:
        if point_transform(src):  # jpegsof3 leaves such samples divided by 2^Pt (tested): refused
            raise ValueError("a lossless JPEG stream with a point transform")
        arr = getattr(imagecodecs, name)(src)
    if arr.shape != (runner.rows, runner.columns) or arr.dtype.kind not in "ui":
        raise ValueError(f"{name} gave {arr.dtype} {arr.shape}, expected ({runner.rows}, {runner.columns})")
    if arr.dtype.itemsize * 8 != runner.bits_allocated:
        raise ValueError(
            f"{name} gave {arr.dtype.itemsize * 8}-bit samples, expected {runner.bits_allocated}-bit"
        )
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


@cache
def _decoder(uid: str) -> Decoder:
    decoder = Decoder(UID(uid))
    decoder.add_plugin("imagecodecs", (__name__, "decode_pixel_data"))
    return decoder


@dataclass(frozen=True)
class FastDecoder:
    """Decodes frames of one parsed file through imagecodecs; :meth:`frame` is None where it cannot."""

    ds: Dataset
    name: str  # for provenance, e.g. "imagecodecs 2026.3.6 jpegls_decode (CharLS)"

    def frame(self, index: int) -> np.ndarray | None:
        """Frame ``index`` as pydicom's ``as_array(ds, index=index, raw=True)`` gives it: stored
        values, shape (Rows, Columns), dtype from Pixel Representation and the sample container.
        None when imagecodecs rejects the frame (pydicom's decoder should take it). Raises
        :class:`RefusedFrame` when the frame is lossless JPEG or JPEG-LS of its syntax's kind and the
        codec refuses it."""
        ts = self.ds.file_meta.TransferSyntaxUID
        try:
            arr, _ = _decoder(str(ts)).as_array(self.ds, index=index, raw=True)
        except _REJECTED as exc:
            self._refuse_if_damaged(index)
            # visible: pydicom's decoder may accept a stream imagecodecs calls corrupt
            reason = str(exc).strip().splitlines()[-1].strip()[:200]
            log.warning("decode.fallback frame=%d syntax=%s to=pydicom reason=%s", index, ts, reason)
            return None
        return arr

    def _refuse_if_damaged(self, index: int) -> None:
        """Raise :class:`RefusedFrame` when frame ``index`` (which imagecodecs just rejected) is a
        codestream of its lossless syntax's own kind and the codec itself refuses it — not when the
        rejection was this module's check of its size, nor for a stream of another kind."""
        ts = str(self.ds.file_meta.TransferSyntaxUID)
        sof = _LOSSLESS_SOF.get(ts)
        if sof is None:
            return
        try:
            extended = self.ds.get("ExtendedOffsetTable")
            frame = get_frame(
                self.ds.PixelData,
                index,
                number_of_frames=int(self.ds.get("NumberOfFrames", 1) or 1),
                extended_offsets=(extended, self.ds.ExtendedOffsetTableLengths) if extended else None,
            )
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            return  # the frame cannot be located: pydicom's decoder fails in its own words
        if start_of_frame(frame) != sof:
            return
        if sof == 0xC3 and point_transform(frame):
            raise RefusedFrame(
                f"frame {index + 1} is lossless JPEG with a point transform (Pt = "
                f"{point_transform(frame)}), which the installed decoders read differently (jpegsof3 "
                "leaves the samples divided by 2^Pt; pylibjpeg's libjpeg offsets them), so it is "
                "not read: convert the series to an uncompressed syntax first (e.g. `gdcmconv --raw`)"
            )
        try:
            getattr(imagecodecs, _FUNCTIONS[ts][0])(frame)
        except Exception as exc:  # noqa: BLE001 — the codec's own error class differs per codec
            words = " ".join(str(exc).split())[:200]
            raise RefusedFrame(
                f"frame {index + 1} of its {UID(ts).name} pixel data is damaged (cut short or "
                f"changed): the lossless codec ({_LIBRARY[_FUNCTIONS[ts][0]]}) refuses it: {words}"
            ) from exc


def fast_decoder(ds: Dataset, ts: UID) -> FastDecoder | None:
    """A :class:`FastDecoder` for the file ``ds`` (parsed with its pixel data, its transfer syntax
    ``ts`` set in its file meta) when imagecodecs gives exactly pydicom's stored values for it:
    a syntax in the table above, one sample a pixel, MONOCHROME1/2, Bits Allocated 8 or 16.
    None otherwise."""
    if not is_available(ts):
        return None
    layout: tuple[Any, ...] = (ds.get("BitsAllocated"), ds.get("SamplesPerPixel", 1))
    monochrome = str(ds.get("PhotometricInterpretation", "")).strip() in _MONOCHROME
    if not monochrome or layout not in ((8, 1), (16, 1)):
        return None  # anything else (values pydicom would refuse among them) stays with pydicom
    name = _FUNCTIONS[ts][0]
    library = _LIBRARY.get(name)
    return FastDecoder(
        ds, f"imagecodecs {imagecodecs.__version__} {name}" + (f" ({library})" if library else "")
    )
