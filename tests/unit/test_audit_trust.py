"""Issue 9 tried as a user would, one process: ``pycaffe-mpi train|test|time`` on bad inputs.

Each case runs the CLI's entry point on a small net and checks its one-line error (exit status
1, no traceback): the location (file:line), the layer, the field, the values (items 3, 4, 6).
Also: a non-finite loss stops the run naming the iteration and the layer, ``--nonfinite
continue`` keeps going, and accuracy over NaN scores is 0 (item 5); weights that copy nothing
warn naming the file (item 6); run outputs stay out of git (item 11).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import cli, datasets
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.proto import caffe_pb2

REPO = Path(__file__).parents[2]

NET = """name: "audit"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = """net: "{net}"
base_lr: 0.01 lr_policy: "fixed" max_iter: 4 display: 1 snapshot: 2
snapshot_prefix: "{prefix}" solver_mode: CPU
"""
MPI_LAYERS = """layer { name: "bcast" type: "MPIBroadcast" bottom: "ip" top: "ip_b" }
layer { name: "gather" type: "MPIGather" bottom: "ip_b" top: "g0" top: "g1" top: "g2" }
"""


def run(capfd: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    capfd.readouterr()
    code = cli.main(list(argv))
    out, err = capfd.readouterr()
    return code, out + err


def errors_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error: ")]


def net_file(d: Path, name: str, edit: Callable[[str], str] = lambda t: t) -> Path:
    path = d / f"{name}.prototxt"
    path.write_text(edit(NET))
    return path


def solver_file(d: Path, net: Path, extra: str = "") -> Path:
    path = d / f"{net.stem}_solver.prototxt"
    path.write_text(SOLVER.format(net=net, prefix=d / net.stem) + extra)
    return path


@pytest.mark.parametrize(("name", "edit", "wants"), [
    ("twice", lambda t: t.replace("num_output: 3", "num_output: 3 num_output: 4"),
     (":6:", 'should not have multiple "num_output" fields')),
    ("std_negative", lambda t: t.replace("std: 0.1", "std: -1"),
     (':5: layer "ip" (type InnerProduct), field inner_product_param.weight_filler.std',
      ">= 0, got -1.0")),
    ("std_nan", lambda t: t.replace("std: 0.1", "std: nan"),
     (':5: layer "ip"', "weight_filler.std", "finite number, got nan")),
    ("duplicate", lambda t: t.replace('name: "loss"', 'name: "ip"'),
     (':7: layer "ip" (type SoftmaxWithLoss): duplicate layer name "ip"',
      "duplicate.prototxt:5")),
    ("split_top", lambda t: t + 'layer { name: "x" type: "Power" bottom: "data" '
     'top: "data_data_0_split_0" }\nlayer { name: "y" type: "Power" bottom: "data" }\n',
     (':8: layer "x" (type Power): top "data_data_0_split_0" is named like a blob',)),
    ("huge", lambda t: t.replace("dim: 4 dim: 3 dim: 6 dim: 6", "dim: 100000 dim: 100000"),
     (':2: layer "data" (type DummyData)', "exceeds INT_MAX", "(100000, 100000)",
      "2147483647")),
])
def test_bad_net_is_one_located_error(tmp_path: Path, capfd: pytest.CaptureFixture, name: str,
                                      edit: Callable[[str], str], wants: tuple[str, ...]) -> None:
    net = net_file(tmp_path, name, edit)
    for argv in (["test", "--model", str(net), "--iterations", "1"],
                 ["train", "--solver", str(solver_file(tmp_path, net))]):
        code, text = run(capfd, *argv)
        assert code == 1, text
        assert "Traceback" not in text, text
        lines = errors_of(text)
        assert len(lines) == 1 and str(net) in lines[0], text
        for want in wants:
            assert want in lines[0], (want, lines[0])


def test_non_utf8_prototxt_through_the_console_script(tmp_path: Path) -> None:
    net = tmp_path / "latin1.prototxt"
    net.write_bytes(b'name: "caf\xe9"\n' + NET.split("\n", 1)[1].encode())
    solver = tmp_path / "latin1_solver.prototxt"
    solver.write_bytes(f'net: "{net}"\nbase_lr: 0.01 # r\xe9sum\xe9\n'.encode("latin-1")
                       + b"max_iter: 2\n")
    script = Path(sys.executable).parent / "pycaffe-mpi"
    for argv, where in [(["test", "--model", str(net)], f"{net}:1:11: byte 0xe9"),
                        # the solver's own byte is in a comment (read as Caffe reads it)
                        (["train", "--solver", str(solver)], f"{net}:1:11: byte 0xe9")]:
        proc = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = errors_of(proc.stderr)
        assert len(lines) == 1 and where in lines[0] and "not UTF-8" in lines[0], proc.stderr


def test_truncated_lmdb_names_the_database(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    db = tmp_path / "db"
    datasets.write_datum_lmdb(db, np.zeros((64, 3, 6, 6), np.uint8), np.arange(64) % 3)
    data = db / "data.mdb"
    os.truncate(data, int(data.stat().st_size * 0.3))
    net = net_file(tmp_path, "lmdb", lambda t: t.replace(
        t[t.index('layer { name: "data"'):t.index('layer { name: "ip"')],
        f'layer {{ name: "data" type: "Data" top: "data" top: "label"\n'
        f'  data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} }}\n'))
    code, text = run(capfd, "train", "--solver", str(solver_file(tmp_path, net)))
    assert code == 1, text
    lines = errors_of(text)
    assert len(lines) == 1, text
    assert ':2: layer "data" (type Data), field data_param.source' in lines[0], lines[0]
    assert f"'{db}' is truncated" in lines[0] and f"'{data}'" in lines[0], lines[0]


def test_damaged_or_foreign_layer_state(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    solver = solver_file(tmp_path, net_file(tmp_path, "net"))
    code, text = run(capfd, "train", "--solver", str(solver))
    assert code == 0, text
    rows = [json.loads(ln) for ln in (tmp_path / "net_results.jsonl").open()]
    assert [r["lr"] for r in rows] == [0.01] * 5  # as written, not float32's 0.0099999997...
    state = io.read_proto_binary(str(tmp_path / "net_iter_2.solverstate"),
                                 caffe_pb2.SolverState())
    assert {e.layer for e in state.layer_state} >= {"data", "ip"}
    for entry in state.layer_state:
        if entry.layer == "data":
            entry.state = entry.state.replace(b"PCG64", b"XXX64")
    damaged = tmp_path / "damaged.solverstate"
    io.write_proto_binary(str(damaged), state)
    code, text = run(capfd, "train", "--solver", str(solver), "--snapshot", str(damaged))
    assert code == 1 and "Traceback" not in text, text
    assert f'{damaged}: the run-time state (layer_state) of layer "data" of the train net is ' \
           "damaged" in errors_of(text)[0], text
    # a layer renamed since the snapshot: resumed, with a warning naming it
    for entry in state.layer_state:
        if entry.layer == "data":
            entry.layer = "old_data"
            entry.state = b"{}"
    foreign = tmp_path / "foreign.solverstate"
    io.write_proto_binary(str(foreign), state)
    code, text = run(capfd, "train", "--solver", str(solver), "--snapshot", str(foreign))
    assert code == 0, text
    assert f'{foreign}: the train net has no layer named "old_data"' in text, text


def test_weights_that_copy_nothing_warn(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    net = net_file(tmp_path, "net")
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    mean = tmp_path / "mean.binaryproto"
    io.write_proto_binary(str(mean), io.array_to_blobproto(np.zeros((1, 3, 6, 6), np.float32)))
    for weights in (empty, mean):
        for argv in (["test", "--model", str(net), "--iterations", "1"],
                     ["train", "--solver", str(solver_file(tmp_path, net))]):
            code, text = run(capfd, *argv, "--weights", str(weights))
            assert code == 0, text
            warned = [ln for ln in text.splitlines() if "WEIGHTS NOT LOADED" in ln]
            assert warned and str(weights) in warned[0] and warned[0].startswith("W"), text


def test_mpi_net_without_mpiexec_prints_the_command(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture) -> None:
    net = net_file(tmp_path, "mpi", lambda t: t.replace(
        'layer { name: "loss"', MPI_LAYERS + 'layer { name: "loss"'))
    solver = solver_file(tmp_path, net)
    for argv, command in [(["train", "--solver", str(solver)], f"train --solver {solver}`"),
                          (["test", "--model", str(net)], f"test --model {net}`"),
                          (["time", "--model", str(net)], f"time --model {net}`")]:
        code, text = run(capfd, *argv)
        assert code == 1, text
        lines = errors_of(text)
        assert len(lines) == 1, text
        assert f'{net}:8: layer "gather" (type MPIGather)' in lines[0], lines[0]
        assert "needs 3 MPI ranks" in lines[0], lines[0]
        assert f"`mpiexec -n 3 pycaffe-mpi {command}" in lines[0], lines[0]


def test_nan_loss_stops_and_accuracy_is_not_fooled(tmp_path: Path,
                                                   capfd: pytest.CaptureFixture) -> None:
    net = net_file(tmp_path, "nan", lambda t: t.replace(
        'bottom: "data" top: "ip"', 'bottom: "root" top: "ip"').replace(
        'layer { name: "ip"', 'layer { name: "sqrt" type: "Power" bottom: "data" top: "root"\n'
        '  power_param { power: 0.5 } }\nlayer { name: "ip"')
        + 'layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" '
        'top: "accuracy" }\n')
    solver = solver_file(tmp_path, net)
    with np.errstate(invalid="ignore"):
        code, text = run(capfd, "train", "--solver", str(solver))
        assert code == 1, text
        lines = errors_of(text)
        assert len(lines) == 1, text
        assert lines[0].startswith("error: iteration 0: the loss became non-finite (loss = nan")
        assert f'first non-finite value: top "root" of {net}:5: layer "sqrt" (type Power)' \
            in lines[0], lines[0]
        assert "--nonfinite continue" in lines[0], lines[0]
        code, text = run(capfd, "train", "--solver", str(solver), "--nonfinite", "continue")
        assert code == 0 and "Optimization Done." in text, text
        assert "Train net output #1: accuracy = 0\n" in text, text
        code, text = run(capfd, "test", "--model", str(net), "--iterations", "2")
        assert code == 0 and "\naccuracy = 0\n" in text.replace("] ", "\n"), text


def test_run_outputs_stay_out_of_git() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"git unavailable: {proc.stderr}")
    assert proc.stdout == "", f"tracked files that .gitignore ignores:\n{proc.stdout}"


def test_snapshot_past_the_file_size_limit_keeps_the_previous_one(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A write that fails for want of space (here RLIMIT_FSIZE, as a full disk would): one
    error line, the previous snapshot intact, no temporary file left."""
    resource = pytest.importorskip("resource")
    net = net_file(tmp_path, "wide", lambda t: t.replace("num_output: 3 ", "num_output: 300 "))
    solver = solver_file(tmp_path, net)
    code, text = run(capfd, "train", "--solver", str(solver))
    assert code == 0, text
    first = {p.name: p.read_bytes() for p in tmp_path.glob("wide_iter_*")}
    for p in tmp_path.glob("wide_iter_4.*"):
        first.pop(p.name)
        p.unlink()
    assert sorted(first) == ["wide_iter_2.caffemodel", "wide_iter_2.solverstate"]
    assert all(len(b) > 100 * 1024 for b in first.values())  # over the limit below

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    script = Path(sys.executable).parent / "pycaffe-mpi"
    proc = subprocess.run([str(script), "train", "--solver", str(solver), "--snapshot",
                           str(tmp_path / "wide_iter_2.solverstate")], preexec_fn=limit,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = errors_of(proc.stderr)
    assert len(lines) == 1 and f"cannot write '{tmp_path}/wide_iter_4.caffemodel'" in lines[0]
    assert "nothing was written" in lines[0], lines[0]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("wide_iter"))
    assert left == sorted(first), left
    assert all((tmp_path / name).read_bytes() == data for name, data in first.items())


def test_file_tools_on_wrong_inputs(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """upgrade-net on a prototxt with a non-UTF-8 byte names the byte's place (it looks
    binary); plot and parse-log on files that hold no run say so in one line."""
    net = tmp_path / "latin1.prototxt"
    net.write_bytes(b'name: "caf\xe9"\n' + NET.split("\n", 1)[1].encode())
    code, text = run(capfd, "upgrade-net", str(net), str(tmp_path / "up.prototxt"))
    assert code == 2 and "Traceback" not in text, text
    assert f"read as text: {net}:1:11: byte 0xe9 is not UTF-8 text" in text, text
    assert not (tmp_path / "up.prototxt").exists()
    blob = tmp_path / "mean.binaryproto"
    io.write_proto_binary(str(blob), io.array_to_blobproto(np.zeros((1, 3, 2, 2), np.float32)))
    code, text = run(capfd, "plot", str(blob), "-o", str(tmp_path / "c.png"))
    assert code == 1 and errors_of(text) == [
        "error: nothing to plot: a loss or accuracy output not found in the runs; their "
        "outputs: none"], text
    code, text = run(capfd, "parse-log", str(blob), "-o", str(tmp_path / "csv"))
    assert code == 1 and errors_of(text) == [f"error: {blob}: no train or test outputs found"]


def test_draw_counts_a_world_wide_gather_and_refuses_a_rank_outside(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A net whose only rank count is its MPIGather's tops (no include rules) still draws one
    cluster per rank; --rank past the ranks the net runs on is an error, not an empty drawing."""
    net = net_file(tmp_path, "mpi", lambda t: t.replace(
        'layer { name: "loss"', MPI_LAYERS + 'layer { name: "loss"'))
    code, text = run(capfd, "draw", "--model", str(net), "--all-ranks", "-o",
                     str(tmp_path / "all.dot"))
    assert code == 0, text
    dot = (tmp_path / "all.dot").read_text()
    assert [r for r in range(5) if f"cluster_rank{r}" in dot] == [0, 1, 2], dot
    assert dot.count("dashed") == 4, dot  # broadcast to ranks 1, 2; gather from ranks 1, 2
    for rank in ("3", "-1"):
        code, text = run(capfd, "draw", "--model", str(net), "--rank", rank, "-o",
                         str(tmp_path / "r.dot"))
        assert code == 1 and errors_of(text) == [
            f"error: rank {rank} is outside the 3 ranks (0..2) this net runs on; give "
            "--world-size for a larger job"], text
    plain = net_file(tmp_path, "plain")  # no rank rules: the same net on any rank
    code, text = run(capfd, "draw", "--model", str(plain), "--rank", "3", "-o",
                     str(tmp_path / "p.dot"))
    assert code == 0, text
