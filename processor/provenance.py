"""What produced a stored number: the software versions recorded with every feature and latent row.

The model half of provenance is the sha256 of the checkpoint file, which each step computes for its
result JSON's ``models`` entry and passes on with its outputs (:mod:`processor.steps.ports`); this
module gives the other half. Versions are read from the installed distributions' metadata, so
nothing heavy (torch) is imported to learn them.
"""

from __future__ import annotations

import functools
from importlib import metadata

# distribution names, in the order the record lists them
DISTRIBUTIONS = ("ctwatch", "torch", "transformers", "lightgbm", "pydicom", "numpy", "scikit-learn")
NOT_INSTALLED = "not installed"


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, NOT_INSTALLED))
    return tuple(found)


def software_versions() -> dict[str, str]:
    """``{distribution: version}`` of ctwatch and the libraries that shape its numbers (computed
    once per process; ``"not installed"`` for an absent one). A new dict each call."""
    return dict(_versions())
