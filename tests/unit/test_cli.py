"""The `pycaffe-mpi` command line: train/test/time/device_query, flags, errors, exact resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import cli, datasets

NET = """
name: "tinycls"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ crop_size: 6 mirror: true scale: 0.01 mean_value: 100 }}
  data_param {{ source: "{db}" batch_size: 5 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: 6 scale: 0.01 mean_value: 100 }}
  data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 8 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "drop" type: "Dropout" bottom: "ip1" top: "ip1"
  dropout_param {{ dropout_ratio: 0.3 }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

SOLVER = """
net: "{net}"
test_iter: 2
test_interval: 4
base_lr: 0.05
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 5
display: 1
max_iter: {max_iter}
snapshot: 6
snapshot_prefix: "{prefix}"
random_seed: 17
solver_mode: CPU
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 2, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, size=23)
    datasets.write_datum_lmdb(tmp_path / "db", images, labels)
    (tmp_path / "net.prototxt").write_text(NET.format(db=tmp_path / "db"))
    for n in (6, 11):
        (tmp_path / f"solver{n}.prototxt").write_text(SOLVER.format(
            net=tmp_path / "net.prototxt", max_iter=n, prefix=tmp_path / "snap" / "tiny"))
    (tmp_path / "snap").mkdir()
    return tmp_path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pycaffe_mpi.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def losses(log: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"Iteration (\d+) \([^)]*\), loss = (\S+)", log)}


def test_train_resume_continues_exactly(workdir: Path):
    full = run_cli("train", "--solver", str(workdir / "solver11.prototxt"))
    assert full.returncode == 0, full.stderr
    assert "Optimization Done." in full.stderr
    assert re.search(r"Test net output #0: accuracy = ", full.stderr)
    assert re.search(r"Iteration 11, loss = ", full.stderr)
    want = losses(full.stderr)
    assert sorted(want) == list(range(11))
    for f in ("tiny_iter_6.caffemodel", "tiny_iter_6.solverstate", "tiny_iter_11.caffemodel"):
        assert (workdir / "snap" / f).is_file()
    (workdir / "snap" / "tiny_iter_11.caffemodel").unlink()
    # resume from iteration 6 with gflags' single-dash, --flag=value spelling
    resumed = run_cli("train", f"-solver={workdir / 'solver11.prototxt'}",
                      "-snapshot", str(workdir / "snap" / "tiny_iter_6.solverstate"))
    assert resumed.returncode == 0, resumed.stderr
    got = losses(resumed.stderr)
    assert sorted(got) == list(range(6, 11))
    for it in range(6, 11):
        assert got[it] == want[it], f"iteration {it}: {got[it]} != {want[it]}"


def test_finetune_then_test_and_time(workdir: Path):
    out = run_cli("train", "--solver", str(workdir / "solver6.prototxt"))
    assert out.returncode == 0, out.stderr
    weights = workdir / "snap" / "tiny_iter_6.caffemodel"
    ft = run_cli("train", "--solver", str(workdir / "solver6.prototxt"), "--weights",
                 str(weights))
    assert ft.returncode == 0 and "Finetuning from" in ft.stderr
    test = run_cli("test", "--model", str(workdir / "net.prototxt"), "--weights", str(weights),
                   "--iterations", "3")
    assert test.returncode == 0, test.stderr
    assert re.search(r"Batch 2, accuracy = ", test.stderr)
    assert re.search(r"\] loss = \S+ \(\* 1 = \S+ loss\)", test.stderr)
    timed = run_cli("time", "--model", str(workdir / "net.prototxt"), "--iterations", "2")
    assert timed.returncode == 0, timed.stderr
    for line in ("Average Forward pass: ", "Average Backward pass: ",
                 "Average Forward-Backward: ", "ip1\tforward: "):
        assert line in timed.stderr


def test_snapshot_and_weights_together_is_an_error(workdir: Path):
    rc = cli.main(["train", "--solver", str(workdir / "solver6.prototxt"), "--snapshot", "a",
                   "--weights", "b"])
    assert rc == 1


def test_user_mistake_gives_one_line_not_a_traceback(workdir: Path):
    bad = workdir / "bad.prototxt"
    bad.write_text((workdir / "net.prototxt").read_text().replace("num_output: 8",
                                                                  "num_ouptut: 8"))
    solver = workdir / "bad_solver.prototxt"
    solver.write_text((workdir / "solver6.prototxt").read_text().replace(
        str(workdir / "net.prototxt"), str(bad)))
    out = run_cli("train", "--solver", str(solver))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert f"{bad}:" in out.stderr and 'did you mean "num_output"' in out.stderr
    missing = run_cli("test", "--model", str(workdir / "nope.prototxt"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_sigint_stop_snapshots_and_exits(workdir: Path):
    """--sigint_effect stop: Ctrl-C ends training early, after the final snapshot (Caffe)."""
    solver = workdir / "long.prototxt"
    solver.write_text(SOLVER.format(net=workdir / "net.prototxt", max_iter=100000,
                                    prefix=workdir / "snap" / "long"))
    proc = subprocess.Popen([sys.executable, "-m", "pycaffe_mpi.cli", "train", "--solver",
                             str(solver), "--sigint_effect", "stop"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "Iteration 20 " in line:
                break
        proc.send_signal(2)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Optimization stopped early." in err
    snaps = [f for f in os.listdir(workdir / "snap") if f.startswith("long_iter_")]
    assert any(f.endswith(".solverstate") for f in snaps)


def test_device_query_without_gpu():
    out = run_cli("device_query")
    assert out.returncode == 0
    assert run_cli("device_query", "--gpu", "0").returncode in (0, 1)
