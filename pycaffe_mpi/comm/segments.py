"""MPICH's shared-memory segment files, which an aborted job leaves behind.

MPICH keeps the shared memory of the ranks on one node in files ``/dev/shm/mpich_shm_*`` (a RAM
file system) and removes them in MPI_Finalize only: after MPI_Abort, or when a job is killed,
they stay for good (a few MB each, one or more per failed job). :func:`unlink_own` removes the
names of the files this process maps (``MPIComm.abort`` calls it: every rank of the job has its
mappings by then, and the memory is freed when the last of them exits);
:func:`mapped` tells which files a process maps, for a launcher that cleans up after a job
(:func:`pycaffe_mpi.testing.mpirun.remove_leftover_segments`).
"""

from __future__ import annotations

import contextlib
import os

#: where MPICH keeps a node's shared-memory segments, and how it names them
SHM_DIR, SHM_PREFIX = "/dev/shm", "mpich_shm_"


def files() -> set[str]:
    """The segment files there now (paths; empty where the directory does not exist)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return set()
    return {os.path.join(SHM_DIR, n) for n in names if n.startswith(SHM_PREFIX)}


def mapped(pid: int | str = "self") -> set[str]:
    """The segment files that process ``pid`` maps and that still have a name (read from
    ``/proc/<pid>/maps``; an empty set where there is no such file)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(f"{SHM_DIR}/{SHM_PREFIX}") and \
                not fields[5].endswith(" (deleted)"):
            found.add(fields[5])
    return found


def unlink_own() -> None:
    """Remove the names of the segment files this process maps (before an abort)."""
    for path in mapped():
        with contextlib.suppress(OSError):
            os.unlink(path)
