"""Launch MPI jobs from tests (and scripts) so that a deadlock fails instead of hanging.

:func:`run_mpi` starts ``mpiexec -n N ...`` in a new session, waits with a timeout and, on
timeout, kills the whole process group (mpiexec, its proxies and every rank) and raises a
:class:`TimeoutError` carrying the output so far. :func:`run_python_mpi` runs a Python script
under ``python -m mpi4py``, which aborts the whole job when any rank raises, so a failing rank
ends the job in seconds rather than leaving the others waiting in a collective.

A job that fails or is killed leaves MPICH's shared-memory segment files in ``/dev/shm`` (RAM);
:func:`run_mpi` removes those that appeared during the job and that no process maps.

The ``mpiexec`` used is the one next to ``sys.executable`` (the MPICH wheel of the ``mpi``
extra puts it in the venv's bin): mixing one MPI's launcher with another MPI's library fails.
The child environment gets ``MPIR_CVAR_ENABLE_HEAVY_YIELD=1`` (unless set) so that waiting
MPICH ranks yield the CPU when there are more ranks than cores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pycaffe_mpi.comm import segments


def mpiexec_path() -> str:
    """The ``mpiexec`` next to the running Python; FileNotFoundError if there is none."""
    path = Path(sys.executable).parent / "mpiexec"
    if not path.is_file():
        raise FileNotFoundError(
            f"no mpiexec next to {sys.executable}: install the mpi extra "
            "(pip install -e '.[mpi]', which brings mpi4py and the MPICH wheel)")
    return str(path)


def mpi_unavailable_reason() -> str | None:
    """Why MPI jobs cannot be launched here (no mpi4py, no mpiexec), or None if they can."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (install the mpi extra: pip install -e '.[mpi]')"
    try:
        mpiexec_path()
    except FileNotFoundError as e:
        return str(e)
    return None


def remove_leftover_segments(before: set[str], wait: float = 2.0) -> list[str]:
    """Remove the segment files that are not in ``before`` and that no live process maps (a
    failed job's); return their paths. A file still mapped is looked at again for up to
    ``wait`` seconds (the ranks of an aborted job may still be exiting)."""
    removed: list[str] = []
    deadline = time.monotonic() + wait
    while True:
        new = segments.files() - before
        mapped = set()
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                mapped |= segments.mapped(pid) & new
        for path in new - mapped:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
        if not mapped or time.monotonic() > deadline:
            return sorted(removed)
        time.sleep(0.05)


def run_mpi(
    n: int,
    args: Sequence[Any],
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    clean: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n n *args``; return its CompletedProcess (text stdout and stderr).

    Args:
        n: number of ranks.
        args: the command each rank runs.
        timeout: seconds before the whole job is killed and TimeoutError raised.
        env: the child environment (default: this process's), plus
            ``MPIR_CVAR_ENABLE_HEAVY_YIELD=1`` unless it sets that variable.
        cwd: the job's working directory.
        clean: after a job that failed or was killed, remove the shared-memory segment files
            it left (:func:`remove_leftover_segments`).
    """
    cmd = [mpiexec_path(), "-n", str(n), *(str(a) for a in args)]
    before = segments.files() if clean else set()
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    # NOTE: a new session puts mpiexec, its proxies and the ranks in one process group, so one
    # killpg ends them all; killing only mpiexec can leave ranks spinning in a collective.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process that left the group holds the pipes
            proc.kill()
            out, err = "", ""
        if clean:
            remove_leftover_segments(before)
        raise TimeoutError(
            f"{' '.join(cmd)} did not finish in {timeout:g} s (a deadlock?); the job was "
            f"killed.\n--- stdout ---\n{out}\n--- stderr ---\n{err}") from None
    if clean and proc.returncode != 0:
        remove_leftover_segments(before)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_python_mpi(n: int, script: str | os.PathLike, *script_args: Any,
                   **kw: Any) -> subprocess.CompletedProcess:
    """``run_mpi(n, [python, -m, mpi4py, script, *script_args], **kw)``."""
    return run_mpi(n, [sys.executable, "-m", "mpi4py", str(script), *script_args], **kw)
