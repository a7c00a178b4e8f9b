"""Run-time trust under MPI: no rank's mistake hangs the job (issue 9 items 1, 2, 5, 6).

Each case runs the real CLI under ``mpiexec -n 3`` on the TreeNet of ``test_faults.py`` (one
fault-injecting Python layer per branch, ``workers/faults.py``):

- ranks whose solver files differ in a field that decides the sequence of collectives refuse to
  start, naming the field, the ranks and their values;
- ``sys.exit`` in a layer, ``sys.exit`` in a signal handler and ``os._exit`` end every rank
  non-zero within seconds (the first two with a ``[rank r/3]`` line naming the layer);
- a rank alive but stuck is named by ``--collective_timeout`` and the job ends;
- a NaN on one branch stops every rank at that iteration, naming the layer and the rank;
- a layer for a rank outside the job is an error naming the layer and the job's size.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_faults import (  # the TreeNet, its launcher and the fast-failure checks
    FAIL_ITER,
    LIMIT_S,
    RANKS,
    check_failed_fast,
    launch,
    normal_run_s,
    show,
    write_job,
)

from pycaffe_mpi import datasets
from pycaffe_mpi.testing import mpirun

pytestmark = pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                reason=str(mpirun.mpi_unavailable_reason()))

__all__ = ["normal_run_s"]  # the fixture, shared with test_faults.py


def _tagged(proc, rank: int, *words: str) -> list[str]:
    tag = f"[rank {rank}/{RANKS}]"
    return [ln for ln in proc.stderr.splitlines()
            if ln.startswith(tag) and all(w in ln for w in words)]


@pytest.mark.parametrize(("field", "good", "bad"), [
    ("max_iter", "max_iter: 8", "max_iter: 9"),
    ("iter_size", "max_iter: 8", "max_iter: 8 iter_size: 2"),
    ("display", "display: 1", "display: 2"),
])
def test_solver_settings_must_agree(tmp_path: Path, normal_run_s: float, field: str, good: str,
                                    bad: str) -> None:
    ok = write_job(tmp_path, "good", {"rank": 0, "phase": "none"})
    other = tmp_path / "bad_solver.prototxt"
    other.write_text(ok.read_text().replace(good, bad))
    proc, seconds = launch(f"{ok},{ok},{other}", tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(ok))
    lines = [ln for ln in proc.stderr.splitlines() if f'solver field "{field}"' in ln]
    assert lines, show(proc)
    assert re.search(r"ranks 0,1: \w+ = \S+; rank 2: ", lines[0]), lines[0]
    assert str(other) in lines[0], lines[0]


@pytest.mark.parametrize(("phase", "words"), [
    ("exit", ('layer "fault"', "sys.exit(3)", "forward")),
    ("signal", ('layer "fault"', "sys.exit(4)")),
])
def test_sys_exit_ends_every_rank(tmp_path: Path, normal_run_s: float, phase: str,
                                  words: tuple[str, ...]) -> None:
    rank = 1
    solver = write_job(tmp_path, "job", {"rank": rank, "phase": phase, "iter": FAIL_ITER})
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    assert _tagged(proc, rank, *words), show(proc)


def test_os_exit_ends_every_rank(tmp_path: Path, normal_run_s: float) -> None:
    """os._exit(0) skips every clean-up (MPICH's launcher then ends the job with status 0)."""
    solver = write_job(tmp_path, "job", {"rank": 2, "phase": "osexit", "iter": FAIL_ITER})
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    assert _tagged(proc, 2, "os._exit(0) called at", "faults.py", 'layer "fault"', "forward"), \
        show(proc)


def test_collective_timeout_names_the_stuck_rank(tmp_path: Path, normal_run_s: float) -> None:
    stuck = 2
    solver = write_job(tmp_path, "job", {"rank": stuck, "phase": "stall", "iter": FAIL_ITER})
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20,
                           extra=("--collective_timeout", "2"))
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    lines = [ln for ln in proc.stderr.splitlines() if "collective timeout" in ln]
    assert lines, show(proc)
    assert f"rank {stuck} never arrived: it is computing" in lines[0], show(proc)
    assert re.match(r"\[rank [01]/3\] error: collective timeout", lines[0]), lines[0]


def test_collective_timeout_lets_a_sound_run_finish(tmp_path: Path, normal_run_s: float) -> None:
    solver = write_job(tmp_path, "job", {"rank": 0, "phase": "none"})
    proc, _ = launch(str(solver), tmp_path, timeout=normal_run_s + 30,
                     extra=("--collective_timeout", "30"))
    assert proc.returncode == 0, show(proc)
    assert "Optimization Done." in proc.stderr, show(proc)
    assert "collective timeout" not in proc.stderr and "watchdog" not in proc.stderr, show(proc)


def test_nan_on_one_rank_stops_every_rank(tmp_path: Path, normal_run_s: float) -> None:
    rank = 1
    solver = write_job(tmp_path, "job", {"rank": rank, "phase": "nan", "iter": FAIL_ITER})
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    lines = [ln for ln in proc.stderr.splitlines() if "became non-finite" in ln]
    assert lines, show(proc)
    assert f"iteration {FAIL_ITER}:" in lines[0], lines[0]
    assert re.search(rf'rank {rank}: loss finite; first non-finite value: top "conv2f" of '
                     r'.*layer "fault"', lines[0]), lines[0]


def test_layer_outside_the_world(tmp_path: Path, normal_run_s: float) -> None:
    solver = write_job(tmp_path, "job", {"rank": 0, "phase": "none"})
    net = Path(solver.read_text().split('"')[1])
    net.write_text(net.read_text().replace(
        'layer { name: "avg"', 'layer { name: "far" type: "Silence" bottom: "label" '
        'include { mpi_rank: 5 } }\nlayer { name: "avg"'))
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    assert re.search(r'layer "far".*rank 5, outside this job of 3 ranks', proc.stderr), show(proc)


def test_forked_child_may_use_os_exit(tmp_path: Path) -> None:
    """multiprocessing ends its forked workers with os._exit: that is no rank leaving."""
    worker = Path(__file__).parent / "workers" / "fork_exit.py"
    proc = mpirun.run_mpi(2, [sys.executable, worker], timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, show(proc)
    assert proc.stdout.count("OK fork_exit rank") == 2, show(proc)


def test_prefetch_thread_failure_ends_every_rank(tmp_path: Path, normal_run_s: float) -> None:
    """Rank 0 reads its batches from an LMDB; its prefetch thread fails after the queued ones."""
    db = tmp_path / "db"
    datasets.write_datum_lmdb(db, np.zeros((8, 3, 6, 6), np.uint8), np.arange(8) % 3)
    solver = write_job(tmp_path, "job", {"rank": 0, "phase": "prefetch"})
    net = Path(solver.read_text().split('"')[1])
    text = net.read_text()
    start = text.index('layer { name: "data"')
    end = text.index('layer { name: "conv1"')
    net.write_text(text[:start] + f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
                   f'include {{ mpi_rank: 0 }} data_param {{ source: "{db}" batch_size: 4 '
                   f"backend: LMDB prefetch: 1 }} }}\n" + text[end:])
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    assert _tagged(proc, 0, 'layer "data" (type Data)', "injected fault in the prefetch thread"), \
        show(proc)
