"""Stop on a non-finite loss and name where the NaN or Inf first appeared.

Caffe trains on through a NaN loss (every later iteration is wasted, and a diverged ensemble
even reports accuracy 1.0). By default the solver checks the loss of every forward/backward
pass (one float comparison; under MPI one tiny allgather, so every rank stops at the same
iteration) and, only once it trips, searches the net for the first non-finite value:

- forward order: each layer's parameters, then its tops;
- then backward order: each layer's bottom diffs (where it propagates) and parameter diffs.

The search reads the blobs the last pass left behind instead of re-running the pass: a second
forward would draw a new batch from the data layers, and under MPI it would need the other
ranks in the comm layers' collectives. ``nonfinite="continue"`` keeps Caffe's behaviour.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors

POLICIES = ("stop", "continue")


class NonFiniteError(errors.SolverError):
    """The loss became NaN or Inf (the message names the iteration and the first culprit)."""


def check_policy(policy: str) -> str:
    policy = str(policy).lower()
    if policy not in POLICIES:
        raise errors.SolverError(
            f'nonfinite must be one of {", ".join(POLICIES)}, got "{policy}"')
    return policy


def _finite(net: Any, arr: Any) -> bool:
    return bool(np.isfinite(np.asarray(net.backend.to_host(arr))).all())


def _where(net: Any, i: int) -> str:
    layer = net.layers[i]
    return errors.layer_where(layer.layer_param, getattr(layer, "location", ""))


def first_nonfinite(net: Any) -> str | None:
    """Where the first non-finite value of ``net``'s last forward/backward pass is, or None."""
    for i, layer in enumerate(net.layers):
        for j, p in enumerate(layer.blobs):
            if p.count and not _finite(net, p.data):
                return f"parameter {j} of {_where(net, i)} (data)"
        for name, t in zip(net.top_names[net.layer_names[i]], net.top_vecs[i]):
            if t.count and not _finite(net, t.data):
                return f'top "{name}" of {_where(net, i)} (forward)'
    for i in range(len(net.layers) - 1, -1, -1):
        if not net.layer_need_backward[i]:
            continue
        names = net.bottom_names[net.layer_names[i]]
        for j, (name, b) in enumerate(zip(names, net.bottom_vecs[i])):
            if net.bottom_need_backward[i][j] and b.count and not _finite(net, b.diff):
                return f'bottom "{name}" diff of {_where(net, i)} (backward)'
        for j, p in enumerate(net.layers[i].blobs):
            if p.count and not _finite(net, p.diff):
                return f"parameter {j} of {_where(net, i)} (gradient)"
    return None


class LossGuard:
    """Checks each pass's loss; under MPI the ranks agree on the check in one allgather.

    Args:
        policy: "stop" (raise :class:`NonFiniteError` on every rank) or "continue" (Caffe).
        comm: the world communicator (None or size 1: no collective).
    """

    def __init__(self, policy: str, comm: Any = None) -> None:
        self.policy = check_policy(policy)
        self.comm = comm if comm is not None and comm.size > 1 else None
        if self.comm is not None:
            self._send = np.zeros(1, np.float64)
            self._recv = np.zeros((self.comm.size, 1), np.float64)
        self._pending: list[Any] = []  # GPU losses whose finiteness has not reached the host

    def _tripped(self, loss: Any) -> bool:
        """Whether ``loss`` (or, on a GPU, a recent pass's loss) is NaN or Inf.

        NOTE: a GPU loss is a device scalar; reading it now would stop the device every pass,
        so its check is copied behind the queued work (backend.LateFlag) and seen a pass or two
        later; the run then stops there, naming where the non-finite values are.
        """
        if isinstance(loss, (float, int, np.generic)):
            return not math.isfinite(loss)
        xp = backend_mod.get_array_module(loss)
        self._pending.append(backend_mod.LateFlag(xp, ~xp.isfinite(loss)))
        seen = [f.value() for f in self._pending]
        self._pending = [f for f, v in zip(self._pending, seen) if v is None]
        return any(seen)

    def check(self, net: Any, loss: float, iteration: int) -> None:
        """Raise :class:`NonFiniteError` when ``loss`` (on any rank) is NaN or Inf."""
        if self.policy != "stop":
            return
        bad = self._tripped(loss)
        if self.comm is None:
            if bad:
                raise NonFiniteError(self._message(iteration, [(0, loss, first_nonfinite(net))]))
            return
        self._send[0] = 1.0 if bad else 0.0
        self.comm.allgather(self._send, self._recv)
        if not self._recv.any():
            return
        # tripped somewhere: every rank searches its own net and all learn every finding
        found = self.comm.allgather_obj((float(loss), first_nonfinite(net)))
        reports = [(r, lo, where) for r, (lo, where) in enumerate(found)
                   if where is not None or not math.isfinite(lo)]
        raise NonFiniteError(self._message(iteration, reports))

    @staticmethod
    def _message(iteration: int, reports: list[tuple[int, float, str | None]]) -> str:
        parts = []
        for rank, loss, where in reports:
            on = f"rank {rank}: " if len(reports) > 1 or rank else ""
            what = f"loss = {loss}" if not math.isfinite(loss) else "loss finite"
            parts.append(f"{on}{what}; first non-finite value: {where or 'not found'}")
        return (f"iteration {iteration}: the loss became non-finite ({'; '.join(parts)}). "
                "Lower base_lr or clip_gradients, check the input data, or keep training as "
                "Caffe does with --nonfinite continue (Solver(nonfinite='continue'))")
