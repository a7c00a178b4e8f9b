"""Train with data-parallel replicas and record what the equivalence tests compare.

Run as ``mpiexec -n N python -m mpi4py data_parallel.py SOLVER OUTDIR REPLICAS MODE [STATE]``.
Every rank builds a float64 :class:`~pycaffe_mpi.solvers.Solver` on the world communicator with
``replicas=REPLICAS`` (``file``: none given, the solver file's ``replicas`` field decides) and
trains to ``max_iter`` through ``solve`` (which checks the replicas'
weights digest first). MODE:

- ``train``: world rank 0 writes the per-iteration losses (``OUTDIR/losses.json``; with
  ``average_loss: 1`` the smoothed loss is the iteration's loss, the replicas' mean);
- ``resume``: resumes from STATE (``solve(STATE)``);
- ``mismatch``: replica 1 perturbs one weight before ``solve``, which must refuse.

Every rank then writes its exact float64 parameters to ``OUTDIR/<MODE>_w<world rank>.npz``
(keys ``<layer>/<j>``, plus ``replica``, ``model_rank`` and the rank's ``seed``).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi import solvers


def main(solver_path: str, outdir: str, replicas: int | None, mode: str,
         state: str = "") -> None:
    world = comm_mod.world()
    if not world.is_mpi:
        sys.exit("run this worker under mpiexec")
    solver = solvers.Solver(solver_path, dtype=np.float64, comm=world, replicas=replicas)
    losses: list[float] = []
    solver.add_callback(on_gradients_ready=lambda: losses.append(float(solver.smoothed_loss)))
    dp = solver.dp
    replica = dp.replica if dp is not None else 0
    if mode == "mismatch" and replica == 1:
        p = solver.net.learnable_params[0]
        p.data.flat[0] += 1e-3
    try:
        solver.solve(state or None)
    finally:
        solver.close()
    if world.rank == 0 and mode == "train":
        with open(os.path.join(outdir, "losses.json"), "w") as f:
            json.dump(losses, f)
    arrays = {f"{name}/{j}": np.asarray(b.data) for name, blobs in solver.net.params.items()
              for j, b in enumerate(blobs)}
    np.savez(os.path.join(outdir, f"{mode}_w{world.rank}.npz"), replica=replica,
             model_rank=solver.rank, seed=solver.seed, **arrays)
    print(f"OK data_parallel {mode} rank {world.rank}/{world.size} replica {replica} "
          f"model rank {solver.rank}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], None if sys.argv[3] == "file" else int(sys.argv[3]),
         sys.argv[4], *sys.argv[5:6])
