"""Train a TreeNet over MPI and record what the single-process twin must reproduce.

Run as ``mpiexec -n 3 python -m mpi4py treenet_equiv.py SOLVER OUTDIR ITERS``. Every rank builds a
float64 :class:`~pycaffe_mpi.solvers.Solver` on the world communicator, saves its initial weights
(``OUTDIR/init_rank_<r>.caffemodel``), runs ``ITERS`` single-iteration steps and saves its final
weights (``final_rank_<r>.caffemodel``). As ``Net.save`` writes float32 ``data`` (Caffe's
``Net<float>`` format) even for a float64 net, each rank also writes the exact float64 arrays
(``init_rank_<r>.npz``, ``final_rank_<r>.npz``; keys ``<layer>/<j>``). Rank 0 also writes the
per-iteration losses (``losses.json``; with ``average_loss: 1`` the solver's smoothed loss is the
iteration's loss).
``python -m mpi4py`` aborts the whole job if any rank raises.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi import solvers


def save(net: Any, path_stem: str) -> None:
    """``net.save`` as a .caffemodel, plus the exact float64 parameters as .npz."""
    net.save(path_stem + ".caffemodel")
    np.savez(path_stem + ".npz", **{f"{name}/{j}": np.asarray(b.data)
                                    for name, blobs in net.params.items()
                                    for j, b in enumerate(blobs)})


def main(solver_path: str, outdir: str, iters: int) -> None:
    comm = comm_mod.world()
    if not comm.is_mpi:
        sys.exit("run this worker under mpiexec")
    rank, size = comm.rank, comm.size
    solver = solvers.Solver(solver_path, dtype=np.float64, comm=comm)
    try:
        save(solver.net, os.path.join(outdir, f"init_rank_{rank}"))
        losses = []
        for _ in range(iters):
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
        save(solver.net, os.path.join(outdir, f"final_rank_{rank}"))
    finally:
        solver.close()
    if rank == 0:
        with open(os.path.join(outdir, "losses.json"), "w") as f:
            json.dump(losses, f)
    comm.barrier()
    # NOTE: one write per line: print() writes the text and the newline separately, and
    # mpiexec can interleave the ranks' writes between them
    sys.stdout.write(f"OK treenet_equiv rank {rank}/{size} layers "
                     f"{','.join(solver.net.layer_names)}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
