"""The MPI launcher used by the tests: return codes, environment, and a hung job killed."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from pycaffe_mpi.testing import mpirun


def test_environment_and_return_code(mpi):
    code = "import os; print('HY=' + str(os.environ.get('MPIR_CVAR_ENABLE_HEAVY_YIELD')))"
    proc = mpirun.run_mpi(2, [sys.executable, "-c", code], timeout=30)
    # NOTE: mpiexec may merge the two ranks' lines, so match tokens, not lines
    assert proc.returncode == 0 and re.findall(r"HY=(\d+|None)", proc.stdout) == ["1", "1"], proc
    proc = mpirun.run_mpi(2, [sys.executable, "-c", "raise SystemExit(3)"], timeout=30)
    assert proc.returncode != 0, proc


def test_a_hung_job_is_killed_and_reported(mpi):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish in 3 s") as info:
        mpi.run(3, "hang", timeout=3)
    assert time.monotonic() - t0 < 15
    pids = [int(p) for p in re.findall(r"started rank \d pid (\d+)", str(info.value))]
    assert len(pids) == 3, str(info.value)  # the output so far comes with the error
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a rank outlived the killed job"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_missing_mpiexec_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(FileNotFoundError, match=r"install the mpi extra"):
        mpirun.mpiexec_path()
    assert "install the mpi extra" in mpirun.mpi_unavailable_reason()
