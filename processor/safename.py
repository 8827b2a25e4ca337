"""``safe_name``: any text → a file-name part that is safe on every file system (a kernel module).

Used for the files ctwatch names after something it was given (a step id, an input's name, a
series reference): runs of anything but ASCII letters, digits, ``_``, ``.`` and ``-`` become one
``_``, the result is cut to 120 characters, and it is never empty.
"""

from __future__ import annotations

import re

MAX_LENGTH = 120


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:MAX_LENGTH] or "unnamed"
