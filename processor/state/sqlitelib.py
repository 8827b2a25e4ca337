"""sqlite-utils, imported without pandas: the one place ctwatch imports it from.

sqlite-utils imports pandas when pandas is installed (``sqlite_utils/db.py``, at import time),
only to map ``pandas.Timestamp`` values to a TEXT column in tables it creates from Python values;
ctwatch never hands it a pandas object. pandas is installed for the ``fit`` commands; loading it
cost every daemon start, CPU pool process and ``process`` run 0.2-0.35 s of CPU, 35-40 MB of
memory and 340 modules (pandas 3.1, medians of 7; issue 18: import only what runs).

So pandas is hidden while sqlite-utils is first imported: a ``None`` entry in :data:`sys.modules`
makes ``import pandas`` raise :class:`ModuleNotFoundError` (Python reference, "The import
system", 5.3.1 The module cache), which sqlite-utils catches and goes on without pandas. The
entry is removed right after, so a later ``import pandas`` (the ``fit`` commands) works. When
pandas is already loaded it is left alone.

The hiding happens once, at the first import of :mod:`processor.state`: in the main thread at
start-up (the daemon, a CPU pool process, a command), before other threads run; a thread that
imported pandas at that very moment would get the ImportError.
"""

from __future__ import annotations

import sys

_hide = "pandas" not in sys.modules
if _hide:
    sys.modules["pandas"] = None  # type: ignore[assignment]
try:
    import sqlite_utils
    from sqlite_utils import Database
    from sqlite_utils.db import NotFoundError
finally:
    if _hide and "pandas" in sys.modules and sys.modules["pandas"] is None:
        del sys.modules["pandas"]

__all__ = ["Database", "NotFoundError", "sqlite_utils"]
