"""A forked child that leaves with ``os._exit(0)`` (as multiprocessing's workers do) must not end
the MPI job: only the rank's own process is guarded. Usage: mpiexec -n N python fork_exit.py"""

from __future__ import annotations

import os

from pycaffe_mpi import comm as comm_mod

world = comm_mod.world()
comm_mod.abort_on_uncaught_exceptions(world)
pid = os.fork()
if pid == 0:
    os._exit(0)
_, status = os.waitpid(pid, 0)
world.barrier()
print(f"OK fork_exit rank {world.rank}/{world.size} child status {status}", flush=True)
