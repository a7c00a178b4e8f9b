"""Data-parallel replicas train exactly what one process trains at R times the batch.

``workers/data_parallel.py`` trains a small net (Data from a tiny LMDB, conv, ReLU, pooling,
inner product, softmax loss; float64, SGD with momentum, weight decay and a step lr policy) for
20 iterations under ``mpiexec`` with ``replicas`` R at batch B / R; the same worker trains the
reference at batch B with one replica. Every replica must end with the reference's weights and
the same per-iteration losses to 1e-10, at 2 and 4 ranks, and with ``iter_size: 2``. Each replica
reads its own records (i mod R == k), so the data split is real. Also: snapshots (one weights
file per model rank, replica state files beside it) resume bit-identically; replicas whose
weights differ refuse to start; a failure on any replica ends every rank within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets
from pycaffe_mpi.testing import mpirun

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                 reason=str(mpirun.mpi_unavailable_reason()))]

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).parent / "workers"
WORKER = WORKERS / "data_parallel.py"
ITERS = 20
BATCH = 8
FILLERS = ('weight_filler { type: "gaussian" std: 0.3 } '
           'bias_filler { type: "gaussian" std: 0.1 }')


def plain_net(lmdb: Path, batch: int, test: bool = False) -> str:
    """The plain net; ``test`` adds a TEST Data layer (batch 4) beside the TRAIN one."""
    train_only = "include { phase: TRAIN }" if test else ""
    test_data = f"""layer {{ name: "data_test" type: "Data" top: "data" top: "label"
  include {{ phase: TEST }} transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{lmdb}" batch_size: 4 backend: LMDB }} }}""" if test else ""
    return f"""name: "plain"
layer {{ name: "data" type: "Data" top: "data" top: "label" {train_only}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{lmdb}" batch_size: {batch} backend: LMDB }} }}
{test_data}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 {FILLERS} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
  inner_product_param {{ num_output: 5 {FILLERS} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def solver_text(net: Path, prefix: Path, extra: str = "") -> str:
    return f"""net: "{net}"
base_lr: 0.05 momentum: 0.9 weight_decay: 0.004 lr_policy: "step" gamma: 0.5 stepsize: 8
max_iter: {ITERS} display: 0 average_loss: 1 random_seed: 7 snapshot_after_train: false
solver_mode: CPU snapshot_prefix: "{prefix}" {extra}
"""


@pytest.fixture(scope="module")
def lmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dp_data")
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(44, 3, 8, 8), dtype=np.uint8)  # 44: not a multiple
    labels = rng.integers(0, 5, size=44)                                # of B, so wraps shift
    datasets.write_datum_lmdb(d / "train_lmdb", images, labels)
    return d / "train_lmdb"


def train(d: Path, ranks: int, replicas: int | str, net_text: str, extra: str = "",
          mode: str = "train", state: str = "", timeout: float = 120) -> Path:
    """Write the net and solver into ``d`` and run the worker; returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "net.prototxt").write_text(net_text)
    solver = d / "solver.prototxt"
    solver.write_text(solver_text(d / "net.prototxt", d / "snap", extra))
    res = mpirun.run_python_mpi(ranks, WORKER, solver, d, replicas, mode, state,
                                timeout=timeout)
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert res.stdout.count(f"OK data_parallel {mode}") == ranks, res.stdout
    return d


def params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same_as_reference(run: Path, ref: Path, ranks: int, mode: str = "train",
                             rtol: float = 1e-10) -> None:
    want_losses = json.loads((ref / "losses.json").read_text())
    if mode == "train":
        got_losses = json.loads((run / "losses.json").read_text())
        assert len(got_losses) == len(want_losses) == ITERS
        np.testing.assert_allclose(got_losses, want_losses, rtol=rtol, atol=0)
    by_model: dict[int, dict[str, np.ndarray]] = {}
    seeds = set()
    for w in range(ranks):
        got = params(run / f"{mode}_w{w}.npz")
        m = int(got.pop("model_rank"))
        got.pop("replica")
        seeds.add(int(got.pop("seed")))
        want = params(ref / f"train_w{m}.npz")
        want.pop("model_rank"), want.pop("replica"), want.pop("seed")
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-12, err_msg=k)
        # replicas of one model rank hold bit-identical weights
        if m in by_model:
            for k in got:
                np.testing.assert_array_equal(got[k], by_model[m][k], err_msg=k)
        by_model[m] = got
    # every rank has its own seed (dropout, crops), yet the weights started identical
    assert len(seeds) == ranks, seeds


@pytest.fixture(scope="module")
def reference(lmdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process at batch B."""
    return train(tmp_path_factory.mktemp("dp_ref"), 1, 1, plain_net(lmdb, BATCH))


@pytest.mark.parametrize("replicas", [2, 4])
def test_replicas_equal_one_process_at_r_times_the_batch(replicas: int, lmdb: Path,
                                                         reference: Path,
                                                         tmp_path: Path) -> None:
    run = train(tmp_path, replicas, replicas, plain_net(lmdb, BATCH // replicas))
    assert_same_as_reference(run, reference, replicas)


def test_layer_wise_reduce_false(lmdb: Path, reference: Path, tmp_path: Path) -> None:
    """Caffe's solver field: every bucket starts after backward; the same result."""
    run = train(tmp_path, 2, 2, plain_net(lmdb, BATCH // 2), "layer_wise_reduce: false")
    assert_same_as_reference(run, reference, 2)


def test_iter_size_with_replicas(lmdb: Path, tmp_path: Path) -> None:
    ref = train(tmp_path / "ref", 1, 1, plain_net(lmdb, BATCH), "iter_size: 2")
    run = train(tmp_path / "dp", 2, 2, plain_net(lmdb, BATCH // 2), "iter_size: 2")
    assert_same_as_reference(run, ref, 2)


def test_adam_with_replicas(lmdb: Path, tmp_path: Path) -> None:
    extra = 'type: "Adam" momentum2: 0.999'
    ref = train(tmp_path / "ref", 1, 1, plain_net(lmdb, BATCH), extra)
    run = train(tmp_path / "dp", 2, 2, plain_net(lmdb, BATCH // 2), extra)
    assert_same_as_reference(run, ref, 2, rtol=1e-9)


# -- snapshots ---------------------------------------------------------------------------------
def test_snapshot_resume_is_bit_identical(lmdb: Path, tmp_path: Path) -> None:
    """2 replicas snapshot at iteration 10: one weights file and solver state (replica 0) plus
    replica 1's own run-time state; resuming there ends with the uninterrupted run's weights."""
    net = plain_net(lmdb, BATCH // 2)
    run = train(tmp_path, 2, 2, net, "snapshot: 10")
    models = sorted(p.name for p in tmp_path.glob("snap_iter_10*"))
    assert models == ["snap_iter_10.caffemodel", "snap_iter_10.solverstate",
                      "snap_iter_10_replica_1.solverstate"], models
    train(tmp_path, 2, 2, net, "snapshot: 10", mode="resume",
          state=str(tmp_path / "snap_iter_10.solverstate"))
    for w in range(2):
        a, b = params(run / f"train_w{w}.npz"), params(run / f"resume_w{w}.npz")
        a.pop("seed"), b.pop("seed")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"rank {w} {k}")


def test_resume_with_another_replica_count(lmdb: Path, reference: Path,
                                          tmp_path: Path) -> None:
    """A snapshot of 2 replicas at batch B/2 resumed by one process at batch B ends where the
    uninterrupted single-process run ends: the data position saved is the stream's."""
    train(tmp_path / "dp", 2, 2, plain_net(lmdb, BATCH // 2), "snapshot: 10")
    one = train(tmp_path / "one", 1, 1, plain_net(lmdb, BATCH), mode="resume",
                state=str(tmp_path / "dp" / "snap_iter_10.solverstate"))
    got, want = params(one / "resume_w0.npz"), params(reference / "train_w0.npz")
    got.pop("seed"), want.pop("seed")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_replicas_with_different_weights_refuse_to_start(lmdb: Path, tmp_path: Path) -> None:
    (tmp_path / "net.prototxt").write_text(plain_net(lmdb, BATCH // 2))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(solver_text(tmp_path / "net.prototxt", tmp_path / "snap"))
    res = mpirun.run_python_mpi(2, WORKER, solver, tmp_path, 2, "mismatch", timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "the replicas disagree on the (iteration, weights digest)" in out, out
    assert "OK data_parallel" not in out


# -- faults ------------------------------------------------------------------------------------
def faulty_net(fault: dict, module: str = "faults", layer: str = "Fault") -> str:
    """A net over 2 model ranks (DummyData and conv on model rank 0, a branch per model rank
    through MPIBroadcast/MPIGather) with the fault-injecting layer of workers/faults.py (or
    another Python layer of workers/)."""
    r0 = "include { mpi_rank: 0 }"
    return f"""name: "faulty"
layer {{ name: "data" type: "DummyData" top: "data" top: "label" {r0}
  dummy_data_param {{ shape {{ dim: 4 dim: 3 dim: 6 dim: 6 }} shape {{ dim: 4 }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {r0}
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "bcast" type: "MPIBroadcast" bottom: "conv1" top: "conv1_b" }}
layer {{ name: "fault" type: "Python" bottom: "conv1_b" top: "conv1f"
  python_param {{ module: "{module}" layer: "{layer}" param_str: '{json.dumps(fault)}' }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv1f" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "gather" type: "MPIGather" bottom: "ip" top: "ip_0" top: "ip_1" }}
layer {{ name: "avg" type: "Eltwise" bottom: "ip_0" bottom: "ip_1" top: "score" {r0} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  {r0} }}
"""


def launch_cli(d: Path, fault: dict, timeout: float, module: str = "faults",
               layer: str = "Fault", solver_extra: str = "",
               flags: tuple[str, ...] = ("--replicas", "2"),
               ) -> tuple[subprocess.CompletedProcess, float]:
    (d / "net.prototxt").write_text(faulty_net(fault, module, layer))
    solver = d / "solver.prototxt"
    solver.write_text(f"""net: "{d / 'net.prototxt'}"
base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" max_iter: 8 display: 1
snapshot: 4 snapshot_prefix: "{d / 'job'}" random_seed: 1 solver_mode: CPU {solver_extra}
""")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(WORKERS), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    cli = [sys.executable, "-m", "pycaffe_mpi.cli", "train", "--solver", str(solver), *flags]
    t0 = time.monotonic()
    try:
        proc = mpirun.run_mpi(4, cli, timeout=timeout, env=env, cwd=d)
    except TimeoutError as e:
        pytest.fail(f"the job hung (killed after {timeout:g} s):\n{e}")
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def normal_cli_run_s(tmp_path_factory: pytest.TempPathFactory) -> float:
    """4 ranks = 2 replicas x 2 model ranks through the CLI, no fault: it snapshots once per
    model rank (replica 0) plus replica 1's states; its wall time bounds the start-up."""
    d = tmp_path_factory.mktemp("dp_cli_ok")
    proc, seconds = launch_cli(d, {"rank": 0, "phase": "none"}, 90)
    assert proc.returncode == 0, proc.stderr
    assert "Optimization Done." in proc.stderr
    names = sorted(p.name for p in d.glob("job_iter_4*"))
    assert names == ["job_iter_4_rank_0.caffemodel", "job_iter_4_rank_0.solverstate",
                     "job_iter_4_rank_0_replica_1.solverstate",
                     "job_iter_4_rank_1.caffemodel", "job_iter_4_rank_1.solverstate",
                     "job_iter_4_rank_1_replica_1.solverstate"], names
    return seconds


@pytest.mark.parametrize("phase", ["forward", "backward", "snapshot", "kill"])
def test_fault_on_a_replica_ends_every_rank(phase: str, normal_cli_run_s: float,
                                            tmp_path: Path) -> None:
    """World rank 3 (replica 1, model rank 1) raises in its 3rd forward or backward, fails to
    write its first snapshot, or is killed: the job ends within seconds of a normal run's
    time, with a [rank 3/4] message where the process lives to write one."""
    proc, seconds = launch_cli(tmp_path, {"rank": 3, "phase": phase, "iter": 2},
                               normal_cli_run_s + 30)
    assert proc.returncode != 0, proc.stderr
    assert seconds < normal_cli_run_s + 10, \
        f"took {seconds:.1f} s (normal {normal_cli_run_s:.1f} s)"
    assert "Optimization Done." not in proc.stderr
    if phase == "kill":
        return
    what = "cannot write snapshot" if phase == "snapshot" else f"injected fault in {phase}"
    lines = [ln for ln in proc.stderr.splitlines() if what in ln]
    assert any(ln.startswith("[rank 3/4]") for ln in lines), proc.stderr


def test_signals_act_on_every_replica_at_once(tmp_path: Path) -> None:
    """SIGHUP then SIGINT reach world rank 0 (Caffe's defaults: snapshot, then stop): every
    replica snapshots after the same iteration and stops after the same iteration."""
    at = {"rank": 0, "at": {"1": "SIGHUP", "4": "SIGINT"}}
    proc, _ = launch_cli(tmp_path, at, 90, module="data_parallel_signal", layer="Signal")
    assert proc.returncode == 0, proc.stderr
    assert "Optimization stopped early." in proc.stderr, proc.stderr
    # iteration 2: SIGHUP's snapshot; 4: the solver's snapshot: 4; 5: snapshot_after_train
    names = sorted(p.name for p in tmp_path.glob("job_iter_*"))
    assert names == [f"job_iter_{i}_rank_{m}{s}" for i in (2, 4, 5) for m in (0, 1)
                     for s in (".caffemodel", ".solverstate", "_replica_1.solverstate")], names


# -- with model parallelism: the MCL ensemble -----------------------------------------------------
def mcl_net(lmdb: Path, batch: int, d: Path) -> str:
    """A 4-member MCL ensemble (k 1) of the plain net, placed over 2 model ranks by the
    ensemble generator (members 0, 2 on model rank 0 with data and loss; 1, 3 on rank 1)."""
    from pycaffe_mpi import ensemble

    d.mkdir(parents=True, exist_ok=True)
    base = d / "base.prototxt"
    base.write_text(plain_net(lmdb, batch, test=True))
    spec = ensemble.EnsembleSpec(members=4, loss="mcl", k=1, ranks=2)
    net_path, _ = ensemble.write_ensemble(str(base), None, str(d), spec, name=f"mcl_{batch}")
    return Path(net_path).read_text()


def test_mcl_ensemble_two_replicas_of_two_model_ranks(lmdb: Path, tmp_path: Path) -> None:
    """4 members over 2 model ranks x 2 replicas = 4 ranks at batch B/2 train what 2 ranks
    (one replica) train at batch B. The test passes (ensemble metrics over the test batches)
    run once, on replica 0, and agree with the reference's."""
    extra = "test_iter: 3 test_interval: 10 test_initialization: false"
    ref = train(tmp_path / "ref", 2, 1, mcl_net(lmdb, BATCH, tmp_path / "nets"), extra)
    run = train(tmp_path / "dp", 4, 2, mcl_net(lmdb, BATCH // 2, tmp_path / "nets"), extra,
                timeout=180)
    assert_same_as_reference(run, ref, 4)

    def tests(d: Path) -> list[dict]:
        lines = (d / "snap_results.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "test"]

    got, want = tests(run), tests(ref)
    assert [r["iter"] for r in got] == [r["iter"] for r in want] == [10, 20]
    assert all(r["rank"] == 0 for r in got)
    for g, w in zip(got, want):
        assert g["outputs"].keys() == w["outputs"].keys()
        for k in w["outputs"]:
            np.testing.assert_allclose(g["outputs"][k], w["outputs"][k], rtol=1e-8, err_msg=k)


# -- planning, data split and the printed command (no MPI job) -----------------------------------
def test_layout_and_buckets() -> None:
    from pycaffe_mpi import errors
    from pycaffe_mpi.comm import replicas

    lay = replicas.Layout(8, 2)
    assert lay.model_size == 4 and lay.place(6) == (1, 2) and lay.world_rank(1, 2) == 6
    assert lay.model_members(1) == [4, 5, 6, 7] and lay.across_members(3) == [3, 7]
    with pytest.raises(errors.PycaffeError, match="does not divide"):
        replicas.Layout(6, 4)
    # params 0..3 used by layers 0, 1, 3 and (shared) 0: backward finishes 2 first, then 1,
    # then 3 and 0 (both final after layer 0)
    sizes, ready = [10, 10, 10, 10], [0, 1, 3, 0]
    assert replicas.plan_buckets(sizes, ready, 80, 4) == [[2, 1], [3, 0]]
    assert replicas.plan_buckets(sizes, ready, 1, 4) == [[2], [1], [3], [0]]
    assert replicas.plan_buckets(sizes, ready, 10**9, 4) == [[2, 1, 3, 0]]


def test_data_layer_reads_its_replicas_records(lmdb: Path) -> None:
    """Replica k of n reads records k, k+n, k+2n... of the whole stream, across epochs."""
    from google.protobuf import text_format

    from pycaffe_mpi.net import Net
    from pycaffe_mpi.proto import caffe_pb2

    text = f"""layer {{ name: "data" type: "Data" top: "data" top: "label"
      data_param {{ source: "{lmdb}" batch_size: 3 backend: LMDB }} }}"""
    param = text_format.Merge(text, caffe_pb2.NetParameter())
    whole = Net(param, 0, dtype=np.float64)
    stream = np.concatenate([whole.forward()["data"].copy() for _ in range(30)])  # 2+ epochs
    whole.close()
    for n in (2, 3):
        for k in range(n):
            net = Net(param, 0, dtype=np.float64)
            net.layers[0].set_replica(k, n)
            got = np.concatenate([net.forward()["data"].copy() for _ in range(10)])
            net.close()
            np.testing.assert_array_equal(got, stream[k::n][:30], err_msg=f"{k} of {n}")


def test_ensemble_train_command_with_replicas() -> None:
    from pycaffe_mpi import cli_tools

    cmd = cli_tools.train_command("s.prototxt", ranks=2, replicas=2)
    assert " -n 4 " in cmd and cmd.endswith("--replicas 2")


def test_hdf5_data_reads_its_replicas_rows(tmp_path: Path) -> None:
    """HDF5Data over two files (7 and 5 rows): replica k of n reads rows k, k+n... of the
    stream, across files and wraps."""
    import h5py
    from google.protobuf import text_format

    from pycaffe_mpi.net import Net
    from pycaffe_mpi.proto import caffe_pb2

    names = []
    for i, rows in enumerate((7, 5)):
        path = tmp_path / f"part{i}.h5"
        with h5py.File(path, "w") as f:
            f["x"] = np.arange(rows, dtype=np.float64)[:, None] + 100 * i
        names.append(str(path))
    (tmp_path / "list.txt").write_text("\n".join(names))
    text = f"""layer {{ name: "h5" type: "HDF5Data" top: "x"
      hdf5_data_param {{ source: "{tmp_path / 'list.txt'}" batch_size: 3 }} }}"""
    param = text_format.Merge(text, caffe_pb2.NetParameter())
    whole = Net(param, 0, dtype=np.float64)
    stream = np.concatenate([whole.forward()["x"].ravel().copy() for _ in range(20)])
    for n in (2, 3):
        for k in range(n):
            net = Net(param, 0, dtype=np.float64)
            net.layers[0].set_replica(k, n)
            got = np.concatenate([net.forward()["x"].ravel().copy() for _ in range(6)])
            np.testing.assert_array_equal(got, stream[k::n][:18], err_msg=f"{k} of {n}")


def test_bagging_ensemble_with_replicas(lmdb: Path, tmp_path: Path) -> None:
    """Bagging draws each member's bootstrap sample from its layer's generator (seeded per
    rank): the replicas read replica 0's sample, each its share, as one process would."""
    from pycaffe_mpi import ensemble

    def net(batch: int) -> str:
        d = tmp_path / f"nets{batch}"
        d.mkdir()
        (d / "base.prototxt").write_text(plain_net(lmdb, batch))
        spec = ensemble.EnsembleSpec(members=2, bagging=True)
        return Path(ensemble.write_ensemble(str(d / "base.prototxt"), None, str(d), spec)[0]
                    ).read_text()

    ref = train(tmp_path / "ref", 1, 1, net(BATCH))
    assert "bootstrap_param" in (tmp_path / "ref" / "net.prototxt").read_text()
    run = train(tmp_path / "dp", 2, 2, net(BATCH // 2))
    assert_same_as_reference(run, ref, 2)


def test_buckets_start_as_backward_reaches_them() -> None:
    """With one bucket per parameter, each bucket starts right after the backward of the layer
    that owns it, before the layers below run backward (the overlap), and the diffs come back
    unchanged with one replica."""
    from google.protobuf import text_format

    from pycaffe_mpi.comm import SelfComm, replicas
    from pycaffe_mpi.net import Net
    from pycaffe_mpi.proto import caffe_pb2
    from pycaffe_mpi.solvers import data_parallel

    text = """layer { name: "data" type: "DummyData" top: "data" top: "label"
      dummy_data_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 }
        data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
      convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }
    layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
      inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), 0, dtype=np.float64, seed=3)
    world = SelfComm()
    groups = replicas.ReplicaGroups(world, replicas.Layout(1, 1), 0, 0, world, world)
    dp = data_parallel.DataParallel(groups, bucket_mb=1e-9)  # one bucket per parameter
    dp.attach(net)
    events: list[str] = []
    backward = net.backward_from_to
    net.backward_from_to = lambda s, e: (events.append(f"backward {net.layer_names[s]}"),
                                         backward(s, e))
    reducer = dp.reducer
    start = reducer.start
    reducer.start = lambda i: (events.append(f"start {i}"), start(i))
    net.clear_param_diffs()
    dp.forward_backward(net)
    want = [p.diff.copy() for p in net.learnable_params]
    dp.finish(0.0)
    # params: conv1 w, b (0, 1), ip w, b (2, 3); bucket 0 = param 3, 1 = 2, 2 = 1, 3 = 0
    assert reducer.buckets == [[3], [2], [1], [0]]
    assert events == ["backward loss", "backward ip", "start 0", "start 1", "backward conv1",
                      "start 2", "start 3", "backward data"]
    for p, w in zip(net.learnable_params, want):
        np.testing.assert_array_equal(p.diff, w)


# -- the replica count: solver field, --replicas and Caffe's --gpu list ---------------------------
def test_replicas_from_the_solver_file(lmdb: Path, reference: Path, tmp_path: Path) -> None:
    """``replicas: 2`` in the solver file, no ``replicas=``: the same 2 replicas."""
    run = train(tmp_path, 2, "file", plain_net(lmdb, BATCH // 2), "replicas: 2")
    assert_same_as_reference(run, reference, 2)


def test_cli_replicas_from_the_solver_field_and_the_flag_over_it(tmp_path: Path) -> None:
    """4 ranks of the 2-rank net: ``replicas: 2`` in the solver file alone makes 2 replicas;
    ``--replicas 2`` overrides ``replicas: 4``, saying so."""
    quiet = {"rank": 0, "phase": "none"}
    (tmp_path / "a").mkdir()
    proc, _ = launch_cli(tmp_path / "a", quiet, 90, solver_extra="replicas: 2", flags=())
    assert proc.returncode == 0, proc.stderr
    assert "Data parallel: replica 0 of 2" in proc.stderr, proc.stderr
    assert (tmp_path / "a" / "job_iter_4_rank_1_replica_1.solverstate").is_file()
    (tmp_path / "b").mkdir()
    proc, _ = launch_cli(tmp_path / "b", quiet, 90, solver_extra="replicas: 4",
                         flags=("--replicas", "2"))
    assert proc.returncode == 0, proc.stderr
    assert "--replicas 2 overrides the solver's replicas: 4" in proc.stderr, proc.stderr
    assert "Data parallel: replica 0 of 2" in proc.stderr, proc.stderr


def test_replicas_flag_wins_over_the_solver_field(caplog: pytest.LogCaptureFixture) -> None:
    from pycaffe_mpi.solvers import data_parallel

    with caplog.at_level(logging.INFO, logger="pycaffe_mpi"):
        assert data_parallel.resolve_replicas(None, 0) == 1
        assert data_parallel.resolve_replicas(None, 4) == 4
        assert data_parallel.resolve_replicas(2, 0) == 2
        assert data_parallel.resolve_replicas(2, 2) == 2
        assert not caplog.records
        assert data_parallel.resolve_replicas(2, 4) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "--replicas 2 overrides the solver's replicas: 4"]


def test_single_process_refuses_a_solver_asking_for_replicas(tmp_path: Path) -> None:
    from pycaffe_mpi import errors, solvers

    (tmp_path / "net.prototxt").write_text(plain_net(Path("unused"), 2))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(solver_text(tmp_path / "net.prototxt", tmp_path / "snap", "replicas: 2"))
    with pytest.raises(errors.PycaffeError, match=r"replicas\) does not divide the 1 MPI ranks"):
        solvers.Solver(str(solver))


def test_ranks_agree_on_the_replicas_field() -> None:
    """A field that decides the communicators: ranks that disagree fail together, naming it;
    unset (0) and 1 mean the same."""
    from google.protobuf import text_format

    from pycaffe_mpi.proto import caffe_pb2
    from pycaffe_mpi.solvers import agreement

    def digest(text: str) -> list:
        return agreement.settings_digest(text_format.Merge(text, caffe_pb2.SolverParameter()))

    assert agreement.first_mismatch([digest(""), digest("replicas: 1")]) is None
    msg = agreement.first_mismatch([digest("replicas: 2"), digest("replicas: 2"), digest("")])
    assert msg is not None and 'solver field "replicas": ranks 0,1: replicas = 2; rank 2: ' \
        "replicas = 1" in msg, msg


def test_gpu_list_is_one_device_per_replica() -> None:
    """Caffe's ``--gpu 0,1,2,3``: G ids, W = G x M ranks -> G replicas, every rank of replica k
    on ids[k]; with W = G ids and a net of several ranks, MPI-Caffe's one id per rank."""
    from pycaffe_mpi.comm import replicas

    # a plain net (M = 1) on 4 ranks: 4 replicas, one GPU each
    assert replicas.gpu_devices(4, [0, 1, 2, 3], None, 1) == (4, [0, 1, 2, 3])
    # a 3-rank net (MCL over 3 ranks) on 6 ranks with 2 GPUs: 2 replicas sharing a GPU each
    assert replicas.gpu_devices(6, [0, 1], None, 3) == (2, [0, 0, 0, 1, 1, 1])
    assert replicas.gpu_devices(8, [3, 2], None, 4) == (2, [3, 3, 3, 3, 2, 2, 2, 2])
    # the 3-rank net on 3 ranks with 3 ids: one id per rank, one replica (MPI-Caffe)
    assert replicas.gpu_devices(3, [0, 1, 2], None, 3) == (1, [0, 1, 2])
    # one id: every rank's; the count comes from elsewhere
    assert replicas.gpu_devices(4, [1], None, 2) == (1, [1, 1, 1, 1])
    assert replicas.gpu_devices(4, [1], 2, 1) == (2, [1, 1, 1, 1])
    # an explicit count: the list is one id per replica, or one per rank
    assert replicas.gpu_devices(4, [0, 1], 2, 1) == (2, [0, 0, 1, 1])
    assert replicas.gpu_devices(4, [0, 1, 2, 3], 2, 1) == (2, [0, 1, 2, 3])
    assert replicas.gpu_devices(4, [0, 1, 2, 3], 4, 9) == (4, [0, 1, 2, 3])


def test_gpu_list_that_fits_no_form_is_refused() -> None:
    from pycaffe_mpi import errors
    from pycaffe_mpi.comm import replicas

    with pytest.raises(errors.PycaffeError, match=r"--gpu 0,1,2 lists 3 devices, but --replicas "
                       r"is 2 on 4 MPI ranks: give one device per replica \(2 ids\) or one per "
                       r"rank \(4 ids\)"):
        replicas.gpu_devices(4, [0, 1, 2], 2, 1)
    with pytest.raises(errors.PycaffeError, match="the solver's replicas field is 4"):
        replicas.gpu_devices(6, [0, 1], 4, 1, "the solver's replicas field")
    with pytest.raises(errors.PycaffeError, match=r"lists 2 devices for 4 MPI ranks: as 2 "
                       r"replicas of this net \(3 ranks each\) the job needs mpiexec -n 6"):
        replicas.gpu_devices(4, [0, 1], None, 3)
    with pytest.raises(errors.PycaffeError, match=r"one process drives one GPU.*mpiexec -n 2"):
        replicas.gpu_devices(1, [0, 1], None, 1)


def test_train_command_reads_the_count_and_this_ranks_gpu() -> None:
    """``pycaffe-mpi train``'s choice per rank: --replicas, else the solver field, else the
    --gpu list (the net's model ranks from its mpi_rank rules)."""
    from pycaffe_mpi import cli, errors, solvers

    mcl = solvers.read_solver_param(str(REPO / "solvers" / "cifar10_mcl.prototxt"))  # 3 ranks
    quick = solvers.read_solver_param(str(REPO / "models/cifar10_quick/solver.prototxt"))
    assert [cli._replicas_and_gpu(None, mcl, "0,1", r, 6) for r in range(6)] == \
        [(2, "0")] * 3 + [(2, "1")] * 3
    assert [cli._replicas_and_gpu(None, quick, "0,1", r, 2) for r in range(2)] == \
        [(2, "0"), (2, "1")]
    assert cli._replicas_and_gpu(None, quick, "", 1, 4) == (1, "")
    assert cli._replicas_and_gpu(4, quick, "all", 1, 4) == (4, "all")
    assert cli._replicas_and_gpu(2, quick, "0,1,2,3", 3, 4) == (2, "3")  # one id per rank
    quick.replicas = 2
    assert cli._replicas_and_gpu(None, quick, "5,6", 1, 4) == (2, "5")
    with pytest.raises(errors.PycaffeError, match="--replicas is 4 on 6 MPI ranks"):
        cli._replicas_and_gpu(4, mcl, "0,1", 0, 6)
    with pytest.raises(errors.PycaffeError, match='--gpu expects device ids, got "0,x"'):
        cli._replicas_and_gpu(None, quick, "0,x", 0, 2)


def test_documented_commands_parse_and_name_shipped_files() -> None:
    """docs/data_parallel.md goes into the README: its shell blocks' ``pycaffe-mpi`` commands
    parse and the files they name under models/ and solvers/ exist (as the README's test)."""
    import shlex

    from pycaffe_mpi import cli

    parser, in_block, commands = cli.build_parser(), False, []
    for line in (REPO / "docs" / "data_parallel.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() in ("```sh", "```bash", "```shell")
            continue
        text = line.split("#", 1)[0].strip()
        words = shlex.split(text) if in_block and "pycaffe-mpi " in text else []
        at = [i for i, w in enumerate(words) if os.path.basename(w) == "pycaffe-mpi"]
        if at:
            commands.append(words[at[0] + 1:])
    assert len(commands) >= 6, commands
    for argv in commands:
        args = parser.parse_args(cli.normalise_argv(argv, parser))
        for path in (getattr(args, "solver", "") or "").split(",") + \
                (getattr(args, "model", "") or "").split(","):
            if path.startswith(("models/", "solvers/")):
                assert (REPO / path).is_file(), f"{' '.join(argv)}: {path} does not exist"
