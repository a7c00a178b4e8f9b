"""MPIBroadcast / MPIGather across 2 and 3 ranks (tests/mpi/workers/layers.py)."""

from __future__ import annotations

import pytest

CASES = {
    "roundtrip": "forward and backward of both layers, 0-D to 5-D blobs, roots 0, 1, 2",
    "reshape": "the root's bottom changes shape between forwards; members' tops follow",
    "flags": "ranks without a loss of their own still run backward (flags agreed)",
    "gather_or": "a member's branch gets its gradient though the root's bottom needs none",
    "pdown_false": "propagate_down: false on the broadcast's root bottom, with and without "
                   "force_backward",
    "root_runs_ahead": "the broadcast's root writes its blob before the members have read it",
    "gather_drains": "gather_checked: a wrong-sized member is dropped, headers reach all",
    "bcast_order": "bcast_nowait: two outstanding broadcasts match in call order",
}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_layers(mpi, case, n):
    proc = mpi.run(n, "layers", case)
    mpi.assert_ok(proc, n, [case])


def test_subgroups_include_order_and_exclude(mpi):
    proc = mpi.run(3, "layers", "subgroup")
    mpi.assert_ok(proc, 3, ["subgroup"])


@pytest.mark.parametrize("n", [2, 3])
def test_numerical_adjoint_across_ranks(mpi, n):
    """Analytic gradients (x on rank 0, every rank's InnerProduct) = central differences of the
    global loss, with force_backward and with the Net's own (synced) flags."""
    proc = mpi.run(n, "adjoint", "adjoint", "adjoint_params")
    mpi.assert_ok(proc, n, ["adjoint", "adjoint_params"])
