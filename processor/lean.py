"""pydicom imported without ``requests`` and ``tqdm``: installed by ``processor/__init__.py``.

Importing pydicom imports ``pydicom.data.download`` (its pixel-data code looks up palette files
through ``pydicom.data``), and that module imports ``requests`` and ``tqdm`` when they are
installed, only to download pydicom's own test files — which ctwatch never does. ``requests``
(with urllib3, charset-normalizer, idna, certifi) is installed here for dicomweb-client, and cost
every ``process`` call, daemon start and CPU pool process 0.13-0.3 CPU-s (2-core AMD EPYC, medians
of 7; issue 18: import only what runs).

So while ``pydicom.data.download`` is being executed (its module is in :data:`sys.modules`
with ``__spec__._initializing`` set, as importlib marks a module until its code has run), the
finder below answers an import of ``requests`` or ``tqdm`` with :class:`ModuleNotFoundError`,
which that module catches: it then records ``HAVE_REQUESTS = False`` and would download with
:mod:`urllib.request`. A finder is consulted only for a module not yet in :data:`sys.modules`
(Python reference, "The import system", 5.3), so where ``requests`` is already loaded nothing
changes, and every other import of it — dicomweb-client's, at any other time — is untouched. The
finder removes itself once pydicom's download module has been imported. A thread importing
``requests`` for the first time during that very import would get the error: the daemon, its CPU
pool processes and ``process`` import pydicom at start-up, in the main thread, before other
threads run; a Dask worker (``ctwatch worker``) imports it with its first batch, and nothing in a
worker imports ``requests``.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

HIDDEN = frozenset({"requests", "tqdm"})
_DOWNLOAD = "pydicom.data.download"


class PydicomWithoutDownloads:
    """A :data:`sys.meta_path` finder refusing :data:`HIDDEN` while ``pydicom.data.download`` runs."""

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        download = sys.modules.get(_DOWNLOAD)
        if download is None:
            return None  # an import before or apart from pydicom's: left alone
        if getattr(getattr(download, "__spec__", None), "_initializing", False):
            if name in HIDDEN:
                raise ModuleNotFoundError(
                    f"{name} is not imported for pydicom's test-file downloads", name=name
                )
            return None
        self.remove()  # pydicom's download module has been imported: nothing more to hide
        return None

    def remove(self) -> None:
        # a new list, not ``sys.meta_path.remove``: the import system may be iterating over the
        # current one at this very moment (this finder is asked from inside that loop), and
        # removing an item from it would make the loop skip the next finder for that import
        if self in sys.meta_path:
            sys.meta_path = [f for f in sys.meta_path if f is not self]


def install() -> None:
    """Put the finder first in :data:`sys.meta_path` unless pydicom's download module is imported."""
    if _DOWNLOAD in sys.modules or any(isinstance(f, PydicomWithoutDownloads) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, PydicomWithoutDownloads())
