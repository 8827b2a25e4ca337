"""Names are bytes: file, folder and ZIP member names shown as text without losing the bytes.

On Linux a file name is a byte string. Python hands names that are not valid UTF-8 (a Latin-1
``ü`` is the single byte 0xFC) over as ``str`` with *surrogate escapes* (``"M\\udcfcller"``);
such a string cannot be encoded as UTF-8, so SQLite, JSON, Excel and log files refuse it. Every
name is therefore turned into two things before anything else touches it:

* its **display name** (:func:`display_name`): the name decoded as UTF-8, every byte that does not
  decode shown as ``\\xNN`` (``M\\xfcller_Thorax.zip``), and every control character (newline,
  tab, escape, the Unicode line separators) shown as a Python escape (``\\n``, ``\\x1b``,
  ``\\u2028``), so a name never splits a log line or breaks a spreadsheet cell. A valid UTF-8
  name without control characters is shown unchanged. Always valid text; never raises.
* its **raw bytes** (:func:`raw_name`), stored as lowercase hex (:func:`name_bytes_hex`, read back
  with :func:`name_from_hex`): the exact bytes, whatever the encoding (UTF-8, Latin-1, CP437,
  Shift-JIS or no encoding at all).
"""

from __future__ import annotations

import os
import unicodedata

_ESCAPE_FIRST, _ESCAPE_LAST = 0xDC80, 0xDCFF  # surrogate escapes of the bytes 0x80..0xFF
_SURROGATE_FIRST, _SURROGATE_LAST = 0xD800, 0xDFFF
_CONTROL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})  # C0/C1 controls, DEL, U+2028, U+2029

Name = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def raw_name(name: Name) -> bytes:
    """The bytes a name stands for: ``bytes`` as given, ``str`` as the filesystem encodes it.

    Surrogate escapes become the bytes they stand for (``"\\udcfc"`` → ``b"\\xfc"``); a lone
    surrogate that is not an escape (possible only in text that never came from a file name)
    is kept as its UTF-8-style three bytes. Never raises.
    """
    value = os.fspath(name)
    if isinstance(value, bytes):
        return value
    try:
        return os.fsencode(value)
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def display_name(name: Name) -> str:
    """The name as valid, single-line text: undecodable bytes as ``\\xNN``, controls escaped.

    ``display_name(b"M\\xfcller.zip") == display_name("M\\udcfcller.zip") == "M\\\\xfcller.zip"``.
    """
    value = os.fspath(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    return display_text(value)


def display_text(text: str) -> str:
    """Any text (a name, an error message, a log line) as valid UTF-8 on one line.

    Surrogate escapes show the byte they stand for (``\\xfc``), other lone surrogates their code
    point (``\\ud800``), control characters their Python escape (``\\n``, ``\\x1b``, ``\\u2028``).
    Text without surrogates or control characters is returned unchanged. Never raises.
    """
    if text.isprintable() or not any(_needs_escape(ch) for ch in text):
        return text
    return "".join(_escaped(ch) if _needs_escape(ch) else ch for ch in text)


def escape_surrogates(text: str) -> str:
    """``text`` with only its surrogates escaped (as :func:`display_text` does): storable as UTF-8.

    For text that may keep its line breaks (error messages in SQLite); names use :func:`display_name`.
    """
    if not any(_SURROGATE_FIRST <= ord(ch) <= _SURROGATE_LAST for ch in text):
        return text
    return "".join(_escaped(ch) if _SURROGATE_FIRST <= ord(ch) <= _SURROGATE_LAST else ch for ch in text)


def name_bytes_hex(name: Name) -> str:
    """The raw bytes of a name as lowercase hex (``"4dfc"`` for ``b"M\\xfc"``): the stored form."""
    return raw_name(name).hex()


def name_from_hex(stored: str) -> bytes:
    """The raw bytes back from :func:`name_bytes_hex` (``ValueError`` when ``stored`` is not hex)."""
    return bytes.fromhex(stored)


def is_text(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8 as it is (no surrogates), i.e. SQLite and JSON take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _needs_escape(ch: str) -> bool:
    code = ord(ch)
    if _SURROGATE_FIRST <= code <= _SURROGATE_LAST:
        return True
    return unicodedata.category(ch) in _CONTROL_CATEGORIES


def _escaped(ch: str) -> str:
    code = ord(ch)
    if _ESCAPE_FIRST <= code <= _ESCAPE_LAST:
        return f"\\x{code - 0xDC00:02x}"
    if _SURROGATE_FIRST <= code <= _SURROGATE_LAST:
        return f"\\u{code:04x}"
    return ch.encode("unicode_escape").decode("ascii")
