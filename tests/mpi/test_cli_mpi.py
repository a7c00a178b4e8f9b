"""``mpiexec -n N pycaffe-mpi train`` end to end on a tiny TreeNet (MPI-Caffe's CLI contract).

- rank 0 prints the test accuracy and "Optimization Done."; every rank snapshots to
  ``<prefix>_iter_<N>_rank_<R>.caffemodel|.solverstate``;
- a run resumed from a snapshot (one ``--snapshot ..._rank_0.solverstate`` for all ranks, each
  reading its own) continues with exactly the losses, test scores and weights of an
  uninterrupted run;
- ``--weights a,b,c`` gives each rank its own file; a list of the wrong length is an error;
- ``mpiexec -n 1`` trains a net without comm layers exactly as a plain process does;
- the ranks' seeds differ by default (random_seed + rank) and are one with ``--same_seed``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.reports import results
from pycaffe_mpi.testing import mpirun

pytestmark = pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                reason=str(mpirun.mpi_unavailable_reason()))

RANKS = 3
TIMEOUT = 60
_SCRIPT = Path(sys.executable).parent / "pycaffe-mpi"
PYCAFFE_MPI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "pycaffe_mpi.cli"]
BRANCH = ("conv2", "ip")
R0 = "include { mpi_rank: 0 }"


def _data(phase: str, lmdb: Path, rule: str) -> str:
    return f"""layer {{ name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: {phase} {rule} }} transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{lmdb}" batch_size: 8 backend: LMDB }} }}
"""


def treenet(d: Path) -> str:
    """Trunk conv+pool on rank 0, a conv/IP branch per rank, mean of the branches' scores."""
    tops = " ".join(f'top: "ip_{k}"' for k in range(RANKS))
    bottoms = " ".join(f'bottom: "ip_{k}"' for k in range(RANKS))
    coeffs = " ".join(["coeff: 0.333333333333"] * RANKS)
    return ('name: "tiny_treenet"\n' + _data("TRAIN", d / "train_lmdb", "mpi_rank: 0")
            + _data("TEST", d / "test_lmdb", "mpi_rank: 0") + f"""
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {R0}
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" {R0}
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "bcast" type: "MPIBroadcast" bottom: "pool1" top: "pool1_b"
  mpi_param {{ root: 0 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1_b" top: "conv2"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "gather" type: "MPIGather" bottom: "ip" {tops} mpi_param {{ root: 0 }} }}
layer {{ name: "avg" type: "Eltwise" {bottoms} top: "score" {R0}
  eltwise_param {{ operation: SUM {coeffs} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy"
  include {{ phase: TEST mpi_rank: 0 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  include {{ phase: TRAIN mpi_rank: 0 }} }}
""")


def plain_net(d: Path) -> str:
    """A net without comm layers (for ``mpiexec -n 1`` against a plain process)."""
    return ('name: "plain"\n' + _data("TRAIN", d / "train_lmdb", "") + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli_mpi")
    rng = np.random.default_rng(5)
    for name, n in (("train_lmdb", 48), ("test_lmdb", 16)):
        images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
        datasets.write_datum_lmdb(d / name, images, rng.integers(0, 4, size=n))
    (d / "treenet.prototxt").write_text(treenet(d))
    (d / "plain.prototxt").write_text(plain_net(d))
    return d


def write_solver(d: Path, name: str, net: str = "treenet", **over: object) -> Path:
    """A solver file for ``net``; snapshots go to ``d/<name>/snap``."""
    (d / name).mkdir(exist_ok=True)
    fields = {"net": f'"{d / net}.prototxt"', "base_lr": 0.05, "momentum": 0.9,
              "weight_decay": 0.004, "lr_policy": '"fixed"', "max_iter": 20, "display": 1,
              "snapshot": 10, "snapshot_prefix": f'"{d / name / "snap"}"', "random_seed": 11,
              "solver_mode": "CPU"}
    if net == "treenet":
        fields.update(test_iter=2, test_interval=10)
    fields.update(over)
    path = d / f"{name}_solver.prototxt"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


def train(n: int, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    """``mpiexec -n n pycaffe-mpi train *args`` (a hang fails the test via the timeout)."""
    return mpirun.run_mpi(n, [*PYCAFFE_MPI, "train", *args], timeout=TIMEOUT, cwd=cwd)


def show(proc: subprocess.CompletedProcess) -> str:
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, show(proc)
    return proc.stderr


_LOSS = re.compile(r"\] (\[rank \d+/\d+\] )?Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)$")


def losses(log: str, tag: str = "[rank 0/3] ") -> dict[int, str]:
    """``{N: loss}`` from the ``Iteration N (...), loss = X`` lines logged under ``tag``."""
    out = {}
    for line in log.splitlines():
        m = _LOSS.search(line)
        if m and (m.group(1) or "") == tag:
            out[int(m.group(2))] = m.group(3)
    return out


def score_lines(log: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in log.splitlines() if "Test net output" in line]


def params(path: Path) -> dict[str, list[np.ndarray]]:
    net = io.read_proto_binary(str(path), caffe_pb2.NetParameter())
    return {lp.name: [io.blobproto_to_array(b) for b in lp.blobs]
            for lp in net.layer if len(lp.blobs)}


@pytest.fixture(scope="module")
def full_run(work: Path) -> tuple[Path, str]:
    """20 iterations at 3 ranks, testing and snapshotting every 10: (snapshot dir, log)."""
    solver = write_solver(work, "full")
    return work / "full", ok(train(RANKS, "--solver", solver, cwd=work))


def test_train_reports_and_snapshots(full_run: tuple[Path, str]) -> None:
    snaps, log = full_run
    acc = [ln for ln in log.splitlines() if "Test net output #0: accuracy = " in ln]
    # tested at iterations 0 (test_initialization), 10 and 20, reported by rank 0 only
    assert len(acc) == 3 and all("[rank 0/3]" in ln for ln in acc), log
    done = [ln for ln in log.splitlines() if ln.endswith("Optimization Done.")]
    assert len(done) == 1 and "[rank 0/3]" in done[0], log  # rank 0 logs progress
    assert sorted(losses(log)) == list(range(21))
    assert not losses(log, "[rank 1/3] ") and not losses(log, "[rank 2/3] ")
    names = sorted(p.name for p in snaps.iterdir())
    want = sorted(f"snap_iter_{n}_rank_{r}.{ext}" for n in (10, 20) for r in range(RANKS)
                  for ext in ("caffemodel", "solverstate"))
    assert names == sorted([*want, "snap_results.jsonl"])
    # the results file: rank 0's display and test records, every output by name
    records = results.read_results(snaps / "snap_results.jsonl")
    train_recs = [r for r in records if r["kind"] == "train"]
    test_recs = [r for r in records if r["kind"] == "test"]
    assert {r["rank"] for r in records} == {0}
    assert [r["iter"] for r in test_recs] == [0, 10, 20]
    assert all(0 <= r["outputs"]["accuracy"] <= 1 for r in test_recs)
    assert sorted(r["iter"] for r in train_recs) == sorted(losses(log))
    assert all("loss" in r["outputs"] and "smoothed_loss" in r["outputs"] for r in train_recs)
    w0, w1 = params(snaps / "snap_iter_20_rank_0.caffemodel"), \
        params(snaps / "snap_iter_20_rank_1.caffemodel")
    assert set(w0) == {"conv1", *BRANCH} and set(w1) == set(BRANCH)


def test_resume_continues_exactly(work: Path, full_run: tuple[Path, str]) -> None:
    snaps, log = full_run
    solver = write_solver(work, "resumed")
    # one value for every rank: each rank reads its own ..._rank_<R>.solverstate
    resumed = ok(train(RANKS, "--solver", solver, "--snapshot",
                       snaps / "snap_iter_10_rank_0.solverstate", cwd=work))
    want = {n: v for n, v in losses(log).items() if n >= 10}
    assert losses(resumed) == want
    assert score_lines(resumed) == score_lines(log)[1:]  # the tests at iterations 10 and 20
    for r in range(RANKS):
        a = params(snaps / f"snap_iter_20_rank_{r}.caffemodel")
        b = params(work / "resumed" / f"snap_iter_20_rank_{r}.caffemodel")
        assert a.keys() == b.keys()
        for name in a:
            for x, y in zip(a[name], b[name]):
                np.testing.assert_array_equal(x, y, err_msg=f"rank {r} {name}")


def test_weights_per_rank(work: Path, full_run: tuple[Path, str]) -> None:
    """``--weights a,b,c``: rank R finetunes from the R-th file (here another rank's)."""
    snaps, _ = full_run
    perm = (2, 0, 1)
    files = [snaps / f"snap_iter_20_rank_{perm[r]}.caffemodel" for r in range(RANKS)]
    solver = write_solver(work, "weights", max_iter=0, snapshot=0)
    ok(train(RANKS, "--solver", solver, "--weights", ",".join(map(str, files)), cwd=work))
    for r in range(RANKS):
        got = params(work / "weights" / f"snap_iter_0_rank_{r}.caffemodel")
        src = params(files[r])
        for name in BRANCH:
            for x, y in zip(got[name], src[name]):
                np.testing.assert_array_equal(x, y, err_msg=f"rank {r} {name}")


@pytest.mark.parametrize("flag", ["--solver", "--snapshot"])
def test_wrong_length_list(work: Path, flag: str) -> None:
    solver = write_solver(work, "badlist")
    value = f"{solver},{solver}" if flag == "--solver" else "a.solverstate,b.solverstate"
    args = [flag, value] if flag == "--solver" else ["--solver", solver, flag, value]
    proc = train(RANKS, *args, cwd=work)
    assert proc.returncode != 0, show(proc)
    want = (f"error: {flag}: give either one value for all {RANKS} MPI ranks or one per rank "
            f"({RANKS} comma-separated), got 2")
    assert re.search(rf"^\[rank \d/{RANKS}\] {re.escape(want)}$", proc.stderr, re.M), show(proc)


def test_one_rank_is_a_plain_run(work: Path) -> None:
    """``mpiexec -n 1`` and a plain process: the same log numbers and the same files."""
    mpi_solver = write_solver(work, "n1", net="plain", max_iter=12, snapshot=6)
    plain_solver = write_solver(work, "plain", net="plain", max_iter=12, snapshot=6)
    mpi_log = ok(train(1, "--solver", mpi_solver, cwd=work))
    plain = subprocess.run([*PYCAFFE_MPI, "train", "--solver", str(plain_solver)], cwd=work,
                           capture_output=True, text=True, timeout=TIMEOUT)
    plain_log = ok(plain)
    assert "[rank" not in mpi_log
    assert losses(mpi_log, "") == losses(plain_log, "") and len(losses(plain_log, "")) == 13
    want = sorted([*(f"snap_iter_{n}.{e}" for n in (6, 12) for e in ("caffemodel",
                                                                     "solverstate")),
                   "snap_results.jsonl"])
    for d in ("n1", "plain"):
        assert sorted(p.name for p in (work / d).iterdir()) == want
    a, b = params(work / "n1" / "snap_iter_12.caffemodel"), \
        params(work / "plain" / "snap_iter_12.caffemodel")
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)


def _branch_equal(init: list[dict[str, list[np.ndarray]]], a: int, b: int) -> bool:
    return all(np.array_equal(x, y) for layer in BRANCH
               for x, y in zip(init[a][layer], init[b][layer]))


@pytest.mark.parametrize("same_seed", [False, True])
def test_seeds_per_rank(work: Path, same_seed: bool) -> None:
    """Default: random_seed + rank, so the branches start different; ``--same_seed``: one
    seed on every rank, so every rank's branch starts from identical weights (layers are
    seeded by (seed, layer name), wherever they sit in a rank's pruned net)."""
    name = f"seed_{int(same_seed)}"
    solver = write_solver(work, name, max_iter=0, snapshot=0)
    ok(train(RANKS, "--solver", solver, *(["--same_seed"] if same_seed else []), cwd=work))
    init = [params(work / name / f"snap_iter_0_rank_{r}.caffemodel") for r in range(RANKS)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert _branch_equal(init, a, b) == same_seed, (a, b)


def test_sys_exit_on_one_rank_ends_the_job(tmp_path: Path) -> None:
    """sys.exit(0) from a signal handler on rank 1 during ``time`` (outside the solver and the
    layers) ends every rank non-zero, instead of leaving rank 0 in its first collective."""
    model = tmp_path / "bcast.prototxt"
    model.write_text(
        'name: "bcast"\n'
        'layer { name: "in" type: "DummyData" top: "x" include { mpi_rank: 0 }\n'
        '  dummy_data_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "b" type: "MPIBroadcast" bottom: "x" top: "y" mpi_param { root: 0 } }\n')
    worker = Path(__file__).parent / "workers" / "cli_exit.py"
    try:
        proc = mpirun.run_python_mpi(2, worker, "time", "--model", str(model),
                                     "--iterations", "1", timeout=TIMEOUT, cwd=tmp_path)
    except TimeoutError as e:  # the old behaviour: rank 0 waits forever
        pytest.fail(f"the job did not end: {e}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "[rank 1/2] error: sys.exit(0) was called during time" in out, out
