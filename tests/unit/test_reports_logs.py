"""parse-log and the results file: BVLC Caffe's logs, our own (single and MPI), JSON lines."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import subprocess
import sys

import pytest
from google.protobuf import text_format

from pycaffe_mpi import errors, solvers
from pycaffe_mpi import log as log_mod
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.reports import parse_log as pl
from pycaffe_mpi.reports import results

# A BVLC Caffe log as caffe train writes it (glog heads, solver.cpp / sgd_solver.cpp tags).
CAFFE_LOG = """\
I0210 13:39:20.000000 7 caffe.cpp:218] Using GPUs 0
I0210 13:39:21.500000 7 solver.cpp:48] Initializing solver from parameters:
test_iter: 100
base_lr: 0.001
I0210 13:39:22.000000 7 solver.cpp:337] Solving CIFAR10_quick
I0210 13:39:22.000100 7 solver.cpp:338] Learning Rate Policy: fixed
I0210 13:39:22.100000 7 solver.cpp:398] Iteration 0, Testing net (#0)
I0210 13:39:23.000000 7 solver.cpp:465]     Test net output #0: accuracy = 0.1
I0210 13:39:23.000000 7 solver.cpp:465]     Test net output #1: loss = 2.30259 (* 1 = 2.30259 loss)
I0210 13:39:23.100000 7 solver.cpp:218] Iteration 0 (0 iter/s, 1.1s/100 iters), loss = 2.30292
I0210 13:39:23.100000 7 solver.cpp:237]     Train net output #0: loss = 2.30292 (* 1 = 2.30292 loss)
I0210 13:39:23.100000 7 sgd_solver.cpp:105] Iteration 0, lr = 0.001
I0210 13:39:25.000000 7 solver.cpp:218] Iteration 100 (52.6 iter/s, 1.9s/100 iters), loss = 1.8
I0210 13:39:25.000000 7 solver.cpp:237]     Train net output #0: loss = 1.7 (* 1 = 1.7 loss)
I0210 13:39:25.000000 7 sgd_solver.cpp:105] Iteration 100, lr = 0.001
I0210 13:39:27.000000 7 solver.cpp:398] Iteration 200, Testing net (#0)
I0210 13:39:28.000000 7 solver.cpp:465]     Test net output #0: accuracy = 0.4
I0210 13:39:28.000000 7 solver.cpp:465]     Test net output #1: loss = 1.6 (* 1 = 1.6 loss)
I0210 13:39:28.100000 7 solver.cpp:218] Iteration 200 (50 iter/s, 2s/100 iters), loss = 1.5
I0210 13:39:28.100000 7 solver.cpp:237]     Train net output #0: loss = 1.45 (* 1 = 1.45 loss)
I0210 13:39:28.100000 7 sgd_solver.cpp:105] Iteration 200, lr = 1e-04
I0210 13:39:30.000000 7 solver.cpp:447] Snapshotting to binary proto file x_iter_300.caffemodel
I0210 13:39:30.000000 7 solver.cpp:310] Iteration 300, loss = 1.3
I0210 13:39:30.000000 7 solver.cpp:315] Optimization Done.
"""

# Three MPI ranks, our tags: rank 0 logs the iterations, every rank its own outputs; an output
# with several elements (member_accuracy) logged element by element under one name.
MPI_LOG = "".join(f"I{stamp} 11 solver.py:474] [rank {r}/3] {msg}\n" for stamp, r, msg in [
    ("1231 23:59:59.000000", 0, "Solving MCL"),
    ("1231 23:59:59.500000", 0, "Iteration 0, Testing net (#0)"),
    ("1231 23:59:59.900000", 0, "    Test net output #0: ensemble_accuracy = 0.1"),
    ("1231 23:59:59.900000", 0, "    Test net output #1: member_accuracy = 0.11"),
    ("1231 23:59:59.900000", 0, "    Test net output #2: member_accuracy = 0.12"),
    ("1231 23:59:59.900000", 2, "    Test net output #0: ensemble_accuracy = 0.3"),
    ("0101 00:00:01.000000", 0, "Iteration 0 (0 iter/s, 1s/10 iters), loss = 2.3"),
    ("0101 00:00:01.000000", 0, "    Train net output #0: loss = 2.3 (* 1 = 2.3 loss)"),
    ("0101 00:00:01.000000", 1, "    Train net output #0: loss = 2.2 (* 1 = 2.2 loss)"),
    ("0101 00:00:01.000000", 0, "Iteration 0, lr = 0.01"),
    ("0101 00:00:02.000000", 0, "Iteration 10 (10 iter/s, 1s/10 iters), loss = nan"),
    ("0101 00:00:02.000000", 1, "    Train net output #0: loss = 2.1 (* 1 = 2.1 loss)"),
    ("0101 00:00:02.000000", 0, "    Train net output #0: loss = nan (* 1 = nan loss)"),
    ("0101 00:00:02.000000", 0, "Iteration 10, lr = 0.01"),
])


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _read_csv(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_caffe_log_tables_and_csv_files(tmp_path):
    log = _write(tmp_path, "caffe.INFO", CAFFE_LOG)
    train, test = pl.parse_log(log)
    assert [(r["NumIters"], r["LearningRate"], r["loss"]) for r in train] == [
        (0, 0.001, 2.30292), (100, 0.001, 1.7), (200, 1e-4, 1.45)]
    # seconds from "Solving", at the first value of each pass, as Caffe's script counts
    assert [r["Seconds"] for r in train] == pytest.approx([1.1, 3.0, 6.1])
    assert [r["Seconds"] for r in test] == pytest.approx([1.0, 6.0])
    assert [(r["NumIters"], r["accuracy"], r["loss"]) for r in test] == [
        (0, 0.1, 2.30259), (200, 0.4, 1.6)]
    out = tmp_path / "out"
    written = pl.save_csv_files(log, out, train, test)
    assert written == [str(out / "caffe.INFO.train"), str(out / "caffe.INFO.test")]
    rows = _read_csv(written[0])
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [float(v) for v in rows[2]] == pytest.approx([100, 3.0, 0.001, 1.7])
    assert _read_csv(written[1])[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert pl.read_csv(written[1]) == test


def test_mpi_log_ranks_vectors_and_new_year(tmp_path):
    train, test = pl.parse_log(_write(tmp_path, "mpi.log", MPI_LOG))
    assert test == [{"NumIters": 0, "Seconds": pytest.approx(0.9), "LearningRate": 0.01,
                     "ensemble_accuracy": 0.1, "member_accuracy_0": 0.11,
                     "member_accuracy_1": 0.12, "ensemble_accuracy@rank2": 0.3}]
    assert [r["NumIters"] for r in train] == [0, 10]
    assert train[0]["loss"] == 2.3 and train[0]["loss@rank1"] == 2.2
    assert train[0]["Seconds"] == pytest.approx(2.0)  # across New Year's midnight
    assert math.isnan(train[1]["loss"]) and train[1]["loss@rank1"] == 2.1


def test_own_solver_log_round_trip(tmp_path):
    """A real run of our solver, logged through the glog formatter with a rank tag."""
    net = text_format.Parse("""
        name: "tiny"
        layer { name: "data" type: "DummyData" top: "data" top: "label"
          dummy_data_param { shape { dim: 6 dim: 4 } shape { dim: 6 }
            data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
          inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
        layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
          include { phase: TEST } }
    """, caffe_pb2.NetParameter())
    param = caffe_pb2.SolverParameter(
        net_param=net, base_lr=0.1, lr_policy="step", gamma=0.5, stepsize=4, max_iter=8,
        display=2, test_iter=[2], test_interval=4, snapshot_prefix=str(tmp_path / "tiny"),
        snapshot_after_train=False, random_seed=3)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log_mod.GlogFormatter("[rank 0/2] "))
    logger = logging.getLogger("test_reports_solver")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    solvers.Solver(param, log=logger).solve()
    text = stream.getvalue()
    assert "[rank 0/2] Iteration 2 (" in text and "solver.py:" in text
    train, test = pl.parse_log_lines(text.splitlines(True))
    assert [r["NumIters"] for r in train] == [0, 2, 4, 6]
    assert [r["LearningRate"] for r in train] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert all(r["Seconds"] >= 0 for r in train) and all("loss" in r for r in train)
    assert [r["NumIters"] for r in test] == [0, 4, 8]
    assert all(r["accuracy"] == 1.0 or 0 <= r["accuracy"] <= 1 for r in test)
    assert all(set(r) == {"NumIters", "Seconds", "LearningRate", "accuracy", "loss"}
               for r in test)


def test_results_writer_and_reader(tmp_path):
    path = tmp_path / "run" / "results.jsonl"
    with results.ResultsWriter(path, rank=1) as w:
        w.write_train(0, 0.01, 0.5, {"loss": 2.3, "member_loss": [1.0, 2.0]})
        w.write_test(0, 0.7, [("accuracy", 0.25), ("loss", float("nan"))])
        w.write_train(10, 0.005, 1.5, {"loss": float("inf")})
        w.write_test(10, 1.7, {"accuracy": 0.5}, test_net=1)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and '"NaN"' in lines[1]  # strict JSON on every line
    recs = results.read_results(path)
    assert recs[0]["outputs"] == {"loss": 2.3, "member_loss_0": 1.0, "member_loss_1": 2.0}
    assert recs[0]["rank"] == 1 and recs[0]["lr"] == 0.01 and recs[3]["test_net"] == 1
    assert math.isnan(recs[1]["outputs"]["loss"]) and recs[2]["outputs"]["loss"] == math.inf
    train, test = pl.parse_log(path)
    assert [(r["NumIters"], r["LearningRate"], r["Seconds"]) for r in train] == [
        (0, 0.01, 0.5), (10, 0.005, 1.5)]
    assert test[0]["accuracy"] == 0.25 and test[1]["accuracy@test1"] == 0.5  # another test net
    # a run killed while writing leaves half a line: ignored; a bad line before it is an error
    with open(path, "a") as f:
        f.write('{"kind": "train", "it')
    assert len(results.read_results(path)) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train", "iter": 0, "outputs": {}}\n{"kind": "x"}\n{}\n')
    with pytest.raises(errors.DataError, match=r"bad.jsonl:2"):
        results.read_results(bad)


def test_parse_log_cli(tmp_path, capsys):
    log = _write(tmp_path, "caffe.log", CAFFE_LOG)
    assert pl.main([log, "-o", str(tmp_path / "csv"), "--verbose"]) == 0
    assert os.path.exists(tmp_path / "csv" / "caffe.log.train")
    assert "caffe.log.test" in capsys.readouterr().out
    assert pl.main([str(tmp_path / "missing.log")]) == 1
    assert "cannot read the log" in capsys.readouterr().err
    empty = _write(tmp_path, "empty.log", "I0101 00:00:00.0 1 a.py:1] hello\n")
    assert pl.main([empty]) == 1


def test_tool_wrapper_and_cheap_import(tmp_path):
    log = _write(tmp_path, "caffe.log", CAFFE_LOG)
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "parse_log.py")
    done = subprocess.run([sys.executable, tool, log, str(tmp_path / "t")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(tmp_path / "t" / "caffe.log.test")
    # matplotlib and graphviz load only when a figure or drawing is made
    code = ("import sys; from pycaffe_mpi.reports import assignment, draw, parse_log, plot, "
            "results; print(sorted(m for m in ('matplotlib', 'graphviz') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
