"""A job that never ends, for the launcher's timeout test: every rank prints its pid, then rank
0 waits in a barrier that the others never join. Usage: mpiexec -n N python -m mpi4py hang.py"""

from __future__ import annotations

import os
import sys
import time

from mpi4py import MPI

comm = MPI.COMM_WORLD
sys.stdout.write(f"started rank {comm.Get_rank()} pid {os.getpid()}\n")
sys.stdout.flush()
if comm.Get_rank() == 0:
    comm.Barrier()
else:
    time.sleep(600)
