"""The shipped ensemble files, tools/reproduce.py, and MCL fine-tuned from a trained ensemble.

- models/cifar10_mcl, models/cifar10_ensembles and solvers/cifar10_mcl.prototxt are what
  tools/make_ensemble_models.py writes today, and they parse.
- tools/reproduce.py: the experiment plan (the pretraining chain and the fine-tunes that hang on
  it), the log parser and the table, on hand-written logs.
- `pycaffe-mpi train --weights` from an independent ensemble's snapshot starts an MCL ensemble
  from those weights, and ``iter_size`` accumulation under MCL equals one larger batch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from pycaffe_mpi import cli, datasets, ensemble, prototxt, solvers
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.reports import results

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str) -> ModuleType:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(REPO / "tools"))


# -- shipped files ----------------------------------------------------------------------------


def test_shipped_ensemble_files_are_the_generators_output(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    tool = _tool("make_ensemble_models")
    monkeypatch.chdir(REPO)
    assert tool.main(["--check"]) == 0, capsys.readouterr().err


def test_main_job_is_mcl_over_three_ranks() -> None:
    solver = prototxt.read_solver(str(REPO / "solvers/cifar10_mcl.prototxt"))
    assert solver.net == "models/cifar10_mcl/train_test.prototxt"
    net, _ = prototxt.read_net(str(REPO / solver.net))
    types = [lp.type for lp in net.layer]
    assert types.count("MultipleChoiceLoss") == 1 and "EnsembleAccuracy" in types
    assert "MPIBroadcast" in types and "MPIGather" in types
    ranks = {r for lp in net.layer for rule in lp.include for r in rule.mpi_rank}
    assert ranks == {0, 1, 2}
    loss = next(lp for lp in net.layer if lp.type == "MultipleChoiceLoss")
    assert len(loss.bottom) == 5 and loss.multiple_choice_loss_param.k == 1


# -- tools/reproduce.py -------------------------------------------------------------------------


LOG = """I1128 solver.py:528] Iteration 500, Testing net (#0)
I1128 solver.py:513]     Test net output #0: ensemble_accuracy = 0.5
I1128 solver.py:513]     Test net output #1: oracle_accuracy = 0.7
I1128 solver.py:513]     Test net output #2: member_accuracy_0 = 0.25
I1128 solver.py:513]     Test net output #3: member_accuracy_1 = 0.5
I1128 solver.py:528] Iteration 1000, Testing net (#0)
I1128 solver.py:513]     Test net output #0: ensemble_accuracy = 0.625
I1128 solver.py:513]     Test net output #1: oracle_accuracy = 0.875
I1128 solver.py:513]     Test net output #2: member_accuracy_0 = 0.375
I1128 solver.py:513]     Test net output #3: member_accuracy_1 = 0.5
I1128 solver.py:415] Optimization Done.
"""


def test_reproduce_reads_the_last_test_pass(tmp_path: Path) -> None:
    rp = _tool("reproduce")
    (tmp_path / "train.log").write_text(LOG)  # a run without a results file: its log is read
    assert rp.final_test_outputs(tmp_path) == {
        "ensemble_accuracy": 0.625, "oracle_accuracy": 0.875,
        "member_accuracy_0": 0.375, "member_accuracy_1": 0.5}
    with results.ResultsWriter(tmp_path / "snap_results.jsonl") as w:
        w.write_train(0, 0.01, 1.0, {"loss": 2.3})
        w.write_test(10, 2.0, {"ensemble_accuracy": 0.5, "member_accuracy": [0.25, 0.5]})
        w.write_test(20, 3.0, {"ensemble_accuracy": 0.75, "member_accuracy": [0.5, 0.625]})
        w.write_test(20, 3.0, {"accuracy": 0.1}, test_net=1)
        w.write_train(20, 0.01, 3.5, {"loss": 1.0})
    assert rp.final_test_outputs(tmp_path) == {  # the results file wins over the log
        "ensemble_accuracy": 0.75, "member_accuracy_0": 0.5, "member_accuracy_1": 0.625}


def test_reproduce_table_sets_measured_beside_paper(tmp_path: Path) -> None:
    rp = _tool("reproduce")
    exps = [e for e in rp.experiments(["4"]) if e.key in ("single", "mcl_k1")]
    for key, acc in (("single_t0", 0.75), ("single_t1", 0.77)):
        (tmp_path / key).mkdir()
        (tmp_path / key / "done").write_text("1")
        with results.ResultsWriter(tmp_path / key / "snap_results.jsonl") as w:
            w.write_test(10, 1.0, {"accuracy": acc})
    (tmp_path / "mcl_k1_t0").mkdir()
    (tmp_path / "mcl_k1_t0" / "done").write_text("1")
    (tmp_path / "mcl_k1_t0" / "train.log").write_text(LOG)
    rows = rp.collect(exps, 2, tmp_path)
    text = rp.table(exps, rows, "header")
    single = next(line for line in text.splitlines() if "single model" in line)
    assert "76.00 ±1.41" in single and "77.06" in single
    mcl = next(line for line in text.splitlines() if "MCL k=1" in line)
    assert "62.50" in mcl and "87.50" in mcl and "93.10" in mcl and "28.38" in mcl
    assert "37.50 / 50.00" in mcl


def test_reproduce_plan_chains_pretraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    rp = _tool("reproduce")
    monkeypatch.chdir(REPO)
    assert rp.main(["--scale", "0.1", "--tables", "5", "--out", str(tmp_path),
                    "--dry-run"]) == 0
    # single; random init as 5 pretraining links + the rest; 5 MCL fine-tunes
    assert "12 training runs" in capsys.readouterr().out
    d = tmp_path / "random_init_t0"
    stage = prototxt.read_solver(str(d / "solver_to_50.prototxt"))
    assert stage.max_iter == 50 and stage.snapshot_after_train
    full = prototxt.read_solver(str(d / "solver.prototxt"))
    assert full.max_iter == 500 and list(full.stepvalue) == [400] and full.test_interval == 500
    mcl = prototxt.read_solver(str(tmp_path / "mcl_k1_pre500_t0" / "solver.prototxt"))
    net, _ = prototxt.read_net(mcl.net)
    assert any(lp.type == "MultipleChoiceLoss" for lp in net.layer)


def test_reproduce_defaults_to_the_papers_setting_and_keeps_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    rp = _tool("reproduce")
    monkeypatch.chdir(REPO)
    assert rp.main(["--tables", "1,4", "--only", "random_init,mcl_k1", "--out", str(tmp_path),
                    "--dry-run"]) == 0
    assert "2 training runs" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcl_k1_t0", "random_init_t0"]
    solver = prototxt.read_solver(str(tmp_path / "mcl_k1_t0" / "solver.prototxt"))
    assert solver.max_iter == 5000 and list(solver.stepvalue) == [4000]
    net, _ = prototxt.read_net(solver.net)
    train_batches = {lp.data_param.batch_size for lp in net.layer
                     if lp.type == "Data" and any(r.phase == caffe_pb2.TRAIN
                                                  for r in lp.include)}
    assert train_batches == {350}
    assert rp.main(["--tables", "1", "--only", "mcl_k1", "--out", str(tmp_path / "x"),
                    "--dry-run"]) != 0
    assert "no experiment 'mcl_k1' in tables 1" in capsys.readouterr().err


# -- MCL from a trained ensemble -----------------------------------------------------------------

NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.01 }}
  data_param {{ source: "{db}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 6 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
SOLVER = """net: "{net}" base_lr: 0.1 momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed"
max_iter: {iters} iter_size: {iter_size} display: 0 snapshot_prefix: "{prefix}" random_seed: 5
solver_mode: CPU
"""


def _write(tmp: Path, name: str, spec: ensemble.EnsembleSpec, batch: int, iters: int,
           iter_size: int = 1) -> Path:
    base = prototxt.parse_text(NET.format(db=tmp / "db", batch=batch), caffe_pb2.NetParameter())
    net = ensemble.make_ensemble_net(base, spec)
    (tmp / f"{name}.prototxt").write_text(str(net))
    path = tmp / f"{name}_solver.prototxt"
    path.write_text(SOLVER.format(net=tmp / f"{name}.prototxt", iters=iters,
                                  iter_size=iter_size, prefix=tmp / name))
    return path


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    datasets.write_datum_lmdb(tmp_path / "db", rng.integers(0, 256, (16, 1, 2, 4),
                                                            dtype=np.uint8),
                              rng.integers(0, 3, 16))
    return tmp_path


def test_mcl_finetunes_from_an_independent_ensemble(db: Path) -> None:
    indep = _write(db, "indep", ensemble.EnsembleSpec(members=3), batch=8, iters=3)
    assert cli.main(["train", "--solver", str(indep)]) == 0
    weights = db / "indep_iter_3.caffemodel"
    trained = io.read_proto_binary(str(weights), caffe_pb2.NetParameter())
    mcl = _write(db, "mcl", ensemble.EnsembleSpec(members=3, loss="mcl", k=1), batch=8, iters=0)
    solver = solvers.get_solver(str(mcl))
    solver.net.copy_trained_layers_from(str(weights))
    names = {lp.name for lp in trained.layer if lp.blobs}
    assert names == {f"ip{j}_m{m}" for j in (1, 2) for m in range(3)}
    for lp in trained.layer:
        for i, blob in enumerate(lp.blobs):
            np.testing.assert_array_equal(solver.net.params[lp.name][i].data,
                                          io.blobproto_to_array(blob))
    solver.close()
    assert cli.main(["train", "--solver", str(mcl), "--weights", str(weights)]) == 0


def test_mcl_iter_size_equals_one_larger_batch(db: Path) -> None:
    spec = ensemble.EnsembleSpec(members=3, loss="mcl", k=1)
    results = []
    for name, batch, iter_size in (("big", 8, 1), ("acc", 4, 2)):
        s = solvers.get_solver(str(_write(db, name, spec, batch, iters=2, iter_size=iter_size)))
        start = s.net.params["ip2_m0"][0].data.copy()
        s.step(2)
        assert not np.allclose(start, s.net.params["ip2_m0"][0].data)  # the steps moved it
        results.append({k: [b.data.copy() for b in v] for k, v in s.net.params.items()})
        s.close()
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        for a, b in zip(results[0][k], results[1][k]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_reproduce_resumes_an_unfinished_run_from_its_latest_snapshot(tmp_path: Path) -> None:
    rp = _tool("reproduce")
    for it in (250, 1000, 500):
        (tmp_path / f"snap_iter_{it}.solverstate").write_text("")
    job = rp.Job("x", tmp_path, ["python", "-m", "pycaffe_mpi.cli", "train"],
                 tmp_path / "train.log", [], tmp_path / "done")
    rp._resume_from_checkpoint(job)
    assert job.args[-2:] == ["--snapshot", str(tmp_path / "snap_iter_1000.solverstate")]
    chained = rp.Job("y", tmp_path, ["train", "--snapshot", "a.solverstate"],
                     tmp_path / "train.log", [], tmp_path / "done")
    rp._resume_from_checkpoint(chained)
    assert chained.args == ["train", "--snapshot", "a.solverstate"]
