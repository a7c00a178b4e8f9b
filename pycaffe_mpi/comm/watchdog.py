"""A collective timeout: name the rank that never arrived, then end the job.

A rank that dies takes the job down (the launcher sees it go; an exception aborts through
:func:`pycaffe_mpi.comm.abort_on_uncaught_exceptions`). A rank that is alive but stuck (a
dead-locked data source, a user layer waiting on a network share, a debugger) leaves its
peers waiting in a collective forever. :class:`Watchdog` bounds that wait.

How: each blocking collective of :class:`~pycaffe_mpi.comm.MPIComm` marks itself on the
watchdog (two attribute writes: the comm layers keep their speed). A daemon thread wakes a few
times per timeout; when this rank has waited longer than the timeout it asks every peer of that
collective, over a private duplicate of the world communicator, where it is (the peers' watchdog
threads answer from their own marks), prints one ``[rank r/N]`` message naming the collective,
its layer and the rank(s) that never arrived with what they are doing, and aborts the job.
Asking needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default); without it the message names the
collective only.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

_QUERY, _REPLY = 7001, 7002
_ASK_S = 3.0  # how long to wait for the peers' answers


class Watchdog:
    """Watches this rank's blocking collectives (see the module docstring).

    Args:
        mpi_comm: the mpi4py world communicator (duplicated here: collective).
        timeout: seconds a collective may wait before the job is ended.
        abort: ends the job (``MPIComm.abort``).
    """

    def __init__(self, mpi_comm: Any, timeout: float, abort: Any) -> None:
        from mpi4py import MPI

        self.timeout = float(timeout)
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.side = mpi_comm.Dup()
        self.can_ask = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.abort = abort
        # (what, members' world ranks, sequence key, start time) of the collective in progress
        self.current: tuple[str, tuple[int, ...], tuple, float] | None = None
        self.last: tuple[str, float] | None = None
        self._sends: list[Any] = []  # pending isend requests: they own their buffers
        self._stop = threading.Event()
        self._fired = False
        self.thread = threading.Thread(target=self._run, name="pycaffe-collective-watchdog",
                                       daemon=True)
        self.thread.start()
        # NOTE: registered after mpi4py's own exit hook, so it runs first: the thread must not
        # touch MPI once MPI_Finalize has begun
        atexit.register(self.stop)

    # -- marks, from the main thread ------------------------------------------------------------
    def enter(self, what: str, members: Sequence[int], key: tuple) -> None:
        self.current = (what, tuple(members), key, time.monotonic())

    def leave(self) -> None:
        cur = self.current
        if cur is not None:
            self.last = (cur[0], time.monotonic())
        self.current = None

    def stop(self) -> None:
        """Stop the thread (and wait for it, unless called from it)."""
        self._stop.set()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5.0)

    # -- the thread ----------------------------------------------------------------------------
    def _describe(self) -> tuple:
        cur, last = self.current, self.last
        now = time.monotonic()
        if cur is not None:
            return ("in", cur[0], cur[2], now - cur[3])
        if last is not None:
            return ("out", last[0], None, now - last[1])
        return ("out", None, None, None)

    def _serve(self) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while self.side.Iprobe(source=MPI.ANY_SOURCE, tag=_QUERY, status=status):
            src = status.Get_source()
            self.side.recv(source=src, tag=_QUERY)
            self._send(self._describe(), src, _REPLY)

    def _send(self, obj: Any, dest: int, tag: int) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.side.isend(obj, dest=dest, tag=tag))

    def _ask(self, peers: Sequence[int]) -> dict[int, tuple | None]:
        reqs = {}
        for r in peers:
            self._send(None, r, _QUERY)
            reqs[r] = self.side.irecv(source=r, tag=_REPLY)
        answers: dict[int, tuple | None] = dict.fromkeys(peers)
        deadline = time.monotonic() + _ASK_S
        pending = dict(reqs)
        while pending and time.monotonic() < deadline:
            for r, req in list(pending.items()):
                done, value = req.test()
                if done:
                    answers[r] = value
                    del pending[r]
            self._serve()  # peers that time out too ask this rank at the same moment
            time.sleep(0.01)
        return answers

    def _run(self) -> None:
        period = max(0.05, min(1.0, self.timeout / 4))
        while not self._stop.wait(period):
            try:
                if self.can_ask:
                    self._serve()
                cur = self.current
                if cur is None or self._fired or time.monotonic() - cur[3] < self.timeout:
                    continue
                self._fired = True
                self._report(cur)
            except Exception as e:  # never let the watchdog die silently
                sys.stderr.write(f"[rank {self.rank}/{self.size}] collective watchdog: {e}\n")
                sys.stderr.flush()

    def _report(self, cur: tuple[str, tuple[int, ...], tuple, float]) -> None:
        what, members, key, start = cur
        waited = time.monotonic() - start
        peers = [r for r in members if r != self.rank]
        lines = []
        if self.can_ask:
            answers = self._ask(peers)
            for r in peers:
                a = answers[r]
                if a is None:
                    lines.append(f"rank {r} never arrived and does not answer (busy in code that "
                                 "holds the Python interpreter, or gone)")
                elif a[0] == "in" and a[2] == key:
                    continue  # it is waiting in the same collective
                elif a[0] == "in":
                    lines.append(f"rank {r} never arrived: it waits in another collective, "
                                 f"{a[1]}, for {a[3]:.1f} s")
                else:
                    since = "" if a[3] is None else \
                        f" (its last one, {a[1]}, ended {a[3]:.1f} s ago)"
                    lines.append(f"rank {r} never arrived: it is computing, not in a "
                                 f"collective{since}")
        if not lines:
            lines.append(f"one of ranks {peers} never arrived")
        tag = f"[rank {self.rank}/{self.size}]"
        msg = (f"{tag} error: collective timeout: waited {waited:.1f} s (--collective_timeout "
               f"{self.timeout:g}) in {what}; " + "; ".join(lines) + ". Ending the job.\n")
        sys.stderr.write(msg)
        sys.stderr.flush()
        from pycaffe_mpi.comm import hard_exit

        try:
            self.abort(124)
        finally:
            hard_exit(124)
