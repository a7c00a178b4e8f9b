"""SharedDB's reference counts survive a release re-entered on the same thread (a finalizer
run by a garbage collection inside the locked section), which once deadlocked a test run."""

from __future__ import annotations

import threading

from pycaffe_mpi.datasets.db import SharedDB


class _Env:
    def __init__(self, on_close=None) -> None:
        self.closed, self.on_close = False, on_close

    def close(self) -> None:
        self.closed = True
        if self.on_close:
            self.on_close()


def test_a_release_inside_a_release_is_deferred_not_deadlocked(monkeypatch) -> None:
    inner = _Env()
    outer = _Env(on_close=lambda: SharedDB.release(inner))  # runs with the lock held
    monkeypatch.setattr(SharedDB, "_open", {"/outer": [outer, 1], "/inner": [inner, 1]})
    done = threading.Event()

    def release() -> None:
        SharedDB.release(outer)
        done.set()

    t = threading.Thread(target=release, daemon=True)
    t.start()
    assert done.wait(10), "SharedDB.release deadlocked when re-entered"
    assert outer.closed and inner.closed and SharedDB._open == {}
