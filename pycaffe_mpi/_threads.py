"""BLAS threads per MPI rank: cores / ranks on the node, set before NumPy loads OpenBLAS.

When an MPI launcher started this process and the user set none of ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, each of the node's ranks gets an equal share of the
cores, so three ranks on two cores do not run six BLAS threads against each other. Setting any
of those variables yourself turns this off.
"""

from __future__ import annotations

import os

_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_LOCAL_RANKS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE")


def share_cores_between_ranks() -> int | None:
    """Set the BLAS thread count for this rank; returns it, or None when left alone."""
    if any(v in os.environ for v in _VARS):
        return None
    local = next((os.environ[v] for v in _LOCAL_RANKS if v in os.environ), None)
    if local is None:
        return None
    try:
        n_local = max(1, int(local))
    except ValueError:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // n_local)
    for v in _VARS:
        os.environ[v] = str(threads)
    return threads
