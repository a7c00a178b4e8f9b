"""Communication between MPI processes: the only package that imports mpi4py (lazily).

:class:`Comm` is the small interface the net and the comm layers use. :class:`SelfComm` is the
size-1 stand-in for single-process runs (no MPI needed); :class:`MPIComm` wraps an mpi4py
communicator and moves arrays with the buffer (upper-case) methods on preallocated arrays, never
by pickling; only small metadata (shapes, flags, digests) goes through the pickle methods.
Device (CuPy) arrays reach MPI as :class:`pycaffe_mpi.comm.device.Staging` decides: directly when
MPI is CUDA-aware, else through pinned host buffers; ranks pick GPUs by local rank (same module).
Data-parallel replicas (:mod:`pycaffe_mpi.comm.replicas`) split the world into the ranks of one
replica and the ranks holding one model rank across replicas, and average gradients with a
bucketed non-blocking Allreduce.

:func:`world` gives the world communicator: MPI's when the process was started by ``mpiexec``
(or when asked for), the stand-in otherwise. Before MPI starts, :func:`world` sets MPICH's
``MPIR_CVAR_ENABLE_HEAVY_YIELD=1`` (unless the user set it) so ranks waiting in a collective
yield the CPU to computing ranks instead of spinning.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi.comm import device as device_mod
from pycaffe_mpi.comm import segments

# Environment variables a launcher sets in each rank it starts (MPICH/Hydra, PMIx, Open MPI).
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS")


def launched_by_mpiexec() -> bool:
    """True when this process was started by an MPI launcher."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


class Comm:
    """What the framework needs from a communicator.

    Array methods take NumPy (or, with a CUDA-aware MPI, CuPy) arrays and work in place.
    """

    rank: int = 0
    size: int = 1

    def bcast(self, buf: Any, root: int) -> None:
        """``buf`` on every rank becomes ``buf`` of ``root``."""
        raise NotImplementedError

    def bcast_nowait(self, buf: Any, root: int) -> Pending:
        """:meth:`bcast` where the root does not wait for the others to take the data.

        Other ranks return with ``buf`` filled, as with :meth:`bcast`. The root returns once
        its sends are started; ``buf`` must then stay unchanged until the returned
        :class:`Pending`'s ``wait()`` (which the root must call before it writes ``buf``
        again, and at the latest before its next operation on ``buf``'s memory). Messages of
        two such broadcasts from one root match in call order (every rank calls them in the
        same order). This default waits at once.
        """
        self.bcast(buf, root)
        return DONE

    def reduce_sum(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        """``recvbuf`` on ``root`` = Σ over ranks of ``sendbuf``."""
        raise NotImplementedError

    def gather(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        """``recvbuf[i]`` on ``root`` = ``sendbuf`` of rank i (``recvbuf``: (size, *shape)).
        ``sendbuf`` None on the root: ``recvbuf[root]`` is left as it is (MPI_IN_PLACE)."""
        raise NotImplementedError

    def gather_checked(self, sendbuf: Any, header: np.ndarray, recvbuf: Any,
                       headers: np.ndarray, root: int) -> None:
        """A gather whose ranks also send a small header (say, their shape) to be checked.

        Every rank passes ``header`` (int64, (H,)); on return ``headers`` (int64, (size, H))
        holds every rank's header on every rank, so all can check them alike. On the root,
        ``recvbuf[i]`` = ``sendbuf`` of rank i for every rank i whose ``sendbuf`` has the size
        of ``recvbuf[i]``; a row whose sender's data has another size is left as it was (the
        headers tell). This default exchanges the headers first and gathers the data only
        when all headers agree; :class:`MPIComm` does it in one round for the root.
        """
        self.allgather(header, headers)
        if (headers == headers[0]).all():
            self.gather(sendbuf, recvbuf, root)

    def scatter(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        """``recvbuf`` on rank i = ``sendbuf[i]`` of ``root``."""
        raise NotImplementedError

    def allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        """``recvbuf[i]`` on every rank = ``sendbuf`` of rank i (``recvbuf``: (size, *shape))."""
        raise NotImplementedError

    def bcast_obj(self, obj: Any, root: int) -> Any:
        raise NotImplementedError

    def allgather_obj(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def gather_obj(self, obj: Any, root: int) -> list[Any] | None:
        raise NotImplementedError

    def create_group(self, ranks: Sequence[int]) -> Comm | None:
        """A communicator of ``ranks`` (in that order: ``ranks[i]`` gets group rank i).

        Collective over this communicator: every rank calls it, members get the new
        communicator and the others None.
        """
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def local_rank(self) -> int:
        """This process's rank among the processes of its node (picks its GPU)."""
        return device_mod.local_rank()

    def abort(self, code: int = 1) -> None:
        """End every process of the job now."""
        raise NotImplementedError

    @property
    def is_mpi(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank}/{self.size}>"


class Pending:
    """A started transfer (:meth:`Comm.bcast_nowait` on the root): ``wait()`` finishes it, after
    which its buffer may be written again. Waiting twice is allowed."""

    def wait(self) -> None:
        """Block until the transfer is complete (nothing to do for this finished one)."""


#: a transfer that is already complete
DONE = Pending()


def _copy(src: Any, dst: Any) -> None:
    if dst is not src:
        dst[...] = src


class SelfComm(Comm):
    """The size-1 stand-in: one process, every collective a local copy."""

    def __init__(self) -> None:
        self.rank, self.size = 0, 1

    def bcast(self, buf: Any, root: int) -> None:
        pass

    def reduce_sum(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        _copy(sendbuf, recvbuf)

    def gather(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        if sendbuf is not None:
            recvbuf[0, ...] = sendbuf

    def scatter(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        recvbuf[...] = sendbuf[0]

    def allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        recvbuf[0, ...] = sendbuf

    def bcast_obj(self, obj: Any, root: int) -> Any:
        return obj

    def allgather_obj(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_obj(self, obj: Any, root: int) -> list[Any] | None:
        return [obj]

    def create_group(self, ranks: Sequence[int]) -> Comm | None:
        return self if list(ranks) == [0] else None

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        hard_exit(code)


class MPIComm(Comm):
    """An mpi4py communicator behind the :class:`Comm` interface."""

    def __init__(self, comm: Any, staging: device_mod.Staging | None = None,
                 members: Sequence[int] | None = None, label: str = "the world") -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.staging = staging or device_mod.Staging()
        # for the collective watchdog: the members' world ranks and what this group is for
        self.members = list(members) if members is not None else list(range(self.size))
        self.label = label
        self._seq = 0

    def _call(self, what: str, fn: Any, /, *args: Any, seq: int | None = None,
              **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a blocking collective, marked on the watchdog if any.
        ``seq``: the number of an operation already counted (a root's late wait for its
        :meth:`bcast_nowait` sends), else the next number."""
        # NOTE: positional-only: Reduce's own keyword is ``op``
        w = _WATCHDOG
        if w is None:
            return fn(*args, **kwargs)
        if seq is None:
            self._seq += 1
            seq = self._seq
        w.enter(f"{what} #{seq} on {self.label} (world ranks {self.members})",
                self.members, (self.label, seq))
        try:
            return fn(*args, **kwargs)
        finally:
            w.leave()

    @property
    def is_mpi(self) -> bool:
        return True

    # NOTE: CuPy arrays go to MPI directly only when the MPI library is CUDA-aware; otherwise
    # they are staged through pinned host memory: self.staging decides (comm/device.py).
    def _host(self, arr: Any, role: str = "send", fill: bool = True) -> tuple[Any, bool]:
        return self.staging.to_mpi(arr, role, fill)

    def _back(self, host: Any, arr: Any, staged: bool) -> None:
        self.staging.from_mpi(host, arr, staged)

    def bcast(self, buf: Any, root: int) -> None:
        h, staged = self._host(buf, "bcast", fill=self.rank == root)
        self._call("Bcast", self.comm.Bcast, h, root=root)
        if self.rank != root:
            self._back(h, buf, staged)

    def bcast_nowait(self, buf: Any, root: int) -> Pending:
        # NOTE: the root posts one send per member and leaves; each member copies the data out
        # of the root's memory when it gets there (MPICH's single-copy path for large messages
        # on one node), so the root does not wait for a member that must first be scheduled
        # (3 ranks on 2 cores: CIFAR10-quick's pool2, 819 KB: the layer's forward on the root
        # 1.3-2.5 ms in a step -> 0.2-0.4 ms, its two copies included).
        # Device arrays take the blocking path: their staging buffers are shared.
        if self.size == 1 or not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
            self.bcast(buf, root)
            return DONE
        if self.rank != root:
            self._call("Bcast (receive)", self.comm.Recv, buf, source=root, tag=_BCAST_TAG)
            return DONE
        self._seq += 1  # counted here, where the members count their receive
        reqs = [self.comm.Isend(buf, dest=r, tag=_BCAST_TAG)
                for r in range(self.size) if r != root]
        return _Sends(self, reqs, self._seq)

    def reduce_sum(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        from mpi4py import MPI

        s, _ = self._host(sendbuf)
        s = device_mod.contiguous(s)
        if self.rank == root:
            if recvbuf is sendbuf and not isinstance(sendbuf, np.ndarray):  # one device array
                r, staged = s, s is not sendbuf
            else:
                r, staged = self._host(recvbuf, "recv", fill=False)
            if r is s or (isinstance(r, np.ndarray) and np.shares_memory(r, s)):
                self._call("Reduce", self.comm.Reduce, MPI.IN_PLACE, r, op=MPI.SUM, root=root)
            else:
                self._call("Reduce", self.comm.Reduce, s, r, op=MPI.SUM, root=root)
            self._back(r, recvbuf, staged)
        else:
            self._call("Reduce", self.comm.Reduce, s, None, op=MPI.SUM, root=root)

    def gather(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        if self.rank == root and sendbuf is None:
            from mpi4py import MPI

            # (a staged buffer is filled first: the root's row goes back to the device with
            # the rest)
            r, staged = self._host(recvbuf, "recv", fill=True)
            self._call("Gather", self.comm.Gather, MPI.IN_PLACE, r, root=root)
            self._back(r, recvbuf, staged)
            return
        s, _ = self._host(sendbuf)
        if self.rank == root:
            r, staged = self._host(recvbuf, "recv", fill=False)
            self._call("Gather", self.comm.Gather, device_mod.contiguous(s), r, root=root)
            self._back(r, recvbuf, staged)
        else:
            self._call("Gather", self.comm.Gather, device_mod.contiguous(s), None, root=root)

    def gather_checked(self, sendbuf: Any, header: np.ndarray, recvbuf: Any,
                       headers: np.ndarray, root: int) -> None:
        # NOTE: point to point, so the root waits for the members once (their header and data
        # arrive together) instead of in an Allgather of headers and then a Gather: the table
        # of headers goes back with one small Bcast the root does not wait in. A row whose
        # data has another size than expected is received into a throwaway buffer (probed
        # first), so a wrong shape never leaves MPI with a mismatched message.
        s, _ = self._host(sendbuf)
        s = device_mod.contiguous(s)
        if self.rank != root:
            def send() -> None:
                self.comm.Send(header, dest=root, tag=_HEADER_TAG)
                self.comm.Send(s, dest=root, tag=_GATHER_TAG)
                self.comm.Bcast(headers, root=root)

            self._call("Gather (checked)", send)
            return
        r, staged = self._host(recvbuf, "recv", fill=False)

        def receive() -> None:
            from mpi4py import MPI

            others = [i for i in range(self.size) if i != root]
            MPI.Request.Waitall([self.comm.Irecv(headers[i], source=i, tag=_HEADER_TAG)
                                 for i in others])
            headers[root] = header
            if r[root, ...].nbytes == s.nbytes:
                r[root, ...] = s.reshape(r[root, ...].shape)
            status = MPI.Status()
            for i in others:
                self.comm.Probe(source=i, tag=_GATHER_TAG, status=status)
                nbytes = status.Get_count(MPI.BYTE)
                row = r[i, ...]  # (an array view even for 0-axis rows)
                dst = row if nbytes == row.nbytes else np.empty(nbytes, np.uint8)
                self.comm.Recv(dst, source=i, tag=_GATHER_TAG)
            self.comm.Bcast(headers, root=root)

        self._call("Gather (checked)", receive)
        self._back(r, recvbuf, staged)

    def scatter(self, sendbuf: Any, recvbuf: Any, root: int) -> None:
        r, staged = self._host(recvbuf, "recv", fill=False)
        if self.rank == root:
            s, _ = self._host(sendbuf)
            self._call("Scatter", self.comm.Scatter, device_mod.contiguous(s), r, root=root)
        else:
            self._call("Scatter", self.comm.Scatter, None, r, root=root)
        self._back(r, recvbuf, staged)

    def allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        s, _ = self._host(sendbuf)
        r, staged = self._host(recvbuf, "recv", fill=False)
        self._call("Allgather", self.comm.Allgather, device_mod.contiguous(s), r)
        self._back(r, recvbuf, staged)

    def bcast_obj(self, obj: Any, root: int) -> Any:
        return self._call("bcast", self.comm.bcast, obj, root=root)

    def allgather_obj(self, obj: Any) -> list[Any]:
        return self._call("allgather", self.comm.allgather, obj)

    def gather_obj(self, obj: Any, root: int) -> list[Any] | None:
        return self._call("gather", self.comm.gather, obj, root=root)

    def create_group(self, ranks: Sequence[int]) -> Comm | None:
        from mpi4py import MPI

        group = self.comm.Get_group().Incl(list(ranks))
        new = self._call("Create", self.comm.Create, group)
        group.Free()
        if new == MPI.COMM_NULL:
            return None
        return MPIComm(new, self.staging, members=[self.members[r] for r in ranks],
                       label=f"a group of {self.label}")

    def barrier(self) -> None:
        self._call("Barrier", self.comm.Barrier)

    def local_rank(self) -> int:
        return device_mod.local_rank(self.comm)

    def abort(self, code: int = 1) -> None:
        segments.unlink_own()
        # NOTE: the launcher's proxies die with the job and drop output not yet forwarded (MPICH's
        # Hydra lost the failing rank's message in ~1 run of 4); a moment first lets them drain.
        time.sleep(0.2)
        self.comm.Abort(code)


# point-to-point tags: bcast_nowait's data, gather_checked's headers and data
_BCAST_TAG, _HEADER_TAG, _GATHER_TAG = 0x6263, 0x6768, 0x6764


class _Sends(Pending):
    """The root's started sends of one :meth:`MPIComm.bcast_nowait`."""

    def __init__(self, comm: MPIComm, requests: list[Any], seq: int) -> None:
        self._comm, self._requests, self._seq = comm, requests, seq

    def wait(self) -> None:
        if self._requests:
            from mpi4py import MPI

            requests, self._requests = self._requests, []
            self._comm._call("Bcast (root's sends)", MPI.Request.Waitall, requests,
                             seq=self._seq)


_WORLD: Comm | None = None
_WATCHDOG: Any = None  # the collective watchdog of this process, once started


def set_collective_timeout(comm: Comm, seconds: float | None) -> None:
    """End the job when one of this process's collectives waits longer than ``seconds``,
    naming the rank(s) that never arrived (:mod:`pycaffe_mpi.comm.watchdog`). Collective
    over ``comm`` (the world); None or <= 0 leaves it off; nothing to do without MPI."""
    global _WATCHDOG
    if not seconds or seconds <= 0 or not isinstance(comm, MPIComm) or comm.size <= 1:
        return
    from pycaffe_mpi.comm import watchdog

    if _WATCHDOG is not None:
        _WATCHDOG.timeout = float(seconds)
        return
    _WATCHDOG = watchdog.Watchdog(comm.comm, seconds, comm.abort)


def world(force_mpi: bool = False) -> Comm:
    """The world communicator: MPI's under ``mpiexec`` (or ``force_mpi``), else SelfComm."""
    global _WORLD
    if _WORLD is None:
        if force_mpi or launched_by_mpiexec():
            os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise ImportError("this process was started by mpiexec but mpi4py is not "
                                  "installed: pip install -e '.[mpi]'") from e
            _WORLD = MPIComm(MPI.COMM_WORLD)
        else:
            _WORLD = SelfComm()
    return _WORLD


def abort_on_uncaught_exceptions(comm: Comm) -> None:
    """Make an unhandled exception on any rank print a rank-tagged message and abort the job,
    so ``mpiexec`` exits non-zero within seconds instead of leaving the other ranks waiting."""
    if comm.size <= 1:
        return

    def hook(exc_type: type, exc: BaseException, tb: Any) -> None:
        tag = f"[rank {comm.rank}/{comm.size}]"
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write("".join(f"{tag} {line}\n" for line in text.rstrip().splitlines()))
        sys.stderr.flush()
        try:
            comm.abort(1)
        finally:
            # NOTE: MPICH's Abort can return to the caller; the message is already out, so
            # leave now rather than print an untagged second traceback
            hard_exit(1)

    sys.excepthook = hook
    _guard_os_exit(comm)


#: os._exit as Python provides it (the framework's own hard exits use it directly)
hard_exit = os._exit


def _running_layer(frame: Any) -> str:
    """``; in layer "x" (type T) forward`` when ``frame`` runs inside a Net's layer call."""
    from pycaffe_mpi import errors

    while frame is not None:
        name, local = frame.f_code.co_name, frame.f_locals
        if name in ("forward_from_to", "backward_from_to", "_setup_layer"):
            layer = local.get("layer")
            if layer is None and "self" in local and "i" in local:
                layer = local["self"].layers[local["i"]]
            if layer is not None and hasattr(layer, "layer_param"):
                method = {"_setup_layer": "setup"}.get(name, name.split("_")[0])
                return (f" in {errors.layer_where(layer.layer_param, layer.location)}'s "
                        f"{method}")
        frame = frame.f_back
    return ""


def _guard_os_exit(comm: Comm) -> None:
    """Make ``os._exit`` on one rank end the whole job non-zero, with a message.

    NOTE: ``os._exit`` skips every handler, and MPICH's launcher then ends the other ranks but
    may report success (status 0) for a job that never finished. Replacing ``os._exit`` in an
    MPI job is the only place left to say where it was called (file:line and the layer) and to
    abort with a non-zero status; the framework's own hard exits use :data:`hard_exit`.
    """

    owner = os.getpid()

    def guarded_exit(code: int) -> None:
        if os.getpid() != owner:  # a forked child (multiprocessing ends its workers this way)
            hard_exit(code)
        frame = sys._getframe(1)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        status = code or 1
        sys.stderr.write(f"[rank {comm.rank}/{comm.size}] error: os._exit({code}) called at "
                         f"{where}{_running_layer(frame)}; one MPI rank cannot leave alone, so "
                         f"the job ends (status {status})\n")
        sys.stderr.flush()
        try:
            comm.abort(status)
        finally:
            hard_exit(status)

    os._exit = guarded_exit
