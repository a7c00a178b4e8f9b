"""``pycaffe-mpi`` under mpiexec with rank 1 calling ``sys.exit(0)`` from a signal handler.

The handler fires as rank 1 picks its device, before its net is built, while rank 0 goes on into
the net's first collective; the arguments are the command line (``time --model NET ...``).
"""

import os
import signal
import sys

from pycaffe_mpi import cli
from pycaffe_mpi import comm as comm_mod

RANK = comm_mod.world().rank


def _leave(signum, frame):
    sys.exit(0)


def _choose_backend(*args, **kwargs):
    if RANK == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    return _real_choose_backend(*args, **kwargs)


_real_choose_backend = cli.choose_backend
signal.signal(signal.SIGUSR1, _leave)
cli.choose_backend = _choose_backend
sys.exit(cli.main(sys.argv[1:]))
