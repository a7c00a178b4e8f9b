"""Fault injection for the MPI failure tests: a pycaffe Python layer that breaks one rank.

Used from a prototxt (with this directory on ``PYTHONPATH``)::

    layer { name: "fault" type: "Python" bottom: "x" top: "y"
            python_param { module: "faults" layer: "Fault"
                           param_str: '{"rank": 1, "phase": "forward", "iter": 2}' } }

The layer is an identity (y = x, dx = dy) on every rank except world rank ``rank``, where it
fails once, in ``phase``:

- ``setup``: raises in ``setup`` (while the other ranks build their nets and meet in the comm
  layers' collectives);
- ``forward`` / ``backward``: raises in the ``iter``-th (0-based) forward / backward call;
- ``snapshot``: makes ``pycaffe_mpi.snapshot.write_proto_binary`` raise ``OSError`` on that rank, so
  its first snapshot fails (as a full disk or a vanished directory would);
- ``kill``: the process kills itself with SIGKILL in the ``iter``-th forward (no message, no
  clean-up: what the OOM killer or a node failure does);
- ``exit``: calls ``sys.exit(3)`` in the ``iter``-th forward;
- ``osexit``: calls ``os._exit(0)`` in the ``iter``-th forward (no clean-up, status 0);
- ``signal``: in the ``iter``-th forward, a SIGUSR1 handler that calls ``sys.exit(4)`` runs;
- ``stall``: sleeps 600 s in the ``iter``-th forward (alive but stuck, for the collective
  timeout);
- ``nan``: writes NaN into its top in the ``iter``-th forward and after;
- ``prefetch``: from setup on, the data prefetch thread of a ``Data`` layer on that rank raises
  on every batch it has not read yet (the net must read from a ``Data`` layer there);
- ``none``: never fails (the reference run).

The errors are plain ``RuntimeError``/``OSError``, not pycaffe errors, so the CLI's last line of
defence (the excepthook that prints a rank-tagged traceback and calls MPI Abort) is exercised.
"""

import json
import os
import signal
import sys
import time

import caffe

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi import snapshot as io_mod

PHASES = ("none", "setup", "forward", "backward", "snapshot", "kill", "exit", "osexit", "signal",
          "stall", "nan", "prefetch")


class Fault(caffe.Layer):
    """Identity, except that it fails on one rank in one phase (see the module docstring)."""

    def setup(self, bottom, top):
        p = json.loads(self.param_str)
        self.fail_rank = int(p["rank"])
        self.fail_phase = p["phase"]
        self.fail_iter = int(p.get("iter", 0))
        if self.fail_phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.fail_phase!r}")
        world = comm_mod.world()
        self.tag = f"[rank {world.rank}/{world.size}]"
        self.mine = world.rank == self.fail_rank
        self.forwards = self.backwards = 0
        if not self.mine:
            return
        if self.fail_phase == "setup":
            raise RuntimeError(f"injected fault in setup on {self.tag}")
        if self.fail_phase == "snapshot":
            tag = self.tag

            def broken_write(path, message):
                raise OSError(f"injected fault: cannot write snapshot {path} on {tag}")

            io_mod.write_proto_binary = broken_write
        if self.fail_phase == "prefetch":
            from pycaffe_mpi.layer_types import data as data_mod

            def broken_batch(prefetcher, records):
                raise RuntimeError("injected fault in the prefetch thread")

            data_mod._Prefetcher._batch = broken_batch

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        if self.mine and self.forwards == self.fail_iter:
            if self.fail_phase == "forward":
                raise RuntimeError(f"injected fault in forward #{self.forwards} on {self.tag}")
            if self.fail_phase == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail_phase == "exit":
                sys.exit(3)
            if self.fail_phase == "osexit":
                os._exit(0)
            if self.fail_phase == "signal":
                def leave(signum, frame):
                    sys.exit(4)

                signal.signal(signal.SIGUSR1, leave)
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)  # the handler runs before this returns
            if self.fail_phase == "stall":
                time.sleep(600)
        self.forwards += 1
        top[0].data[...] = bottom[0].data
        if self.mine and self.fail_phase == "nan" and self.forwards > self.fail_iter:
            top[0].data[...] = float("nan")

    def backward(self, top, propagate_down, bottom):
        if self.mine and self.fail_phase == "backward" and self.backwards == self.fail_iter:
            raise RuntimeError(f"injected fault in backward #{self.backwards} on {self.tag}")
        self.backwards += 1
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
