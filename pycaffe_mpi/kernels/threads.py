"""Intra-layer parallelism on the host: one layer's work split over the batch between threads.

BLAS alone parallelises only the matrix products; the rest of a CPU step (im2col and col2im
copies, pooling, ReLU, BatchNorm, the layout transposes) ran on one core. Here a layer splits
its images (or channels) into ``T`` contiguous parts and runs part ``i`` on lane ``i``: lane 0 on
the calling thread, the others on a pool of ``T − 1`` worker threads. While the parts run, BLAS
is held at one thread, so every core runs one single-threaded product on its own part and its
own cache-sized scratch (NumPy's copies, ufuncs and matmul, and the numba kernels, all release
the GIL). CIFAR10-Quick, batch 100, 2 cores: one thread 105 ms a step, two BLAS threads 73 ms.

BLAS stays at one thread for the whole process once a split call has run with ``T > 1`` (and
goes back to its own count with :func:`set_count(1) <set_count>`): matrix products outside a
split call run on one core. NOTE: switching it back to ``T`` threads between split calls woke
OpenBLAS's worker threads, which then spin-wait for work on the other core while the next
layer's lanes want it: the CIFAR10-Quick step went from 72 to 100-113 ms that way.

``T`` is the BLAS thread count this process was given (``OPENBLAS_NUM_THREADS`` /
``OMP_NUM_THREADS``, or all cores; under ``mpiexec`` cores / ranks, see ``_threads``), so a
rank never runs more threads than its share of the cores; :func:`set_count` overrides it.

Results do not depend on ``T`` beyond floating-point summation order: a part computes what the
whole batch would for its images, and sums over parts (weight gradients, statistics) are added
in lane order, so a run is deterministic for a given ``T``.

Only host (NumPy) code calls this; on a GPU the layers' kernels cover the batch themselves.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")

_state = threading.local()  # .inside: this thread runs a part of a split call
_lock = threading.Lock()
_count: int | None = None
_pool: ThreadPoolExecutor | None = None
_blas: Any = None  # threadpoolctl's OpenBLAS/BLAS controllers, found once
_blas_own: list[int] = []  # their thread counts before we held them at one
_blas_held = False


def _blas_controllers() -> list[Any]:
    global _blas
    if _blas is None:
        import threadpoolctl  # imported on first use: `import pycaffe_mpi` does not pay for it

        _blas = [c for c in threadpoolctl.ThreadpoolController().lib_controllers
                 if c.user_api == "blas"]
        _blas_own[:] = [c.num_threads for c in _blas]
    return _blas


def _hold_blas(hold: bool) -> None:
    """BLAS at one thread (``hold``) or back at its own count."""
    global _blas_held
    if hold == _blas_held:
        return
    for c, own in zip(_blas_controllers(), _blas_own):
        c.set_num_threads(1 if hold else own)
    _blas_held = hold


def _default_count() -> int:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def count() -> int:
    """``T``: the number of lanes a split call uses (1: everything runs on the caller)."""
    global _count
    if _count is None:
        _count = _default_count()
    return _count


def set_count(n: int | None) -> None:
    """Use ``n`` lanes from now on (``None``: back to the BLAS thread count)."""
    global _count, _pool
    if n is not None and n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _count = n
        if _blas_held and count() == 1:
            _hold_blas(False)


def _reset_after_fork() -> None:  # a forked child has none of the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def split(n: int, parts: int | None = None, grain: int = 1) -> list[tuple[int, int]]:
    """``[(lo, hi), …]``: ``0..n`` in at most ``parts`` (default :func:`count`) contiguous,
    non-empty ranges of nearly equal size, each at least ``grain`` long where ``n`` allows."""
    parts = count() if parts is None else parts
    parts = max(1, min(parts, n // max(1, grain))) if n > 0 else 1
    step, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + step + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def lanes_busy() -> bool:
    """True on a thread that is running a part of a split call (a nested call runs inline)."""
    return getattr(_state, "inside", False)


def run(fn: Callable[[int, int, int], R], n: int, grain: int = 1,
        parts: int | None = None) -> list[R]:
    """``[fn(lane, lo, hi) for each part of split(n)]``, the parts side by side.

    ``fn`` must touch only its own items (and scratch of its own ``lane``); what it returns
    comes back in lane order. The first exception raised by any part is raised here once every
    part has ended. Called from inside a part, or with one lane, it runs the parts in turn on
    the calling thread. The first call with ``T > 1`` holds BLAS at one thread (module doc).
    """
    ranges = split(n, parts, grain)
    if len(ranges) == 1 or lanes_busy():
        return [fn(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
    pool = _get_pool()
    _hold_blas(True)
    futures: list[Future] = [pool.submit(_part, fn, i, lo, hi)
                             for i, (lo, hi) in enumerate(ranges[1:], start=1)]
    first: BaseException | None = None
    results: list[Any] = []
    try:
        results.append(_part(fn, 0, *ranges[0]))
    except BaseException as e:  # re-raised below, after the others end
        first = e
        results.append(None)
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as e:
            first = first or e
            results.append(None)
    if first is not None:
        raise first
    return results


def _part(fn: Callable[[int, int, int], R], lane: int, lo: int, hi: int) -> R:
    _state.inside = True
    try:
        return fn(lane, lo, hi)
    finally:
        _state.inside = False


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, count() - 1),
                                       thread_name_prefix="pycaffe-lane")
        return _pool
