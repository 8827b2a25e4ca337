"""Decoding the chosen frames of a series into one preallocated HU array.

Only the chosen frames are read. The usual CT file — one 16-bit frame, uncompressed, stored
as it is — is read straight into its slice of the volume and rescaled there, on the calling
thread (:mod:`processor.dicom.native`); every other file as follows. Uncompressed pixel data
becomes a zero-copy ``np.frombuffer`` view (of the member's bytes, read once, see ``processor.bytesource``) that
is rescaled straight into the one preallocated volume; for Implicit/Explicit VR Little Endian
files the view starts at the Pixel Data offset the header scan found, so the file is not parsed
again (deflated, unusual layouts and compressed syntaxes are parsed in full by pydicom). Both read
the file in the encoding the scan decided from its bytes (``processor.dicom.encoding``), and the
Pixel Data length is checked against Rows × Columns × frames × BitsAllocated/8 before any view is
taken; every failure to read a file is one ``StepError`` naming the file, the cause and the fix.
Compressed frames are decoded on a small thread pool: lossless JPEG, JPEG-LS, lossless JPEG 2000 /
HTJ2K and RLE by imagecodecs, which releases the GIL so the threads decode side by side, giving
pydicom's stored values exactly (``processor.dicom.codecs``); everything else (JPEG baseline and
extended, possibly lossy JPEG 2000, colour) and any frame imagecodecs rejects by pydicom's decoders
(pylibjpeg + plugins, gdcm when installed).

HU = stored × RescaleSlope + RescaleIntercept, per frame; into **int16** whenever that is exact
(whole slope and intercept, and the frame's rescaled extremes fit), float32 otherwise.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from processor.bytesource import Buffer
from processor.dicom.codecs import fast_decoder
from processor.dicom.encoding import VALUE_ERRORS, Unreadable, plain_cause, read_file
from processor.dicom.frames import Frame
from processor.dicom.native import INT16, NeedsFloat, check_fits_int16, read_into_slice, takes, wrapped16
from processor.dicom.scan import PIXEL_DATA_TAG, Instance, Series
from processor.errors import IngestError, StepError
from processor.hugepages import volume_array

log = logging.getLogger(__name__)

NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
_NATIVE_DECODER = "numpy.frombuffer"  # provenance of uncompressed pixels, read in place or into a buffer
_NATIVE_DTYPES = {8: ("u1", "i1"), 16: ("<u2", "<i2"), 32: ("<u4", "<i4")}
_JPEG = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_J2K = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K,
    "1.2.840.10008.1.2.4.202": _J2K,
    "1.2.840.10008.1.2.4.203": _J2K,
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle (pydicom's own RLE decoder needs numpy)",
}


class _Target(NamedTuple):
    frame: int  # frame index inside the file
    k: int  # slice index in the volume
    slope: float
    intercept: float


def _decoder(ts: UID) -> Callable[..., tuple[np.ndarray, dict]]:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise Unreadable(
            f"transfer syntax {ts if ts.name == ts else f'{ts} ({ts.name})'} has no pixel decoder in ctwatch",
            "convert the series to an uncompressed syntax first (e.g. `gdcmconv --raw` or dcmtk `dcmdjpeg`)",
        ) from exc
    if not decoder.is_available:
        hint = INSTALL_HINTS.get(str(ts), "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise Unreadable(f"cannot decode {ts.name} pixel data: no decoder installed", hint)
    return decoder.as_array


@dataclass(frozen=True)
class PixelFormat:
    """How uncompressed pixels are laid out (Image Pixel module)."""

    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int
    frames: int
    rows: int
    cols: int

    @classmethod
    def of_instance(cls, instance: Instance) -> PixelFormat | None:
        f = instance.facts
        if f.bits_allocated is None:
            return None
        return cls(
            f.bits_allocated,
            f.bits_stored or f.bits_allocated,
            f.pixel_representation == 1,
            f.samples_per_pixel,
            f.number_of_frames,
            f.rows,
            f.cols,
        )

    @classmethod
    def of_dataset(cls, ds: Dataset) -> PixelFormat:
        missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
        if missing:
            raise Unreadable(f"its header has no {'/'.join(missing)}, so its pixels cannot be laid out")
        bits = int(ds.BitsAllocated)
        return cls(
            bits,
            int(ds.get("BitsStored", bits)),
            int(ds.get("PixelRepresentation", 0)) == 1,
            int(ds.get("SamplesPerPixel", 1)),
            int(ds.get("NumberOfFrames", 1) or 1),
            int(ds.Rows),
            int(ds.Columns),
        )


def _native_frames(fmt: PixelFormat | None, pixels: Buffer, little: bool = True) -> np.ndarray | None:
    """(frames, rows, cols) zero-copy view of uncompressed ``pixels`` (big endian when not ``little``),
    or None for unusual layouts.

    The value's length is verified first: Rows × Columns × frames × BitsAllocated/8 bytes (one more
    when that is odd: the padding to an even length); anything else is :class:`Unreadable`, never
    a view that starts or ends in the wrong place.
    """
    if fmt is None or fmt.bits_allocated not in _NATIVE_DTYPES or fmt.samples != 1:
        return None
    bits, stored, signed = fmt.bits_allocated, fmt.bits_stored, fmt.signed
    n, rows, cols = fmt.frames, fmt.rows, fmt.cols
    expected = n * rows * cols * (bits // 8)
    if len(pixels) not in (expected, expected + (expected & 1)):
        raise Unreadable(
            f"its Pixel Data holds {len(pixels)} bytes, but Rows × Columns × frames × "
            f"BitsAllocated/8 = {rows} × {cols} × {n} × {bits // 8} = {expected} bytes; the pixel "
            "data or the image size in its header is wrong"
        )
    dtype = _NATIVE_DTYPES[bits][signed]
    arr = np.frombuffer(pixels, dtype=dtype if little else dtype.replace("<", ">"), count=n * rows * cols)
    arr = arr.reshape(n, rows, cols)
    if stored < bits:
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & ((1 << stored) - 1)
    return arr


def _rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """HU = stored × slope + intercept, written into ``out`` (an int16 or float32 slice).

    int16: slope and intercept are whole numbers and the frame's extremes, rescaled, fit — so the
    16-bit wrapping arithmetic (done in place, no temporary) gives the exact values; otherwise
    :class:`NeedsFloat`. float32: converted, scaled and shifted in place.
    """
    if stored.shape != out.shape:
        raise StepError(
            f"a decoded frame is {stored.shape}, expected {out.shape}; the file's Rows/Columns "
            "do not match its pixel data — re-export the series"
        )
    if out.dtype == np.float32:
        out[...] = stored
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
        return
    if not stored.dtype.isnative:  # big-endian pixel data: values first, then the 16-bit view below
        stored = stored.astype(stored.dtype.newbyteorder("="))
    m, b = int(slope), int(intercept)
    check_fits_int16(stored, m, b)
    if stored.dtype.itemsize == 2:
        as16 = stored.view(np.int16)  # uint16 read as int16 is the same value modulo 2¹⁶
        if m == 1:
            np.add(as16, wrapped16(b), out=out)
        else:
            np.multiply(as16, wrapped16(m), out=out)
            out += wrapped16(b)
    else:
        np.copyto(out, stored.astype(np.int64) * m + b, casting="unsafe")


def _located_pixels(instance: Instance, data: Buffer) -> memoryview | None:
    """The value of the Pixel Data element the scan located in ``data``, for little-endian native syntaxes.

    The element is read in the VR encoding the scan decided from the file's bytes (``facts.implicit``,
    ``processor.dicom.encoding``), not in the one its header declares. None (parse the file in full
    instead) unless the element sits where the header parse stopped and is laid out as decided
    (implicit, or explicit OB/OW); :class:`Unreadable` when it is encapsulated under an uncompressed
    syntax or the file ends inside it.
    """
    facts, at = instance.facts, instance.pixel_offset
    ts = facts.transfer_syntax
    if (
        at is None
        or ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
        or data[at : at + 4] != PIXEL_DATA_TAG
    ):
        return None
    if facts.implicit:
        start = at + 8
    elif data[at + 4 : at + 6] in (b"OB", b"OW") and data[at + 6 : at + 8] == b"\0\0":
        start = at + 12
    else:
        return None
    if len(data) < start:
        raise Unreadable("the file ends inside its Pixel Data element: it is truncated", _COPY_AGAIN)
    (length,) = struct.unpack_from("<L", data, start - 4)
    if length == 0xFFFFFFFF:
        raise Unreadable(
            f"its Pixel Data is encapsulated (compressed) although its transfer syntax, {UID(ts).name}, "
            "is uncompressed, so the codec is unknown"
        )
    if start + length > len(data):
        raise Unreadable(
            f"the file ends {len(data) - start} bytes into its Pixel Data of {length} bytes: it is truncated",
            _COPY_AGAIN,
        )
    return memoryview(data)[start : start + length]


def _decode_file(
    instance: Instance, data: Buffer, targets: list[_Target], hu: np.ndarray, fast: bool = True
) -> tuple[str, set[str]]:
    """Decode the wanted frames of one file into ``hu``; returns (transfer syntax, decoders used).
    ``fast``: compressed frames through imagecodecs where it gives pydicom's values exactly."""
    pixels = _located_pixels(instance, data)
    frames = _native_frames(PixelFormat.of_instance(instance), pixels) if pixels is not None else None
    if frames is not None:
        for t in targets:
            _rescale_into(hu[t.k], frames[t.frame], t.slope, t.intercept)
        return instance.facts.transfer_syntax, {_NATIVE_DECODER}
    # a full parse, in the encoding the bytes show (the scan's rule), told to pydicom's decoders too
    ds, encoding, _ = read_file(data, stop_before_pixels=False)
    ts = UID(encoding.transfer_syntax)
    ds.file_meta.TransferSyntaxUID = ts
    # pydicom types get_item as DataElement, but an element read_file has not converted is still raw
    element: DataElement | RawDataElement | None = ds.get_item("PixelData")
    if element is None or element.value is None:
        if PIXEL_DATA_TAG in bytes(data[-12:]) or b"\x7f\xe0\x00\x10" in bytes(data[-12:]):
            raise Unreadable("the file ends inside its Pixel Data element: it is truncated", _COPY_AGAIN)
        raise Unreadable("it has no Pixel Data (float or double pixel data is not CT)")
    if not isinstance(element, RawDataElement):  # only a raw element keeps the stated length checked below
        raise StepError(
            f"internal error: Pixel Data was converted ({type(element).__name__}) before its "
            "length could be checked; report this with the file"
        )
    value, encapsulated = element.value, element.length == 0xFFFFFFFF
    if not encapsulated and len(value) < element.length:
        raise Unreadable(
            f"the file ends {len(value)} bytes into its Pixel Data of {element.length} bytes: "
            "it is truncated",
            _COPY_AGAIN,
        )
    compressed = ts.is_transfer_syntax and ts.is_compressed
    if encapsulated and not compressed:
        raise Unreadable(
            f"its Pixel Data is encapsulated (compressed) although its transfer syntax, {ts.name}, "
            "is uncompressed, so the codec is unknown"
        )
    if not encapsulated and (
        ts in NATIVE or not encoding.little or compressed
    ):  # raw pixels, whatever is declared
        frames = _native_frames(PixelFormat.of_dataset(ds), value, encoding.little)
        if frames is not None:
            for t in targets:
                _rescale_into(hu[t.k], frames[t.frame], t.slope, t.intercept)
            if compressed:  # a compressed syntax over raw pixels: they were read as what they are
                ts = UID(ImplicitVRLittleEndian if encoding.implicit else ExplicitVRLittleEndian)
            return str(ts), {_NATIVE_DECODER}
    imagecodecs = fast_decoder(ds, ts) if fast else None
    used = set()
    for t in targets:
        arr = imagecodecs.frame(t.frame) if imagecodecs is not None else None
        if imagecodecs is not None and arr is not None:
            used.add(imagecodecs.name)
        else:  # pydicom's decoder: the reference, and the one whose words a broken frame fails in
            arr, _ = _decoder(ts)(ds, index=t.frame, raw=True)
            used.add("pydicom, plugins tried in order: " + ", ".join(get_decoder(ts).available_plugins))
        _rescale_into(hu[t.k], arr, t.slope, t.intercept)
    return str(ts), used


def _read_and_decode(
    series: Series,
    index: int,
    targets: list[_Target],
    hu: np.ndarray,
    fast: bool = True,
    into_slice: bool = False,
) -> tuple[str, set[str]]:
    """Decode one file's frames; every reader failure becomes one :class:`StepError` that names the
    file, the cause in plain words and the fix (never a library's traceback or advice).
    ``into_slice``: the file is read straight into its slice when its bytes allow
    (:mod:`processor.dicom.native`, see :func:`processor.dicom.native.takes`)."""
    instance = series.instances[index]
    name = instance.member.name
    try:
        if into_slice:
            t = targets[0]
            if read_into_slice(instance, hu[t.k], t.slope, t.intercept):
                return instance.facts.transfer_syntax, {_NATIVE_DECODER}
        return _decode_file(instance, instance.member.data(), targets, hu, fast)
    except NeedsFloat:
        raise
    except StepError as exc:
        if name in str(exc):
            raise
        raise StepError(f"{name}: {exc}") from exc
    except Unreadable as exc:
        raise StepError(f"cannot read {name}: {exc}. Fix: {exc.fix}") from exc
    except IngestError as exc:  # the input changed under us (shrank while read): its own plain words
        raise StepError(f"cannot read {name}: {exc}") from exc
    except (OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise StepError(
            f"cannot read {name} ({plain_cause(exc)}): the member is corrupt (bad CRC) or "
            f"truncated. Fix: {_COPY_AGAIN}"
        ) from exc
    except _READER_ERRORS as exc:
        raise StepError(
            f"cannot decode {name}: {plain_cause(exc)}. Fix: check the file with "
            "`dcmdump`/`gdcminfo` and re-export the series; a missing codec names the package to "
            "install"
        ) from exc
    except BaseException as exc:
        # A decoder written in Rust (pylibjpeg-rle) that panics on a damaged frame raises pyo3's
        # PanicException, a BaseException: left alone it passes every `except Exception` and ends
        # the `process` command or the daemon's worker thread instead of failing this study.
        if type(exc).__name__ != "PanicException":
            raise
        raise StepError(
            f"cannot decode {name}: its pixel data is damaged (the decoder stopped: "
            f"{plain_cause(exc)}). Fix: check the file with `dcmdump`/`gdcminfo` and re-export "
            "the series"
        ) from None


_COPY_AGAIN = "copy the study again from the source"
# what pydicom raises reading a file (VALUE_ERRORS), and the RuntimeError a pixel decoder raises
_READER_ERRORS = (*VALUE_ERRORS, RuntimeError)


def _exact_in_int16(kept: list[Frame]) -> bool:
    return all(
        float(f.slope).is_integer()
        and float(f.intercept).is_integer()
        and abs(f.slope) <= INT16.max
        and abs(f.intercept) <= 1 << 20
        for f in kept
    )


def decode_into(
    series: Series, kept: list[Frame], workers: int = 4, *, imagecodecs: bool = True
) -> tuple[np.ndarray, dict]:
    """Decode the kept frames into one preallocated (z, y, x) int16 array, or float32 when int16 is not exact.

    ``imagecodecs=False`` decodes every compressed frame with pydicom's decoders (the reference)."""
    if _exact_in_int16(kept):
        try:
            return _decode_as(series, kept, workers, np.int16, imagecodecs=imagecodecs)
        except NeedsFloat:
            log.info("volume.float32 series=%s: a rescaled value does not fit int16", series.number)
    return _decode_as(series, kept, workers, np.float32, imagecodecs=imagecodecs)


def _decode_as(
    series: Series, kept: list[Frame], workers: int, dtype: type, *, imagecodecs: bool = True
) -> tuple[np.ndarray, dict]:
    hu = volume_array((len(kept), kept[0].rows, kept[0].cols), dtype)  # on huge pages when free
    by_file: dict[int, list[_Target]] = defaultdict(list)
    for k, f in enumerate(kept):
        by_file[f.instance].append(_Target(f.frame, k, f.slope, f.intercept))
    jobs = list(by_file.items())
    into_slice = [takes(series.instances[i], [t.frame for t in targets], hu) for i, targets in jobs]
    results: list[tuple[str, set[str]]] = [("", set())] * len(jobs)
    failed: dict[int, Exception] = {}
    for j, (i, targets) in enumerate(jobs):  # read in place, on this thread: no work to share out
        if into_slice[j]:
            try:
                results[j] = _read_and_decode(series, i, targets, hu, imagecodecs, into_slice=True)
            except Exception as exc:  # noqa: BLE001 — raised below, unless an earlier file failed too
                failed[j] = exc
                break
    # the rest as before; the failure reported is the first in file order, whichever path read it
    rest = [j for j in range(len(jobs)) if not into_slice[j] and j < min(failed, default=len(jobs))]
    workers = min(workers, os.cpu_count() or 1)

    def job(j: int) -> tuple[str, set[str]]:
        return _read_and_decode(series, jobs[j][0], jobs[j][1], hu, imagecodecs)

    if workers <= 1 or len(rest) <= 1:
        done = [job(j) for j in rest]
    else:  # imagecodecs lets go of the GIL while it decodes: the threads decode side by side
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctwatch-decode") as pool:
            done = list(pool.map(job, rest))
    for j, result in zip(rest, done, strict=True):
        results[j] = result
    if failed:
        raise next(iter(failed.values()))
    syntaxes = sorted({ts for ts, _ in results})
    decoders = sorted({dec for _, used in results for dec in used})
    return hu, {
        "transfer_syntaxes": [f"{ts} ({UID(ts).name})" for ts in syntaxes],
        "decoder": decoders,
        "files_read": len(jobs),
    }


def rescale_info(kept: list[Frame]) -> dict:
    pairs = {(f.slope, f.intercept) for f in kept}
    if len(pairs) == 1:
        slope, intercept = pairs.pop()
        return {"rescale": {"per_frame": False, "slope": slope, "intercept": intercept}}
    return {
        "rescale": {
            "per_frame": True,
            "slopes": sorted({p[0] for p in pairs}),
            "intercepts": sorted({p[1] for p in pairs}),
        }
    }
