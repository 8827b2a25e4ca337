"""The usual CT file read straight into its slice of the volume, and the int16 rescale it shares.

The usual CT file holds one frame of 16-bit native pixels (Implicit or Explicit VR Little
Endian) whose Pixel Data element lies where the header scan found it. Such a file is read without
a buffer of its own (:func:`read_into_slice`): its header bytes (into a small buffer) and its
pixel bytes (straight into the volume's int16 slice) are read in one call, the bytes after them
(if any) are read, the member's CRC-32 is checked over the three, in order
(:meth:`processor.bytesource.Member.read_into`), the Pixel Data element is checked to lie where the
scan saw it, and
HU = stored × RescaleSlope + RescaleIntercept is computed in place — each pixel byte is read once
from the input, CRC-checked while it is in the cache, and rescaled where it lies. The values, the
checks and the words of every failure are those of the general path (:mod:`processor.dicom.decode`,
which reads the member into a buffer of its own first): a file this path does not take, or whose
Pixel Data element (tag, VR and length at the offset the scan recorded) is no longer where the scan
saw it, is decoded there instead, from its first byte. Like the general path, it decodes with the
scan's header values: a ZIP member's CRC-32 proves its bytes unchanged since the scan; a file in a
folder has no such check, so a header edited in place after the scan is not seen (as before).
"""

from __future__ import annotations

import struct
import sys
from functools import lru_cache

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from processor.dicom.scan import PIXEL_DATA_TAG, Instance

INT16 = np.iinfo(np.int16)
_INT16_MIN, _INT16_MAX = int(INT16.min), int(INT16.max)
_LITTLE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
_UL = struct.Struct("<L")
_MINIMUM, _MAXIMUM = np.minimum.reduce, np.maximum.reduce  # a slice's extremes, without ndarray.min's wrapper
_LITTLE_HOST = sys.byteorder == "little"  # the slice's int16 holds the file's bytes as they are


class NeedsFloat(Exception):
    """A rescaled value does not fit int16: decode the series again into float32."""


@lru_cache(maxsize=256)
def wrapped16(value: int) -> np.int16:
    """``value`` modulo 2¹⁶ as an int16 (the arithmetic below wraps; the checked result is exact)."""
    return np.int16(((value + 0x8000) & 0xFFFF) - 0x8000)


@lru_cache(maxsize=16)
def _limits(dtype: np.dtype) -> tuple[int, int]:
    """The least and greatest value of an integer dtype (``np.iinfo`` takes microseconds a call;
    every slice of a volume asks)."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def check_fits_int16(stored: np.ndarray, m: int, b: int, bits_stored: int | None = None) -> None:
    """:class:`NeedsFloat` unless ``stored`` × ``m`` + ``b`` fits int16 for every value.

    Decided on the frame's minimum and maximum, each looked up only where the values its type
    allows (or ``bits_stored`` allows, when the values are already masked to it) could pass int16
    on that side: a frame of int16 shifted by −1024 is checked for its minimum only.
    """
    if not stored.size:
        lowest = highest = 0  # nothing to rescale
    elif stored.dtype.kind not in "iu":
        lowest, highest = sorted((int(stored.min()) * m + b, int(stored.max()) * m + b))
    else:
        low, high = _limits(stored.dtype)
        if bits_stored is not None and 0 < bits_stored < stored.dtype.itemsize * 8:
            low, high = (
                (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1)
                if low
                else (0, (1 << bits_stored) - 1)
            )
        # the stored extreme that gives the lowest (highest) HU: the minimum (maximum) when m >= 0
        lowest_of, highest_of = (_MINIMUM, _MAXIMUM) if m >= 0 else (_MAXIMUM, _MINIMUM)
        lowest, highest = (low * m + b, high * m + b) if m >= 0 else (high * m + b, low * m + b)
        if lowest < _INT16_MIN:
            lowest = int(lowest_of(stored, axis=None)) * m + b
        if highest > _INT16_MAX:
            highest = int(highest_of(stored, axis=None)) * m + b
    if lowest < _INT16_MIN or highest > _INT16_MAX:
        raise NeedsFloat


def rescale16_in_place(out: np.ndarray, m: int, b: int) -> None:
    """``out`` (int16, holding the stored values' 16 bits) ← stored × ``m`` + ``b``, wrapping: exact
    once :func:`check_fits_int16` has passed (uint16 read as int16 is the same value modulo 2¹⁶)."""
    if m == 1:
        np.add(out, wrapped16(b), out=out)
    else:
        np.multiply(out, wrapped16(m), out=out)
        out += wrapped16(b)


def takes(instance: Instance, frames: list[int], hu: np.ndarray) -> bool:
    """Whether :func:`read_into_slice` can read this file's ``frames`` (frame indices) into ``hu``,
    from what the scan recorded: one frame of 16-bit, one-sample native pixels of the volume's
    size, Little Endian, its Pixel Data located, its bytes stored as they are, into int16."""
    f, member = instance.facts, instance.member
    return (
        _LITTLE_HOST
        and hu.dtype == np.int16
        and frames == [0]
        and instance.pixel_offset is not None
        and member.span is not None
        and f.transfer_syntax in _LITTLE
        and f.bits_allocated == 16
        and 0 < (f.bits_stored or 16) <= 16
        and f.samples_per_pixel == 1
        and f.number_of_frames == 1
        and (f.rows, f.cols) == hu.shape[1:]
    )


def read_into_slice(instance: Instance, out: np.ndarray, slope: float, intercept: float) -> bool:
    """Read the file's one frame into ``out`` (a C-contiguous int16 slice of the volume) and rescale
    it there; False, having written nothing that counts, when its bytes are not laid out as
    :func:`takes` expects (the general path decodes it then, and says what is wrong).

    Raises what reading the member raises (a bad CRC-32 as :meth:`Member.data` does) and
    :class:`NeedsFloat`; ``slope`` and ``intercept`` are whole numbers (the int16 volume's rule).
    """
    f, member, at = instance.facts, instance.member, instance.pixel_offset
    assert at is not None and member.span is not None
    start = at + (8 if f.implicit else 12)
    if start + out.nbytes > member.size:
        return False  # cut short or of another size: the general path says which
    head, _ = member.read_into(start, out.data.cast("B"))  # the CRC-32 checked over the whole
    element = bytes(head[at:start])  # the Pixel Data element's header: tag, (VR, reserved,) length
    if element[:4] != PIXEL_DATA_TAG or not (
        f.implicit or (element[4:6] in (b"OB", b"OW") and element[6:8] == b"\0\0")
    ):
        return False
    (length,) = _UL.unpack_from(element, start - at - 4)
    if length != out.nbytes:
        return False  # encapsulated or of another size: the general path says which
    stored = out if f.pixel_representation == 1 else out.view(np.uint16)
    bits = f.bits_stored or 16
    if bits < 16:  # the bits above BitsStored are not part of the value
        if f.pixel_representation == 1:
            np.left_shift(stored, 16 - bits, out=stored)
            np.right_shift(stored, 16 - bits, out=stored)
        else:
            np.bitwise_and(stored, (1 << bits) - 1, out=stored)
    m, b = int(slope), int(intercept)
    check_fits_int16(stored, m, b, bits)
    rescale16_in_place(out, m, b)
    return True
