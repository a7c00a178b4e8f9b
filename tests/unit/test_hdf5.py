"""HDF5Data / HDF5Output beyond the generic layer cases, and HDF5 snapshots (Caffe's layout,
weight loading, and a save/resume round trip that gives the losses of an uninterrupted run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import errors, snapshot_hdf5, solvers
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import layer_class

TRAIN = 0


def _files(tmp_path: Path, rows: tuple[int, ...] = (3, 2), label_rows: Any = None,
           seed: int = 0) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    content, names = [], []
    for i, n in enumerate(rows):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        y = (np.arange(n) + 10 * i).astype(np.float32)  # distinct labels identify rows
        if label_rows is not None:
            y = y[:label_rows]
        name = tmp_path / f"f{i}.h5"
        with h5py.File(name, "w") as f:
            f["data"], f["label"] = x, y
        content.append((x, y))
        names.append(name.name)  # relative: found next to the list file
    src = tmp_path / "list.txt"
    src.write_text("\n".join(names) + "\n")
    return src, content


def _hdf5_layer(source: Path, batch: int, shuffle: bool = False, tops: tuple = ("data", "label"),
                extra: str = "", seed: int = 5) -> tuple[Any, list[Blob]]:
    p = caffe_pb2.LayerParameter(name="h5", type="HDF5Data", top=list(tops))
    text_format.Merge(f'hdf5_data_param {{ source: "{source}" batch_size: {batch} '
                      f'shuffle: {str(shuffle).lower()} }} {extra}', p)
    layer = layer_class("HDF5Data")(p, dtype=np.float64, rng=np.random.default_rng(seed))
    top = [Blob((), np.float64) for _ in tops]
    layer.setup([], top)
    return layer, top


# -- HDF5Data ----------------------------------------------------------------------------------
def test_shuffle_visits_every_row_once_per_epoch(tmp_path: Path) -> None:
    src, _ = _files(tmp_path)
    layer, top = _hdf5_layer(src, batch=5, shuffle=True)
    orders = []
    for _ in range(4):
        layer.forward([], top)
        labels = top[1].data.copy()
        assert sorted(labels) == [0, 1, 2, 10, 11]
        orders.append(tuple(labels))
    assert len(set(orders)) > 1, "the order should change between epochs"


def test_rows_pair_data_with_labels(tmp_path: Path) -> None:
    src, content = _files(tmp_path)
    layer, top = _hdf5_layer(src, batch=3, shuffle=True)
    rows = {float(y): x for xs, ys in content for x, y in zip(xs, ys)}
    for _ in range(3):
        layer.forward([], top)
        for x, y in zip(top[0].data, top[1].data):
            np.testing.assert_allclose(x, rows[float(y)], rtol=1e-6)


def test_state_resumes_exactly(tmp_path: Path) -> None:
    src, _ = _files(tmp_path)
    a, ta = _hdf5_layer(src, batch=2, shuffle=True)
    for _ in range(3):
        a.forward([], ta)
    state = a.get_state()
    want = []
    for _ in range(4):
        a.forward([], ta)
        want.append(ta[1].data.copy())
    b, tb = _hdf5_layer(src, batch=2, shuffle=True, seed=99)
    b.set_state(state)
    for w in want:
        b.forward([], tb)
        np.testing.assert_array_equal(tb[1].data, w)


def test_errors_name_file_and_dataset(tmp_path: Path) -> None:
    src, _ = _files(tmp_path)
    with pytest.raises(errors.DataError, match=r"f0\.h5.*no dataset 'labels'"):
        _hdf5_layer(src, 2, tops=("data", "labels"))
    (tmp_path / "bad").mkdir()
    bad, _ = _files(tmp_path / "bad", label_rows=2)
    with pytest.raises(errors.DataError, match=r"f0\.h5.*'label' has 2 rows.*'data' has 3"):
        _hdf5_layer(bad, 2)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(errors.DataError, match="at least 1 HDF5 filename"):
        _hdf5_layer(empty, 2)
    with pytest.raises(errors.DataError, match="cannot read the list file"):
        _hdf5_layer(tmp_path / "nope.txt", 2)
    with pytest.raises(errors.NetError, match="does not transform"):
        _hdf5_layer(src, 2, extra="transform_param { scale: 2 }")
    missing = tmp_path / "missing.txt"
    missing.write_text("nowhere.h5\n")
    with pytest.raises(errors.DataError, match=r"nowhere\.h5"):
        _hdf5_layer(missing, 2)


# -- HDF5Output --------------------------------------------------------------------------------
def _output_layer(path: Path) -> Any:
    p = caffe_pb2.LayerParameter(name="out", type="HDF5Output", bottom=["d", "l"])
    p.hdf5_output_param.file_name = str(path)
    return layer_class("HDF5Output")(p, dtype=np.float32)


def _blob(arr: np.ndarray) -> Blob:
    b = Blob(arr.shape, np.float32)
    b.data[...] = arr
    return b


def test_output_accumulates_and_backward_passes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    layer = _output_layer(out)
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(2, 3)), np.array([1.0, 2.0])) for _ in range(3)]
    bottom = [_blob(batches[0][0]), _blob(batches[0][1])]
    layer.setup(bottom, [])
    for x, y in batches:
        bottom[0].data[...], bottom[1].data[...] = x, y
        layer.reshape(bottom, [])
        layer.forward(bottom, [])
    with h5py.File(out, "r") as f:
        assert f["data"].shape == (6, 3, 1, 1) and f["label"].shape == (6, 1, 1, 1)
        np.testing.assert_allclose(f["data"][:, :, 0, 0], np.concatenate([b[0] for b in batches]),
                                   rtol=1e-6)
    for b in bottom:
        b.diff[...] = 7.0
    layer.backward([], [True, True], bottom)
    assert all((b.diff == 7.0).all() for b in bottom)
    with pytest.raises(errors.NetError, match="same batch size"):
        layer.reshape([_blob(np.zeros((2, 3))), _blob(np.zeros(3))], [])


# -- snapshots ---------------------------------------------------------------------------------
NET = """
name: "h5net"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "%s" batch_size: 2 shuffle: true } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { name: "w" } inner_product_param { num_output: 4
        weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        param { name: "w" } inner_product_param { num_output: 4
        weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
        inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "target" type: "Reshape" bottom: "label" top: "target"
        reshape_param { shape { dim: -1 dim: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip3" bottom: "target" top: "loss" }
"""


def _net_param(src: Path) -> Any:
    return text_format.Parse(NET % src, caffe_pb2.NetParameter())


def _solver(tmp_path: Path, src: Path, seed: int = 1701, **kw: Any) -> Any:
    p = caffe_pb2.SolverParameter(type="SGD", base_lr=0.002, momentum=0.9, lr_policy="fixed",
                                  random_seed=seed, display=0, max_iter=20,
                                  snapshot_after_train=False,
                                  snapshot_format=caffe_pb2.SolverParameter.HDF5,
                                  snapshot_prefix=str(tmp_path / "snap"), **kw)
    p.net_param.CopyFrom(_net_param(src))
    return solvers.Solver(p)


def _losses(s: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        s.step(1)
        out.append(float(s.net.blobs["loss"].data))
    return out


def test_snapshot_resume_gives_the_same_losses(tmp_path: Path) -> None:
    src, _ = _files(tmp_path)
    a = _solver(tmp_path, src)
    _losses(a, 3)
    state = a.snapshot()
    assert state == f"{tmp_path / 'snap'}_iter_3.solverstate.h5"
    assert (tmp_path / "snap_iter_3.caffemodel.h5").is_file()
    want = _losses(a, 5)

    b = _solver(tmp_path, src, seed=42)  # other weights and data order until restored
    b.restore(state)
    assert b.iter == 3
    assert _losses(b, 5) == want
    for pa, pb in zip(a.net.learnable_params, b.net.learnable_params):
        np.testing.assert_array_equal(pb.data, pa.data)


def test_caffe_layout(tmp_path: Path) -> None:
    src, _ = _files(tmp_path)
    s = _solver(tmp_path, src, snapshot_diff=True)
    _losses(s, 2)
    state = s.snapshot()
    with h5py.File(tmp_path / "snap_iter_2.caffemodel.h5", "r") as f:
        assert list(f["data"]) == sorted(["data", "ip1", "ip2", "ip3", "target", "loss"])
        assert sorted(f["data/ip1"]) == ["0", "1"]
        assert sorted(f["data/ip2"]) == ["1"]  # weight "w" shared with ip1: the owner has it
        assert sorted(f["diff/ip2"]) == ["0", "1"]  # diffs regardless of sharing
        assert sorted(f["data/ip3"]) == ["0", "1"]
        assert f["data/ip1/0"].shape == (4, 4) and f["data/ip1/0"].dtype == np.float32
        np.testing.assert_array_equal(f["data/ip3/0"], s.net.params["ip3"][0].data)
    with h5py.File(state, "r") as f:
        assert int(f["iter"][()]) == 2 and int(f["current_step"][()]) == 0
        assert f["learned_net"][()].decode() == str(tmp_path / "snap_iter_2.caffemodel.h5")
        assert sorted(f["history"], key=int) == [str(i) for i in range(5)]  # 5 learnable blobs
        np.testing.assert_array_equal(f["history/0"], s.rule.history[0])


def test_weights_load_by_content_and_check_shapes(tmp_path: Path) -> None:
    src, _ = _files(tmp_path)
    s = _solver(tmp_path, src)
    _losses(s, 2)
    s.snapshot()
    weights = tmp_path / "snap_iter_2.caffemodel.h5"
    net = Net(_net_param(src), TRAIN, seed=3)
    renamed = tmp_path / "weights.bin"  # detected by content, as Caffe does
    renamed.write_bytes(weights.read_bytes())
    net.copy_trained_layers_from(str(renamed))
    for name in ("ip1", "ip2", "ip3"):
        for pa, pb in zip(s.net.params[name], net.params[name]):
            np.testing.assert_array_equal(pb.data, pa.data)
    with h5py.File(weights, "a") as f:
        del f["data/ip3/0"]
        f["data/ip3/0"] = np.zeros((1, 3), np.float32)
    with pytest.raises(errors.ShapeError, match=r'layer "ip3".*\(1, 3\).*\(1, 4\)'):
        net.copy_trained_layers_from(str(weights))
    with h5py.File(weights, "a") as f:
        del f["data/ip3/0"]
    with pytest.raises(errors.SnapshotError, match="data/ip3/0 is missing"):
        net.copy_trained_layers_from(str(weights))
    with h5py.File(weights, "a") as f:
        f["data/ip3/0"] = np.zeros((1, 4), np.float32)
        f["data/ip3/2"] = np.zeros(1, np.float32)
    with pytest.raises(errors.SnapshotError, match="incompatible number of blobs"):
        net.copy_trained_layers_from(str(weights))


def test_reads_a_caffe_written_solverstate(tmp_path: Path) -> None:
    # what SGDSolver::SnapshotSolverStateToHDF5 writes: no extension group, float32 history
    path = tmp_path / "caffe.solverstate.h5"
    with h5py.File(path, "w") as f:
        f["iter"] = np.int32(7)
        f["learned_net"] = np.bytes_(b"model.caffemodel.h5")
        f["current_step"] = np.int32(1)
        f.create_group("history")["0"] = np.ones((2, 3), np.float32)
    state = snapshot_hdf5.read_solverstate(path)
    assert (state.iter, state.current_step, state.learned_net) == (7, 1, "model.caffemodel.h5")
    assert len(state.history) == 1 and list(state.history[0].shape.dim) == [2, 3]
    assert not state.layer_state
    with pytest.raises(errors.SnapshotError, match="does not exist"):
        snapshot_hdf5.read_solverstate(tmp_path / "none.solverstate.h5")


def test_snapshot_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = _files(tmp_path)
    s = _solver(tmp_path, src)
    s.snapshot()
    path = tmp_path / "snap_iter_0.caffemodel.h5"
    before = path.read_bytes()

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(snapshot_hdf5.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        s.snapshot()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_train_resume_and_test_with_hdf5_snapshots(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    src, _ = _files(tmp_path)
    (tmp_path / "net.prototxt").write_text(NET % src)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.002\nmomentum: 0.9\n'
        'lr_policy: "fixed"\ndisplay: 1\nmax_iter: 7\nsnapshot: 4\nsnapshot_format: HDF5\n'
        f'snapshot_prefix: "{tmp_path / "s"}"\nrandom_seed: 3\nsolver_mode: CPU\n')

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "pycaffe_mpi.cli", *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stderr

    def losses(log: str) -> dict[int, str]:
        return dict((int(m[1]), m[2]) for m in re.finditer(r"Iteration (\d+) \([^)]*\), "
                                                           r"loss = (\S+)", log))

    full = losses(cli("train", "--solver", str(tmp_path / "solver.prototxt")))
    assert (tmp_path / "s_iter_7.caffemodel.h5").is_file()
    resumed = losses(cli("train", "--solver", str(tmp_path / "solver.prototxt"),
                         "--snapshot", str(tmp_path / "s_iter_4.solverstate.h5")))
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[i] == full[i] for i in resumed)
    log = cli("test", "--model", str(tmp_path / "net.prototxt"), "--weights",
              str(tmp_path / "s_iter_7.caffemodel.h5"), "--iterations", "2")
    assert re.search(r"loss = \S+", log)
