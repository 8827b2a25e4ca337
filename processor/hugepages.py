"""numpy's transparent-huge-page hint, off by default: no kernel memory compaction on the hot path.

On Linux, numpy asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on each
array of 4 MiB and more. Where ``/sys/kernel/mm/transparent_hugepage/defrag`` is ``madvise`` (the
usual default), the first touch of such an array makes the kernel compact memory, in the page
fault, until it has a free 2 MiB page. ctwatch allocates volumes of hundreds of MB in fresh
processes (the daemon's CPU pool processes, each ``process`` run). Measured on a 300 x 512^2
study (issue 18, item 3): where memory was fragmented, the lung mask's first call took 3 CPU-s,
2.2-2.5 of them the kernel compacting memory, and the hint off cut a ``process`` run's CPU time by
a quarter; where free memory held enough whole 2 MiB blocks (no compaction), the hint off made no
difference beyond noise (CPU medians of 3-5: 4.41 s on vs 4.50 s off, 3.86 vs 3.89; kernel time
about 0.35 s less, user time about as much more). So off: it bounds a cost that depends on the
machine's memory state, for a gain (fewer TLB misses) that arrays read once or twice barely see.

numpy's setting is the environment variable ``NUMPY_MADVISE_HUGEPAGE`` (``0`` off, ``1`` on),
read when numpy is imported (NumPy reference, "Global state: madvise hugepage on Linux",
https://numpy.org/doc/stable/reference/global_state.html). :func:`huge_pages_off_by_default` sets
it to ``0`` in ctwatch's environment, so numpy in this process and in every process it starts
(the CPU pool's, which are spawned) reads it; where numpy is already imported it also sets
numpy's flag directly. A value already in the environment is the operator's choice and is kept:
``NUMPY_MADVISE_HUGEPAGE=1`` in the service's environment turns the hint back on.
"""

from __future__ import annotations

import os
import sys

ENV = "NUMPY_MADVISE_HUGEPAGE"


def huge_pages_off_by_default() -> None:
    """Turn numpy's huge-page hint off for this process and its children, unless :data:`ENV` is set.

    Call it first thing at start-up, before large arrays exist (those already allocated keep
    their hint). Uses numpy's ``_set_madvise_hugepage`` only where numpy is already imported
    (the function is private: where a numpy lacks it, the environment variable still reaches
    the processes started from here).
    """
    if ENV in os.environ:
        return
    os.environ[ENV] = "0"
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return  # numpy reads the variable when it is imported
    core = getattr(numpy, "_core", None) or getattr(numpy, "core", None)  # numpy 2 / numpy 1.26
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)
