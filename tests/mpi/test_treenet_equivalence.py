"""The distributed TreeNet is the net: 3 MPI ranks train exactly what one process trains.

A small TreeNet (Data from a tiny LMDB, trunk conv+pool on rank 0, MPIBroadcast, one conv/IP
branch per rank, MPIGather to rank 0, Eltwise SUM x 1/3, SoftmaxWithLoss on rank 0) is trained
for 20 SGD iterations (momentum, weight decay, lr_mult/decay_mult, float64) by
``workers/treenet_equiv.py`` at 3 ranks. The same TreeNet written as one single-process net (the
three branches side by side, branch layers renamed ``conv2_<k>``/``ip_<k>``) starts from the
ranks' initial weights (trunk from rank 0, branch k from rank k), reads the same batches, and
must end with every rank's final weights and the same per-iteration losses to ~1e-10 relative.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets, solvers
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing import mpirun

pytestmark = pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                reason=str(mpirun.mpi_unavailable_reason()))

WORKER = Path(__file__).parent / "workers" / "treenet_equiv.py"
RANKS = 3
ITERS = 20
BRANCH_LAYERS = ("conv2", "ip")
TRUNK_LAYERS = ("conv1",)

FILLERS = ('weight_filler { type: "gaussian" std: 0.3 } '
           'bias_filler { type: "gaussian" std: 0.1 }')
PARAMS = 'param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }'
COEFFS = " ".join(["coeff: 0.333333333333"] * RANKS)


def _trunk(lmdb: Path, only_rank0: str) -> str:
    return f"""
layer {{ name: "data" type: "Data" top: "data" top: "label" {only_rank0}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{lmdb}" batch_size: 8 backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {only_rank0} {PARAMS}
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 {FILLERS} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" {only_rank0}
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
"""


def _branch(bottom: str, k: str) -> str:
    return f"""
layer {{ name: "conv2{k}" type: "Convolution" bottom: "{bottom}" top: "conv2{k}" {PARAMS}
  convolution_param {{ num_output: 4 kernel_size: 3 {FILLERS} }} }}
layer {{ name: "relu2{k}" type: "ReLU" bottom: "conv2{k}" top: "conv2{k}" }}
layer {{ name: "ip{k}" type: "InnerProduct" bottom: "conv2{k}" top: "ip{k}" {PARAMS}
  inner_product_param {{ num_output: 4 {FILLERS} }} }}
"""


def _head(only_rank0: str) -> str:
    bottoms = " ".join(f'bottom: "ip_{k}"' for k in range(RANKS))
    return f"""
layer {{ name: "avg" type: "Eltwise" {bottoms} top: "score" {only_rank0}
  eltwise_param {{ operation: SUM {COEFFS} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  {only_rank0} }}
"""


def mpi_treenet(lmdb: Path) -> str:
    """The TreeNet as MPI-Caffe users write it: one prototxt, pruned per rank."""
    r0 = "include { mpi_rank: 0 }"
    tops = " ".join(f'top: "ip_{k}"' for k in range(RANKS))
    return ('name: "treenet"\n' + _trunk(lmdb, r0)
            + 'layer { name: "bcast" type: "MPIBroadcast" bottom: "pool1" top: "pool1_b" '
              "mpi_param { root: 0 } }\n"
            + _branch("pool1_b", "")
            + f'layer {{ name: "gather" type: "MPIGather" bottom: "ip" {tops} '
              "mpi_param { root: 0 } }\n"
            + _head(r0))


def single_treenet(lmdb: Path) -> str:
    """The same TreeNet in one process: the branches side by side, renamed ``<layer>_<k>``."""
    return ('name: "treenet"\n' + _trunk(lmdb, "")
            + "".join(_branch("pool1", f"_{k}") for k in range(RANKS)) + _head(""))


def solver_text(net: Path) -> str:
    return f"""net: "{net}"
base_lr: 0.05 momentum: 0.9 weight_decay: 0.004 lr_policy: "fixed"
max_iter: {ITERS} display: 0 average_loss: 1 random_seed: 7 snapshot_after_train: false
solver_mode: CPU
"""


@pytest.fixture(scope="module")
def mpi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the TreeNet at 3 ranks once; the directory holds the weights and losses."""
    d = tmp_path_factory.mktemp("treenet")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(48, 3, 8, 8), dtype=np.uint8)  # 6 batches: wraps
    labels = rng.integers(0, 4, size=48)
    datasets.write_datum_lmdb(d / "train_lmdb", images, labels)
    (d / "mpi.prototxt").write_text(mpi_treenet(d / "train_lmdb"))
    (d / "single.prototxt").write_text(single_treenet(d / "train_lmdb"))
    (d / "mpi_solver.prototxt").write_text(solver_text(d / "mpi.prototxt"))
    (d / "single_solver.prototxt").write_text(solver_text(d / "single.prototxt"))
    res = mpirun.run_python_mpi(RANKS, WORKER, d / "mpi_solver.prototxt", d, ITERS, timeout=60)
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    # NOTE: match tokens, not lines: mpiexec may still merge the ranks' output
    ok = ["OK treenet_equiv" + part.split("\n")[0]
          for part in res.stdout.split("OK treenet_equiv")[1:]]
    assert len(ok) == RANKS, res.stdout
    # the pruning the test relies on: the trunk only on rank 0, a branch on every rank
    assert "conv1" in next(ln for ln in ok if "rank 0/" in ln)
    assert all("conv1" not in ln and "conv2" in ln for ln in ok if "rank 0/" not in ln)
    return d


def _layers(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> its parameter arrays, read from a .caffemodel (a float64 net writes
    ``double_data``, so these are exact)."""
    param = io.read_proto_binary(str(path), caffe_pb2.NetParameter())
    return {lp.name: [io.blobproto_to_array(b) for b in lp.blobs]
            for lp in param.layer if len(lp.blobs)}


def _exact(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> its exact float64 parameter arrays, from the worker's .npz."""
    out: dict[str, list[np.ndarray]] = {}
    with np.load(path) as z:
        for key in sorted(z.files, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
            out.setdefault(key.rsplit("/", 1)[0], []).append(z[key])
    return out


def _mapped_init(d: Path) -> caffe_pb2.NetParameter:
    """The ranks' exact initial weights as one NetParameter (``double_data``, as Caffe's
    ``Blob<double>::ToProto`` writes) with the single net's layer names."""
    out = caffe_pb2.NetParameter()
    for rank in range(RANKS):
        for name, arrays in _exact(d / f"init_rank_{rank}.npz").items():
            if name in BRANCH_LAYERS:
                lp = out.layer.add(name=f"{name}_{rank}")
            elif rank == 0:
                lp = out.layer.add(name=name)
            else:
                continue
            for a in arrays:
                b = lp.blobs.add()
                b.shape.dim.extend(a.shape)
                b.double_data.extend(a.ravel().tolist())
    return out


@pytest.fixture(scope="module")
def single_run(mpi_run: Path) -> tuple[solvers.Solver, list[float]]:
    solver = solvers.Solver(str(mpi_run / "single_solver.prototxt"), dtype=np.float64)
    try:
        solver.net.copy_trained_layers_from(_mapped_init(mpi_run))
        losses = []
        for _ in range(ITERS):
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
    finally:
        solver.close()
    return solver, losses


def test_ranks_start_from_different_branches(mpi_run: Path) -> None:
    """The default seeds (random_seed + rank) give each rank its own branch weights, and each
    rank's weights file holds exactly the layers of its pruned net."""
    inits = [_layers(mpi_run / f"init_rank_{r}.caffemodel") for r in range(RANKS)]
    for r, w in enumerate(inits):  # net.save wrote the float64 weights as double_data
        exact = _exact(mpi_run / f"init_rank_{r}.npz")
        assert set(exact) == set(w)
        for name, arrays in exact.items():
            for a, b in zip(arrays, w[name]):
                np.testing.assert_array_equal(b, a)
    assert set(inits[0]) == {*TRUNK_LAYERS, *BRANCH_LAYERS}
    assert all(set(w) == set(BRANCH_LAYERS) for w in inits[1:])
    for a in range(RANKS):
        for b in range(a + 1, RANKS):
            assert not np.allclose(inits[a]["conv2"][0], inits[b]["conv2"][0])


def test_losses_match(mpi_run: Path, single_run: tuple[solvers.Solver, list[float]]) -> None:
    mpi_losses = json.loads((mpi_run / "losses.json").read_text())
    _, losses = single_run
    assert len(mpi_losses) == len(losses) == ITERS
    assert losses[-1] < losses[0]  # it learns, so the comparison is not of a frozen net
    np.testing.assert_allclose(mpi_losses, losses, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", range(RANKS))
def test_final_weights_match(mpi_run: Path, single_run: tuple[solvers.Solver, list[float]],
                             rank: int) -> None:
    solver, _ = single_run
    final = _exact(mpi_run / f"final_rank_{rank}.npz")
    init = _exact(mpi_run / f"init_rank_{rank}.npz")
    saved = _layers(mpi_run / f"final_rank_{rank}.caffemodel")
    names = [*TRUNK_LAYERS, *BRANCH_LAYERS] if rank == 0 else list(BRANCH_LAYERS)
    assert set(final) == set(names)
    for name in names:
        single_name = f"{name}_{rank}" if name in BRANCH_LAYERS else name
        ours = [np.asarray(b.data) for b in solver.net.params[single_name]]
        assert len(ours) == len(final[name])
        for j, (got, want) in enumerate(zip(final[name], ours)):
            assert got.dtype == np.float64
            np.testing.assert_array_equal(saved[name][j], got)
            moved = np.max(np.abs(got - init[name][j]))
            assert moved > 1e-3, f"{name} param {j} barely trained ({moved:.3g})"
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12,
                                       err_msg=f"rank {rank} layer {name} param {j} "
                                               f"(single net: {single_name})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
