"""What the end-to-end tests need: the real CIFAR-10 LMDBs (skip without them) and MPI, a
copy of a shipped solver whose snapshots go to the test's own folder, and the run's results
file (read instead of the log's text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pycaffe_mpi import prototxt
from pycaffe_mpi.reports import results
from pycaffe_mpi.testing import mpirun

ROOT = Path(__file__).resolve().parents[2]


def read_test_passes(snapshot_prefix: Path) -> list[dict[str, float]]:
    """Test net 0's outputs at each test pass, in order, from the results file the solver
    wrote (``<snapshot_prefix>_results.jsonl``, rank 0's): name -> value, an output with
    several elements as ``name_0 … name_{n-1}``."""
    path = Path(f"{snapshot_prefix}_results.jsonl")
    assert path.is_file(), f"the solver wrote no results file {path}"
    return [r["outputs"] for r in results.read_results(path)
            if r["kind"] == "test" and r["rank"] == 0 and r["test_net"] == 0]


@pytest.fixture()
def test_passes():
    """:func:`read_test_passes`: ``test_passes(tmp_path / stem)`` after a run."""
    return read_test_passes


@pytest.fixture()
def cifar10() -> Path:
    if not (ROOT / "data" / "cifar10" / "cifar10_train_lmdb").is_dir():
        pytest.skip("real CIFAR-10 not prepared (python tools/get_cifar10.py)")
    return ROOT / "data" / "cifar10"


@pytest.fixture()
def mpi() -> None:
    reason = mpirun.mpi_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture()
def solver_copy(tmp_path: Path):
    """``solver_copy(repo-relative solver, stem)``: the solver with snapshot_prefix
    ``tmp_path/stem``, written to ``tmp_path/solver.prototxt``."""
    def make(path: str, stem: str) -> Path:
        param = prototxt.read_solver(str(ROOT / path))
        param.snapshot_prefix = str(tmp_path / stem)
        out = tmp_path / "solver.prototxt"
        out.write_text(str(param))
        return out
    return make


@pytest.fixture()
def train_over_three_ranks(mpi: None):
    """``train_over_three_ranks(solver, timeout)``: ``mpiexec -n 3 pycaffe-mpi train --solver
    solver`` from the repository root; asserts it exited 0 (showing the end of its log
    otherwise) and returns the finished process."""
    def run(solver: Path, timeout: float) -> subprocess.CompletedProcess:
        out = mpirun.run_mpi(3, [sys.executable, "-m", "pycaffe_mpi.cli", "train", "--solver",
                                 str(solver)], timeout=timeout, cwd=str(ROOT))
        assert out.returncode == 0, out.stderr[-3000:]
        return out
    return run
