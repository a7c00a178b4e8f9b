"""Generated ensembles placed over 3 MPI ranks train exactly as the same ensembles in one process.

For each case a small base net (tiny LMDB, conv/pool/ip/ip, SoftmaxWithLoss) goes through
``write_ensemble`` twice with the same options: once placed over 3 ranks, once in one process.
``workers/ensemble_placement.py`` trains the placed one at 3 ranks with one seed for every rank
(float64, momentum, weight decay, test passes included); the one-process ensemble is trained here
with the same solver seed, so every layer starts from the weights its name gives it in both. The
per-iteration losses, the last test scores and every rank's final weights must match to ~1e-10
relative, and each rank must hold exactly its members (member i on rank i % 3) and no data.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets, ensemble, solvers
from pycaffe_mpi.testing import mpirun

pytestmark = pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                reason=str(mpirun.mpi_unavailable_reason()))

WORKER = Path(__file__).parent / "workers" / "ensemble_placement.py"
RANKS = 3
ITERS = 8
CASES = {
    "mcl_tree": ensemble.EnsembleSpec(members=4, split="pool1", loss="mcl", ranks=RANKS),
    "prob_avg_conv1": ensemble.EnsembleSpec(members=3, split="conv1", loss="prob-avg",
                                            ranks=RANKS),
    "bagging": ensemble.EnsembleSpec(members=3, bagging=True, same_init=True, ranks=RANKS),
}
FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }'
BASE = f"""name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.01 }} data_param {{ source: "{{db}}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.01 }} data_param {{ source: "{{db}}" batch_size: 3 backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 {FILL} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param {{ num_output: 5 {FILL} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 {FILL} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
SOLVER = """net: "{net}"
base_lr: 0.05 momentum: 0.9 weight_decay: 0.004 lr_policy: "fixed" max_iter: 100 display: 0
average_loss: 1 test_iter: 2 test_interval: 3 random_seed: 7 snapshot_after_train: false
snapshot_prefix: "{prefix}" solver_mode: CPU
"""


@pytest.fixture(scope="module")
def mpi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write every case twice (3 ranks, one process) and train the placed ones in one job."""
    d = tmp_path_factory.mktemp("ensemble_placement")
    rng = np.random.default_rng(5)
    datasets.write_datum_lmdb(d / "db", rng.integers(0, 256, (30, 2, 4, 4), dtype=np.uint8),
                              rng.integers(0, 3, 30))
    (d / "base.prototxt").write_text(BASE.replace("{db}", str(d / "db")))
    (d / "solver.prototxt").write_text(SOLVER.format(net=d / "base.prototxt",
                                                     prefix=d / "snaps" / "tiny"))
    for name, spec in CASES.items():
        for sub, s in (("ranks", spec), ("one", dataclasses.replace(spec, ranks=1))):
            ensemble.write_ensemble(str(d / "base.prototxt"), str(d / "solver.prototxt"),
                                    str(d / name / sub), s)
    res = mpirun.run_python_mpi(RANKS, WORKER, ITERS, *(d / name for name in CASES),
                                timeout=120)
    assert res.returncode == 0, f"rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    (d / "stdout.txt").write_text(res.stdout)
    return d


def _reported_layers(d: Path, case: str) -> dict[int, list[str]]:
    """Rank -> the layers of its train net, from the worker's OK lines."""
    out = {}
    for m in re.finditer(rf"OK {case} rank (\d+)/{RANKS} layers ([\w,]+)",
                         (d / "stdout.txt").read_text()):
        out[int(m.group(1))] = m.group(2).split(",")
    return out


def _npz(path: Path) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    with np.load(path) as z:
        for key in sorted(z.files, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
            out.setdefault(key.rsplit("/", 1)[0], []).append(z[key])
    return out


def _member(layer: str) -> int | None:
    base, _, m = layer.rpartition("_m")
    # with bagging, a member's own Data copy (data_m<i>) lives on its rank too
    return int(m) if base in ("data", "conv1", "relu1", "pool1", "ip1", "relu2", "ip2") and \
        m.isdigit() else None


@pytest.mark.parametrize("case", list(CASES))
def test_placed_ensemble_trains_as_one_process(mpi_run: Path, case: str) -> None:
    spec = CASES[case]
    layers = _reported_layers(mpi_run, case)
    assert sorted(layers) == list(range(RANKS)), (mpi_run / "stdout.txt").read_text()
    for r, names in layers.items():
        hosted = {_member(n) for n in names} - {None}
        assert hosted == {m for m in range(spec.members) if m % RANKS == r}
        if r:
            assert "data" not in names  # the shared data stays on rank 0
    solver = solvers.Solver(str(mpi_run / case / "one" / "solver.prototxt"), dtype=np.float64)
    try:
        losses = []
        for _ in range(ITERS):
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
        got = json.loads((mpi_run / case / "mpi.json").read_text())
        assert losses[-1] != losses[0]
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-10, atol=1e-12)
        assert got["test_scores"] and got["test_scores"][0]
        np.testing.assert_allclose(got["test_scores"], solver.mean_scores, rtol=1e-10,
                                   atol=1e-12)
        seen: set[str] = set()
        for r in range(RANKS):
            for name, arrays in _npz(mpi_run / case / f"final_rank_{r}.npz").items():
                assert name not in seen, f"{name} on two ranks"
                seen.add(name)
                ours = solver.net.params[name]
                for j, (a, b) in enumerate(zip(arrays, ours)):
                    np.testing.assert_allclose(a, np.asarray(b.data), rtol=1e-10, atol=1e-12,
                                               err_msg=f"rank {r} layer {name} param {j}")
        assert seen == set(solver.net.params)
    finally:
        solver.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
