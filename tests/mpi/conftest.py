"""MPI tests: each launches ``mpiexec -n N python -m mpi4py tests/mpi/workers/<worker>.py ...``
with a timeout (pycaffe_mpi.testing.mpirun), so a deadlock fails one test instead of hanging
the run. They skip when mpi4py or the venv's mpiexec is missing (the ``mpi`` fixture)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from pycaffe_mpi.testing import mpirun

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.mpi)


class Launcher:
    """Runs a worker under mpiexec and checks what the ranks reported."""

    def run(self, n: int, worker: str, *args: str,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """The job's CompletedProcess, with its wall time in ``.seconds``."""
        t0 = time.monotonic()
        proc = mpirun.run_python_mpi(n, WORKERS / f"{worker}.py", *args, timeout=timeout,
                                     cwd=REPO)
        proc.seconds = time.monotonic() - t0
        return proc

    @staticmethod
    def output(proc: subprocess.CompletedProcess) -> str:
        return (f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
                f"--- stderr ---\n{proc.stderr}")

    def assert_ok(self, proc: subprocess.CompletedProcess, n: int,
                  cases: Sequence[str]) -> None:
        """rc 0 and every rank reported every case done."""
        assert proc.returncode == 0, self.output(proc)
        for case in cases:
            pattern = rf"OK {re.escape(case)} rank (\d+)/{n}(?!\d)"  # lines may run together
            done = set(re.findall(pattern, proc.stdout))
            assert done == {str(r) for r in range(n)}, (f"case {case}: ranks {sorted(done)}\n"
                                                         f"{self.output(proc)}")


@pytest.fixture
def mpi() -> Launcher:
    reason = mpirun.mpi_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return Launcher()
