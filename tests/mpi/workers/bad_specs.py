"""Mistakes that must fail on every rank together, with one clear message, and end the job.

Each case builds (and runs) a faulty net. Every rank catches the error, prints
``[rank r] ERROR <type>: <message>``, meets the others at a barrier (so all lines are out) and
re-raises: ``python -m mpi4py`` aborts the job and mpiexec exits non-zero. A rank that does not
fail says ``NO ERROR`` and fails the job; a rank left waiting in a collective hangs the job,
which the test's timeout turns into a failure. Run with 3 ranks, one case per launch.
"""

from __future__ import annotations

import sys

import numpy as np
from _common import RANK, SIZE, WORLD, build, check, say

from pycaffe_mpi import errors

INPUT = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'


def _gather(name: str = "g", root: int = 0, ntop: int = SIZE, extra: str = "") -> str:
    tops = " ".join(f'top: "{name}_{i}"' for i in range(ntop))
    return (f'layer {{ name: "{name}" type: "MPIGather" bottom: "x" {tops} '
            f"mpi_param {{ root: {root} }} {extra} }}\n")


def digest() -> None:
    """Rank 1 reads a net with one more MPIGather than the others."""
    text = INPUT + _gather("g")
    if RANK == 1:
        text += _gather("extra")
    build(text)


def root_not_member() -> None:
    build(INPUT + _gather(ntop=2, root=2, extra="include { mpi_rank: 0 mpi_rank: 1 }"))


def gather_shapes() -> None:
    """Rank 1's bottom has another shape when the net is built."""
    text = INPUT.replace("dim: 3", "dim: 4") if RANK == 1 else INPUT
    build(text + _gather())


def gather_reshape() -> None:
    """Rank 2's bottom changes shape after the net was built: the next forward fails."""
    net = build(INPUT + _gather())
    net.forward_loss()
    if RANK == 2:
        net.blobs["x"].reshape(3, 3)
    net.forward_loss()


def gather_tops() -> None:
    build(INPUT + _gather(ntop=SIZE - 1))


def bcast_no_bottom() -> None:
    build(INPUT + 'layer { name: "bc" type: "MPIBroadcast" top: "y" }')


def dtypes() -> None:
    """Rank 1 builds its net in float32, the others in float64."""
    build(INPUT + _gather(), dtype=np.float32 if RANK == 1 else np.float64)


CASES = {f.__name__: f for f in (digest, root_not_member, gather_shapes, gather_reshape,
                                 gather_tops, bcast_no_bottom, dtypes)}

if __name__ == "__main__":
    name = sys.argv[1]
    try:
        CASES[name]()
    except errors.PycaffeError as e:
        say(f"[rank {RANK}/{SIZE}] ERROR {type(e).__name__}: {e}")
        WORLD.barrier()
        raise
    say(f"[rank {RANK}/{SIZE}] NO ERROR")
    check(False, f"case {name} raised no error")
