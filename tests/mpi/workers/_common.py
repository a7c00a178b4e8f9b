"""Helpers shared by the MPI workers (run as ``mpiexec -n N python -m mpi4py worker.py case...``).

A worker runs the named cases in order on every rank. A failed check raises AssertionError
tagged with the rank; ``python -m mpi4py`` then aborts the whole job, so mpiexec exits non-zero
in seconds. After each case every rank prints ``OK <case> rank <r>/<n>``; the pytest side
asserts on the return code and on those lines (found anywhere: mpiexec merges the ranks'
output, so one rank's line may run into another's).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable

import numpy as np
from google.protobuf import text_format

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

WORLD = comm_mod.world()
RANK, SIZE = WORLD.rank, WORLD.size
if not WORLD.is_mpi:
    sys.exit("run the workers under mpiexec")


def build(text: str, **kw) -> Net:
    """A float64 TRAIN net from inline prototxt text, on the world communicator."""
    param = text_format.Merge(text, caffe_pb2.NetParameter())
    kw.setdefault("seed", 1000 + RANK)
    kw.setdefault("dtype", np.float64)
    return Net(param, 0, comm=WORLD, **kw)


def values(tag: str, rank: int, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic test values for (tag, rank), the same on every process."""
    rng = np.random.default_rng(zlib.crc32(f"{tag}/{rank}".encode()))
    return rng.standard_normal(shape)


def check(cond: object, msg: str) -> None:
    if not cond:
        raise AssertionError(f"[rank {RANK}/{SIZE}] {msg}")


def close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-12,
          atol: float = 1e-12) -> None:
    got, want = np.asarray(got), np.asarray(want)
    check(got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}")
    check(np.allclose(got, want, rtol=rtol, atol=atol),
          f"{what}: max |diff| {np.max(np.abs(got - want), initial=0):.3g}\n"
          f"got {got}\nwant {want}")


def main(cases: dict[str, Callable[[], None]]) -> None:
    """Run the cases named on the command line, in order."""
    names = sys.argv[1:]
    unknown = [n for n in names if n not in cases]
    check(names and not unknown, f"unknown cases {unknown}; known: {sorted(cases)}")
    for name in names:
        cases[name]()
        WORLD.barrier()
        say(f"OK {name} rank {RANK}/{SIZE}")


def say(line: str) -> None:
    """One line to stdout in one write (mpiexec merges the ranks' output)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
