"""Train generated ensembles placed over MPI ranks; record what one process must reproduce.

Usage: ``mpiexec -n N python -m mpi4py ensemble_placement.py ITERS CASE_DIR [CASE_DIR ...]``.
For each case directory, every rank builds a float64 Solver from ``CASE_DIR/ranks/solver.prototxt``
on the world communicator with one seed for all ranks (``--same_seed``: a member layer then
starts from the weights its name gives it in the one-process net), runs ``ITERS`` single
iterations (the solver's own test passes included) and writes ``CASE_DIR/final_rank_<r>.npz``
(exact float64 parameters, keys ``<layer>/<j>``); rank 0 also writes ``CASE_DIR/mpi.json`` (the
per-iteration losses and the last test scores). Each rank then prints
``OK <case dir name> rank r/n layers <its train net's layers>``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from _common import RANK, SIZE, WORLD, check, say

from pycaffe_mpi import solvers


def run_case(case_dir: str, iters: int) -> None:
    solver = solvers.Solver(os.path.join(case_dir, "ranks", "solver.prototxt"), dtype=np.float64,
                            comm=WORLD, same_seed_all_ranks=True)
    try:
        losses = []
        for _ in range(iters):
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
        np.savez(os.path.join(case_dir, f"final_rank_{RANK}.npz"),
                 **{f"{name}/{j}": np.asarray(b.data) for name, blobs in solver.net.params.items()
                    for j, b in enumerate(blobs)})
        layers = list(solver.net.layer_names)
        scores = [list(s) for s in solver.mean_scores]
    finally:
        solver.close()
    check(all(np.isfinite(losses)) if RANK == 0 else True, f"losses {losses}")
    if RANK == 0:
        with open(os.path.join(case_dir, "mpi.json"), "w") as f:
            json.dump({"losses": losses, "test_scores": scores}, f)
    WORLD.barrier()
    say(f"OK {os.path.basename(case_dir)} rank {RANK}/{SIZE} layers {','.join(layers)}")


if __name__ == "__main__":
    for case in sys.argv[2:]:
        run_case(case, int(sys.argv[1]))
