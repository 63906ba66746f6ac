"""Process-wide settings of a node process: transparent huge pages and the garbage collector.

Both were found by timing the stages of one RICORD series (docs/experiments.md, sixteenth
session): the kernel time the node spent compacting memory for numpy's huge pages, and full
garbage collections that walked the half million objects of the start-up (torch, OpenVINO,
pydicom, the model) every second series.
"""

from __future__ import annotations

import gc
import logging
import os

logger = logging.getLogger(__name__)

#: numpy's own switch (read when numpy is imported); a value set by the site is kept.
HUGE_PAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"


def no_numpy_huge_pages() -> None:
    """Let numpy, once imported, not ask the kernel for transparent huge pages for its large
    arrays, unless ``NUMPY_MADVISE_HUGEPAGE`` is set already (numpy reads it at import, so
    call this before anything imports numpy; the decode workers inherit it).

    With the kernel's default THP defrag ("madvise") a page fault in such an array may
    compact memory first. On the 2-core test machine that made load, lung mask and SEG of a
    300-slice series 0.5 to 1.6 s slower together, all of it kernel time.
    """
    os.environ.setdefault(HUGE_PAGE_ENV, "0")


def freeze_startup_objects() -> int:
    """Keep every object alive now out of the collector's full passes; their number.

    Call once the model is loaded: the modules, the model and the code tables live as long
    as the process, and a full collection then walks only what the series create (0.02 s
    instead of 0.2 s with 520,000 start-up objects).
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%d start-up objects kept out of garbage collection", frozen)
    return frozen
