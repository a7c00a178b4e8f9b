"""A failure on any rank ends the whole MPI job within seconds, with a rank-tagged message.

Each case runs the real CLI, ``mpiexec -n 3 python -m pycaffe_mpi.cli train --solver ...``, on a
small TreeNet (DummyData and a conv trunk on rank 0, MPIBroadcast, a conv/IP branch per rank,
MPIGather, Eltwise, SoftmaxWithLoss on rank 0) with the fault-injecting Python layer of
``workers/faults.py`` in every branch. One rank at a time:

- raises in layer setup, in the 3rd forward, in the 3rd backward, or in its first snapshot;
- reads a different prototxt (through the CLI's per-rank ``--solver`` list) whose comm layers
  disagree with the others';
- is killed with SIGKILL in its 3rd forward.

Every case must exit non-zero, in less than 10 s beyond the wall time of a normal run of the same
job (which bounds the start-up), with ``[rank r/3]`` on the failing rank's message where the
process lives to write one. A hang is caught by the launcher's timeout and fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pycaffe_mpi.testing import mpirun

pytestmark = pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                reason=str(mpirun.mpi_unavailable_reason()))

WORKERS = Path(__file__).parent / "workers"
RANKS = 3
FAIL_ITER = 2  # the fault fires in the 3rd forward/backward (0-based call 2)
SNAPSHOT_AT = 3  # first snapshot; the other ranks go on into iteration 3's collectives
MAX_ITER = 8
LIMIT_S = 10.0  # a failure must end the job this fast (beyond a normal run's wall time)

CLI = [sys.executable, "-m", "pycaffe_mpi.cli", "train"]


def net_text(fault: dict, gather_ranks: tuple[int, ...] = ()) -> str:
    """The TreeNet; ``gather_ranks`` restricts the MPIGather's group (a mismatched spec)."""
    group = " ".join(f"mpi_rank: {r}" for r in gather_ranks)
    gather_rule = f"include {{ {group} }}" if group else ""
    n_members = len(gather_ranks) or RANKS
    tops = " ".join(f'top: "ip_{k}"' for k in range(n_members))
    bottoms = " ".join(f'bottom: "ip_{k}"' for k in range(n_members))
    r0 = "include { mpi_rank: 0 }"
    return f"""name: "faulty_treenet"
layer {{ name: "data" type: "DummyData" top: "data" top: "label" {r0}
  dummy_data_param {{ shape {{ dim: 4 dim: 3 dim: 6 dim: 6 }} shape {{ dim: 4 }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {r0}
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "bcast" type: "MPIBroadcast" bottom: "conv1" top: "conv1_b" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1_b" top: "conv2"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fault" type: "Python" bottom: "conv2" top: "conv2f"
  python_param {{ module: "faults" layer: "Fault" param_str: '{json.dumps(fault)}' }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv2f" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "gather" type: "MPIGather" bottom: "ip" {tops} {gather_rule} }}
layer {{ name: "avg" type: "Eltwise" {bottoms} top: "score" {r0} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  {r0} }}
"""


def write_job(d: Path, name: str, fault: dict, gather_ranks: tuple[int, ...] = ()) -> Path:
    """A net and its solver in ``d``; returns the solver path."""
    net = d / f"{name}.prototxt"
    net.write_text(net_text(fault, gather_ranks))
    solver = d / f"{name}_solver.prototxt"
    solver.write_text(f"""net: "{net}"
base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" max_iter: {MAX_ITER} display: 1
snapshot: {SNAPSHOT_AT} snapshot_prefix: "{d / name}" random_seed: 1 solver_mode: CPU
""")
    return solver


def launch(solver_arg: str, cwd: Path, timeout: float,
           extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(WORKERS), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    t0 = time.monotonic()
    try:
        proc = mpirun.run_mpi(RANKS, [*CLI, "--solver", solver_arg, *extra], timeout=timeout,
                              env=env, cwd=cwd)
    except TimeoutError as e:
        pytest.fail(f"the job hung (killed after {timeout:g} s):\n{e}")
    return proc, time.monotonic() - t0


def show(proc: subprocess.CompletedProcess) -> str:
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


@pytest.fixture(scope="module")
def normal_run_s(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The same job without a fault: it must succeed (the harness is sound); its wall time
    bounds the start-up time the fault cases may take on top of the 10 s limit."""
    d = tmp_path_factory.mktemp("faults_ref")
    solver = write_job(d, "ref", {"rank": 0, "phase": "none"})
    proc, seconds = launch(str(solver), d, timeout=60)
    assert proc.returncode == 0, show(proc)
    assert "Optimization Done." in proc.stderr, show(proc)
    for r in range(RANKS):
        assert (d / f"ref_iter_{SNAPSHOT_AT}_rank_{r}.caffemodel").exists()
    return seconds


def survivors(marker: str, grace_s: float = 3.0) -> list[str]:
    """Command lines of processes still running with ``marker`` in them after ``grace_s``."""
    proc_dir = Path("/proc")
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for entry in proc_dir.glob("[0-9]*"):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{entry.name}: {cmd}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def check_failed_fast(proc: subprocess.CompletedProcess, seconds: float, normal_s: float,
                      marker: str) -> None:
    assert proc.returncode != 0, show(proc)
    assert seconds < LIMIT_S + normal_s, \
        f"took {seconds:.1f} s (normal run {normal_s:.1f} s)\n{show(proc)}"
    assert "Optimization Done." not in proc.stderr, show(proc)
    if Path("/proc/self/cmdline").exists():  # no rank is left behind (e.g. spinning in MPI)
        assert not survivors(marker), survivors(marker)


@pytest.mark.parametrize("rank", range(RANKS))
@pytest.mark.parametrize("phase", ["setup", "forward", "backward", "snapshot"])
def test_exception_aborts_job(tmp_path: Path, normal_run_s: float, phase: str,
                              rank: int) -> None:
    solver = write_job(tmp_path, "job", {"rank": rank, "phase": phase, "iter": FAIL_ITER})
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
    tag = f"[rank {rank}/{RANKS}]"
    what = "cannot write snapshot" if phase == "snapshot" else f"injected fault in {phase}"
    lines = [ln for ln in proc.stderr.splitlines() if what in ln]
    assert any(ln.startswith(tag) for ln in lines), \
        f"no {tag} line saying {what!r}\n{show(proc)}"
    if phase == "snapshot":  # the failing rank wrote nothing; the others did their snapshot
        assert not (tmp_path / f"job_iter_{SNAPSHOT_AT}_rank_{rank}.caffemodel").exists()


@pytest.mark.parametrize("rank", range(RANKS))
def test_mismatched_spec(tmp_path: Path, normal_run_s: float, rank: int) -> None:
    """One rank's --solver names a net whose MPIGather has another group."""
    good = write_job(tmp_path, "good", {"rank": 0, "phase": "none"})
    bad = write_job(tmp_path, "bad", {"rank": 0, "phase": "none"}, gather_ranks=(0, 1))
    solvers = ",".join(str(bad if r == rank else good) for r in range(RANKS))
    proc, seconds = launch(solvers, tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(good))
    lines = [ln for ln in proc.stderr.splitlines() if "disagree at comm layer" in ln]
    assert lines and all(ln.startswith("[rank ") and f"/{RANKS}] error: " in ln
                         for ln in lines), show(proc)
    assert "gather" in lines[0], show(proc)


@pytest.mark.parametrize("rank", range(RANKS))
def test_sigkill_ends_job(tmp_path: Path, normal_run_s: float, rank: int) -> None:
    """A rank killed mid-training (no message possible from it) takes the job down."""
    solver = write_job(tmp_path, "job", {"rank": rank, "phase": "kill", "iter": FAIL_ITER})
    proc, seconds = launch(str(solver), tmp_path, timeout=LIMIT_S + normal_run_s + 20)
    check_failed_fast(proc, seconds, normal_run_s, str(solver))
