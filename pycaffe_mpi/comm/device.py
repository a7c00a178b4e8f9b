"""Where GPU ranks meet MPI: which device a rank drives, and how device arrays reach MPI.

Device choice: ranks on one node take devices by their *local* rank (their rank among the
processes of that node), ``device = local_rank mod devices``. The local rank comes from MPI
itself (the rank in a shared-memory split of the communicator) or, before or without MPI, from
the launcher's environment (Open MPI, MPICH/Hydra, MVAPICH, Slurm).

Buffers: :class:`Staging` is the one place that decides how a device array is handed to MPI.
With a CUDA-aware MPI the device buffer itself goes (after the producing stream is synchronised,
since MPI does not know CUDA streams); otherwise it is staged through a page-locked host buffer
(one per role, shape and dtype, reused every iteration), copied back after a receive. NumPy
arrays always go as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod

# Each launcher's name for a process's rank on its node.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                   "PMI_LOCAL_RANK", "SLURM_LOCALID")


def local_rank_from_env(environ: Any = None) -> int | None:
    """The local rank a launcher put in the environment, or None."""
    env = os.environ if environ is None else environ
    for var in LOCAL_RANK_VARS:
        value = env.get(var, "")
        if value.strip().isdigit():
            return int(value)
    return None


def local_rank(mpi_comm: Any = None) -> int:
    """This process's rank among the ranks on its node: from a shared-memory split of the
    mpi4py communicator ``mpi_comm`` when given, else the launcher's environment, else 0."""
    if mpi_comm is not None:
        from mpi4py import MPI

        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return int(node.Get_rank())
        finally:
            node.Free()
    env = local_rank_from_env()
    return 0 if env is None else env


def device_for_local_rank(local: int, n_devices: int) -> int:
    """The device a rank with local rank ``local`` drives (round robin over the node's GPUs)."""
    if n_devices <= 0:
        raise ValueError("no CUDA device to map ranks onto")
    return local % n_devices


def mpi_is_cuda_aware() -> bool:
    """Whether the MPI library takes device pointers (asked once, through mpi4py)."""
    try:
        from mpi4py import MPI

        return bool(getattr(MPI, "Query_cuda_support", lambda: False)())
    except Exception:
        return False


def contiguous(arr: Any) -> Any:
    """``arr`` as a C-contiguous array of its own module (MPI's buffer methods need one)."""
    if arr.flags.c_contiguous:
        return arr
    return backend_mod.get_array_module(arr).ascontiguousarray(arr)


class Staging:
    """How device arrays reach MPI, decided once (see the module doc).

    Args:
        cuda_aware: hand device buffers to MPI directly; None = ask the MPI library.
        alloc: ``(shape, dtype) -> host array`` for staging buffers (page-locked by default).
    """

    def __init__(self, cuda_aware: bool | None = None,
                 alloc: Callable[[Sequence[int], Any], np.ndarray] | None = None) -> None:
        self._cuda_aware = cuda_aware
        self._alloc = alloc or backend_mod.pinned_empty
        self._buffers: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}

    @property
    def cuda_aware(self) -> bool:
        if self._cuda_aware is None:
            self._cuda_aware = mpi_is_cuda_aware()
        return self._cuda_aware

    def _buffer(self, role: str, arr: Any) -> np.ndarray:
        key = (role, tuple(arr.shape), np.dtype(arr.dtype).str)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self._alloc(key[1], arr.dtype)
        return buf

    def to_mpi(self, arr: Any, role: str, fill: bool = True) -> tuple[Any, bool]:
        """``(what to hand MPI, staged)`` for ``arr``; ``fill``: the buffer carries ``arr``'s
        values (False for a receive buffer). ``role`` keeps a call's buffers apart (send and
        receive of one collective must not share one)."""
        if isinstance(arr, np.ndarray):
            return arr, False
        if self.cuda_aware:
            # NOTE: MPI reads device memory outside CUDA's stream order: the kernels that
            # wrote arr must have finished
            backend_mod.get_array_module(arr).cuda.get_current_stream().synchronize()
            return arr, False
        buf = self._buffer(role, arr)
        if fill:
            arr.get(out=buf)
        return buf, True

    @staticmethod
    def from_mpi(buf: Any, arr: Any, staged: bool) -> None:
        """After a receive: copy a staged buffer back into the device array ``arr``."""
        if staged:
            arr.set(buf)
