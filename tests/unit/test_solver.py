"""The Solver end to end on Caffe's least-squares problem (test_gradient_based_solver.cpp).

Net: a Python data layer cycling through a fixed data set X (N×3×10×10) and targets y (N×1)
→ InnerProduct (1 output, gaussian std 1 weights and bias) → EuclideanLoss, lr_policy fixed.
Objective E = ‖Xw + b − y‖²/(2N) + (λ/2)(‖w‖² + b²). For every rule the (K+1)-th state is
computed with NumPy from the K-th (K = 0…4) and compared with what the solver did. Then:
iter_size accumulation, snapshot/restore, the log lines, the .solverstate format and atomic
snapshot writing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import errors, solvers
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.proto import caffe_pb2

N, C, H, W = 4, 3, 10, 10
D = C * H * W
NOISE_SEED = 1701
MODULE = "_pycaffe_mpi_solver_test_layers"


# -- the data layer (a pycaffe Python layer living in a synthetic module) --------------------
def _dataset(num: int = N, seed: int = NOISE_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num, C, H, W)), rng.normal(size=(num, 1))


class LeastSquaresData(Layer):
    """Tops data (B, C, H, W), targets (B, 1) and optionally aux (2,) = [1, 2]; each forward
    takes the next B examples of the fixed set, cycling (so iter_size sees consecutive halves).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = json.loads(self.param_str)
        self.batch, self.num = int(p["batch"]), int(p.get("num", N))
        self.x, self.y = _dataset(self.num)
        self.cursor = 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.batch, C, H, W)
        top[1].reshape(self.batch, 1)
        if len(top) > 2:
            top[2].reshape(2)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        idx = (self.cursor + np.arange(self.batch)) % self.num
        top[0].data[...] = self.x[idx]
        top[1].data[...] = self.y[idx]
        if len(top) > 2:
            top[2].data[...] = [1.0, 2.0]
        self.cursor = int((self.cursor + self.batch) % self.num)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        pass

    def get_state(self) -> bytes:
        return json.dumps({"cursor": self.cursor}).encode()

    def set_state(self, state: bytes) -> None:
        self.cursor = json.loads(state)["cursor"]


@pytest.fixture(autouse=True)
def _test_layer_module() -> Any:
    mod = types.ModuleType(MODULE)
    mod.LeastSquaresData = LeastSquaresData  # type: ignore[attr-defined]
    sys.modules[MODULE] = mod
    yield
    sys.modules.pop(MODULE, None)


def _net_text(batch: int = N, aux: bool = False) -> str:
    aux_top = 'top: "aux"' if aux else ""
    return f"""
    name: "LeastSquares"
    layer {{ name: "data" type: "Python" top: "data" top: "targets" {aux_top}
             python_param {{ module: "{MODULE}" layer: "LeastSquaresData"
                             param_str: '{{"batch": {batch}}}' }} }}
    layer {{ name: "innerprod" type: "InnerProduct" bottom: "data" top: "innerprod"
             inner_product_param {{ num_output: 1
               weight_filler {{ type: "gaussian" std: 1.0 }}
               bias_filler {{ type: "gaussian" std: 1.0 }} }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "innerprod" bottom: "targets"
             top: "loss" }}
    """


def _param(type_: str = "SGD", batch: int = N, aux: bool = False, **kw: Any) -> Any:
    p = caffe_pb2.SolverParameter(type=type_, base_lr=kw.pop("base_lr", 1.0), lr_policy="fixed",
                                  random_seed=kw.pop("random_seed", 1701), display=0,
                                  max_iter=kw.pop("max_iter", 5), snapshot_after_train=False)
    text_format.Parse(_net_text(batch, aux), p.net_param)
    for k, v in kw.items():
        if isinstance(v, list):
            getattr(p, k).extend(v)
        else:
            setattr(p, k, v)
    return p


def _solver(type_: str = "SGD", dtype: Any = np.float64, **kw: Any) -> solvers.Solver:
    return solvers.Solver(_param(type_, **kw), dtype=dtype)


# -- the analytic update ---------------------------------------------------------------------
def _expected_update(type_: str, p: Any, params: list[np.ndarray], hist: list[np.ndarray],
                     it: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One step of ``type_`` from (params, history) at iteration ``it``, in NumPy."""
    x, y = _dataset()
    xf = x.reshape(N, D)
    w, b = params
    r = xf @ w[0] + b[0] - y[:, 0]  # residuals, (N,)
    grads = [(r @ xf / N)[None, :], np.array([r.sum() / N])]
    n = len(params)
    hist = [h.copy() for h in hist]
    rate, m, delta, lam = p.base_lr, p.momentum, p.delta, p.weight_decay
    out = []
    for i, (wi, gi) in enumerate(zip(params, grads)):
        g = gi + lam * wi
        if type_ == "SGD":
            hist[i] = m * hist[i] + rate * g
            step = hist[i]
        elif type_ == "Nesterov":
            old = hist[i]
            hist[i] = m * old + rate * g
            step = (1 + m) * hist[i] - m * old
        elif type_ == "AdaGrad":
            hist[i] = hist[i] + g ** 2
            step = rate * g / (np.sqrt(hist[i]) + delta)
        elif type_ == "RMSProp":
            rd = p.rms_decay
            hist[i] = rd * hist[i] + (1 - rd) * g ** 2
            step = rate * g / (np.sqrt(hist[i]) + delta)
        elif type_ == "AdaDelta":
            hist[i] = m * hist[i] + (1 - m) * g ** 2
            u = g * np.sqrt((hist[n + i] + delta) / (hist[i] + delta))
            hist[n + i] = m * hist[n + i] + (1 - m) * u ** 2
            step = rate * u
        else:  # Adam
            b1, b2, t = m, p.momentum2, it + 1
            hist[i] = b1 * hist[i] + (1 - b1) * g
            hist[n + i] = b2 * hist[n + i] + (1 - b2) * g ** 2
            step = rate * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * hist[i] / (
                np.sqrt(hist[n + i]) + delta)
        out.append(wi - step)
    return out, hist


def _assert_near(actual: np.ndarray, expected: np.ndarray) -> None:
    # Caffe's margin, max(ε, 1e-2·min(|expected|, |actual|)), is for float; in float64 we
    # can ask for far more.
    np.testing.assert_allclose(actual, expected, rtol=1e-8,
                               atol=1e-10 * max(1.0, float(np.abs(expected).max())))


# Caffe's parameter sets: lr 1.0 / 0.01, weight_decay 0.5, momentum 0.5 or 0.9.
CASES = [
    ("SGD", dict()),
    ("SGD", dict(base_lr=0.01)),
    ("SGD", dict(base_lr=0.01, weight_decay=0.5)),
    ("SGD", dict(base_lr=0.01, momentum=0.5)),
    ("SGD", dict(base_lr=0.01, weight_decay=0.5, momentum=0.9)),
    ("Nesterov", dict()),
    ("Nesterov", dict(base_lr=0.01, weight_decay=0.5)),
    ("Nesterov", dict(base_lr=0.01, momentum=0.5)),
    ("Nesterov", dict(base_lr=0.01, weight_decay=0.5, momentum=0.9)),
    ("AdaGrad", dict()),
    ("AdaGrad", dict(base_lr=0.01, weight_decay=0.5)),
    ("RMSProp", dict(rms_decay=0.95)),
    ("RMSProp", dict(base_lr=0.01, weight_decay=0.5, rms_decay=0.95)),
    ("AdaDelta", dict(momentum=0.95, delta=1e-6)),
    ("AdaDelta", dict(base_lr=0.5, weight_decay=0.5, momentum=0.95, delta=1e-6)),
    ("Adam", dict(base_lr=0.01, momentum=0.9, momentum2=0.999)),
    ("Adam", dict(base_lr=0.01, weight_decay=0.5, momentum=0.9, momentum2=0.999)),
]


@pytest.mark.parametrize(("type_", "kw"), CASES,
                         ids=[f"{t}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'default'}"
                              for t, kw in CASES])
def test_least_squares_update_matches_analytic(type_: str, kw: dict) -> None:
    solver = _solver(type_, **kw)
    params = solver.net.learnable_params
    assert [tuple(p.shape) for p in params] == [(1, D), (1,)]
    for k in range(5):
        before = [p.data.copy() for p in params]
        hist_before = [h.copy() for h in solver.rule.history]
        solver.step(1)
        assert solver.iter == k + 1
        want_params, want_hist = _expected_update(type_, solver.param, before, hist_before, k)
        for p, want in zip(params, want_params):
            _assert_near(p.data, want)
        for h, want in zip(solver.rule.history, want_hist):
            _assert_near(h, want)


def test_iter_size_equals_double_batch() -> None:
    kw = dict(base_lr=0.01, weight_decay=0.5, momentum=0.9)
    full = _solver("SGD", batch=N, **kw)
    accum = _solver("SGD", batch=N // 2, iter_size=2, **kw)
    for a, b in zip(full.net.learnable_params, accum.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)  # same seed, same initial weights
    full.step(5)
    accum.step(5)
    for a, b in zip(full.net.learnable_params, accum.net.learnable_params):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-10, atol=1e-12)
    for a, b in zip(full.rule.history, accum.rule.history):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def test_float32_follows_float64() -> None:
    kw = dict(base_lr=0.01, weight_decay=0.5, momentum=0.9)
    s64, s32 = _solver("SGD", np.float64, **kw), _solver("SGD", np.float32, **kw)
    for _ in range(5):
        s64.step(1)
        s32.step(1)
    for a, b in zip(s64.net.learnable_params, s32.net.learnable_params):
        assert b.data.dtype == np.float32
        np.testing.assert_allclose(b.data, a.data, rtol=1e-3, atol=1e-4)
    assert all(h.dtype == np.float32 for h in s32.rule.history)


# -- snapshot and restore ------------------------------------------------------------------
def _snapshot_solver(tmp_path: Path, type_: str = "Adam", **kw: Any) -> solvers.Solver:
    kw = {"batch": 2, "base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.5,
          "snapshot_prefix": str(tmp_path / "ls"), **kw}
    p = _param(type_, **kw)
    return solvers.Solver(p)


@pytest.mark.parametrize("type_", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_snapshot_then_restore_continues_exactly(tmp_path: Path, type_: str) -> None:
    extra = dict(momentum=0.0) if type_ in ("AdaGrad", "RMSProp") else {}
    a = _snapshot_solver(tmp_path, type_, **extra)
    a.step(3)  # batch 2 of 4: the data cursor is mid-set, so the layer state matters
    state_path = a.snapshot()
    assert state_path == f"{tmp_path / 'ls'}_iter_3.solverstate"
    a.step(4)

    b = _snapshot_solver(tmp_path, type_, **extra, random_seed=99)  # other initial weights
    b.restore(state_path)
    assert b.iter == 3
    b.step(4)
    assert b.iter == a.iter == 7
    for pa, pb in zip(a.net.learnable_params, b.net.learnable_params):
        np.testing.assert_array_equal(pb.data, pa.data)
    for ha, hb in zip(a.rule.history, b.rule.history):
        np.testing.assert_array_equal(hb, ha)


def test_solverstate_round_trips(tmp_path: Path) -> None:
    s = _snapshot_solver(tmp_path, "Adam", lr_policy="multistep", stepvalue=[1, 2])
    s.step(3)
    path = s.snapshot()
    model = f"{tmp_path / 'ls'}_iter_3.caffemodel"
    assert os.path.exists(model)
    raw = Path(path).read_bytes()
    state = caffe_pb2.SolverState.FromString(raw)
    assert state.iter == 3
    assert state.learned_net == model
    assert state.current_step == 2
    assert len(state.history) == 4  # Adam: m for (w, b), then v for (w, b)
    assert [tuple(h.shape.dim) for h in state.history] == [(1, D), (1,), (1, D), (1,)]
    np.testing.assert_array_equal(
        np.asarray(state.history[2].data, np.float32).reshape(1, D), s.rule.history[2])
    names = [e.layer for e in state.layer_state]
    assert {"data", "innerprod", "loss"} <= set(names)
    assert json.loads(dict((e.layer, e.state) for e in state.layer_state)["data"]) == \
        {"cursor": 2}
    assert state.SerializeToString() == raw
    net = caffe_pb2.NetParameter.FromString(Path(model).read_bytes())
    assert [layer.name for layer in net.layer] == ["data", "innerprod", "loss"]
    assert [tuple(b.shape.dim) for b in net.layer[1].blobs] == [(1, D), (1,)]
    # a fresh solver picks up iter and current_step
    t = _snapshot_solver(tmp_path, "Adam", lr_policy="multistep", stepvalue=[1, 2])
    t.restore(path)
    assert (t.iter, t.current_step) == (3, 2)


def test_restore_finds_moved_snapshot(tmp_path: Path) -> None:
    s = _snapshot_solver(tmp_path, "SGD")
    s.step(2)
    s.snapshot()
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tmp_path.glob("ls_iter_2.*"):
        f.rename(moved / f.name)
    t = _snapshot_solver(tmp_path, "SGD", random_seed=5)
    t.restore(str(moved / "ls_iter_2.solverstate"))
    for pa, pb in zip(s.net.learnable_params, t.net.learnable_params):
        np.testing.assert_array_equal(pb.data, pa.data)


def test_restore_checks_history(tmp_path: Path) -> None:
    adam = _snapshot_solver(tmp_path, "Adam")
    adam.step(1)
    path = adam.snapshot()
    sgd = _snapshot_solver(tmp_path, "SGD")
    with pytest.raises(errors.SnapshotError, match="Incorrect length of history blobs"):
        sgd.restore(path)
    bad = caffe_pb2.SolverState(iter=1)
    for shape in [(1, D + 1), (1,)]:
        bad.history.add().CopyFrom(caffe_pb2.BlobProto(
            shape=caffe_pb2.BlobShape(dim=shape), data=[0.0] * int(np.prod(shape))))
    bad_path = tmp_path / "bad.solverstate"
    bad_path.write_bytes(bad.SerializeToString())
    with pytest.raises(errors.SnapshotError, match=r"history blob 0 has shape \(1, 301\)"):
        sgd.restore(str(bad_path))
    with pytest.raises(errors.SnapshotError, match="HDF5"):
        sgd.restore(str(tmp_path / "x.solverstate.h5"))


def test_snapshot_names_with_ranks_and_directory_prefix(tmp_path: Path) -> None:
    p = _param("SGD", snapshot_prefix=str(tmp_path / "m"))
    s = solvers.Solver(p, rank=1, size=3)
    s.step(1)
    s.snapshot()
    assert sorted(os.listdir(tmp_path)) == ["m_iter_1_rank_1.caffemodel",
                                            "m_iter_1_rank_1.solverstate"]
    # an in-memory prefix that is a directory: Caffe simply appends "_iter_N"
    sub = tmp_path / "snaps"
    sub.mkdir()
    s2 = solvers.Solver(_param("SGD", snapshot_prefix=f"{sub}/"))
    s2.step(1)
    s2.snapshot()
    assert sorted(os.listdir(sub)) == ["_iter_1.caffemodel", "_iter_1.solverstate"]


def test_solver_file_prefix_upgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("net.prototxt").write_text(_net_text())
    (tmp_path / "snaps").mkdir()
    body = 'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 solver_type: ADAM\n'
    Path("solver.prototxt").write_text(body)
    s = solvers.Solver("solver.prototxt")
    assert s.param.snapshot_prefix == "solver"  # Caffe HEAD: the solver file without extension
    assert s.type == "Adam" and s.param.type == "Adam"  # solver_type upgraded
    Path("solver2.prototxt").write_text(body + 'snapshot_prefix: "snaps"\n')
    s2 = solvers.get_solver("solver2.prototxt")
    assert isinstance(s2, solvers.AdamSolver)
    assert s2.param.snapshot_prefix == os.path.join("snaps", "solver2")


def test_snapshot_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _snapshot_solver(tmp_path, "SGD")
    s.step(2)
    s.snapshot()
    files = sorted(os.listdir(tmp_path))
    assert files == ["ls_iter_2.caffemodel", "ls_iter_2.solverstate"]  # no temp files left
    before = {f: (tmp_path / f).read_bytes() for f in files}
    s.step(1)
    s.iter = 2  # snapshot again over the same names, now with other contents

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        s.snapshot()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == files
    assert {f: (tmp_path / f).read_bytes() for f in files} == before


def test_unwritable_prefix(tmp_path: Path) -> None:
    with pytest.raises(errors.SolverError, match="Cannot write to snapshot prefix"):
        solvers.Solver(_param("SGD", snapshot=1, snapshot_prefix=str(tmp_path / "no" / "x")))
    with pytest.raises(errors.SolverError, match="snapshot is specified but snapshot_prefix"):
        solvers.Solver(_param("SGD", snapshot=1))


# -- the train loop: logging, testing, actions ---------------------------------------------
PARSE_LOG = {  # the regexes of Caffe's tools/extra/parse_log.py
    "iteration": re.compile(r"Iteration (\d+)"),
    "train": re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)"),
    "test": re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)"),
    "lr": re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)"),
}


def test_solve_logs_caffe_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _param("SGD", aux=True, base_lr=0.01, max_iter=4, display=2, test_iter=[2],
               test_interval=2, test_compute_loss=True, snapshot_after_train=True,
               snapshot_prefix=str(tmp_path / "run"))
    s = solvers.Solver(p)
    with caplog.at_level(logging.INFO, logger="pycaffe_mpi"):
        s.solve()
    lines = [r.getMessage() for r in caplog.records]
    text = "\n".join(lines)
    for want in ["Solving LeastSquares", "Learning Rate Policy: fixed",
                 "Iteration 0, Testing net (#0)", "Iteration 2, Testing net (#0)",
                 "Iteration 4, Testing net (#0)", "Iteration 0, lr = 0.01",
                 # a 2-element output: one name per element, so that parse_log keeps both
                 "Iteration 2, lr = 0.01", "    Train net output #0: aux_0 = 1",
                 "    Train net output #1: aux_1 = 2", "    Test net output #0: aux_0 = 1",
                 "    Test net output #1: aux_1 = 2",
                 f"Snapshotting to binary proto file {tmp_path / 'run'}_iter_4.caffemodel",
                 "Snapshotting solver state to binary proto file "
                 f"{tmp_path / 'run'}_iter_4.solverstate",
                 "Optimization Done."]:
        assert want in lines, f"missing {want!r} in:\n{text}"
    assert re.search(r"^Iteration 2 \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+$",
                     text, re.M)
    assert re.search(r"^    Train net output #2: loss = ([\d.e+-]+) \(\* 1 = \1 loss\)$",
                     text, re.M)
    assert re.search(r"^    Test net output #2: loss = ([\d.e+-]+) \(\* 1 = \1 loss\)$",
                     text, re.M)
    assert re.search(r"^Test loss: [\d.e+-]+$", text, re.M)
    assert re.search(r"^Iteration 4, loss = [\d.e+-]+$", text, re.M)
    assert re.search(r"^Progress: 3/4 iterations, [\d.e+]+ iter/s, \d+s left$", text, re.M)
    # parse_log.py finds what it needs
    train = [m.groups() for m in map(PARSE_LOG["train"].search, lines) if m]
    test = [m.groups() for m in map(PARSE_LOG["test"].search, lines) if m]
    lrs = [float(m.group(1)) for m in map(PARSE_LOG["lr"].search, lines) if m]
    assert len(train) == 6 and len(test) == 9 and lrs == [0.01, 0.01]
    # order within a display block: loss line, train outputs, lr line
    i = lines.index("Iteration 2, lr = 0.01")
    assert lines[i - 1].startswith("    Train net output #2: loss")
    assert lines[i - 4].startswith("Iteration 2 (")
    assert os.path.exists(f"{tmp_path / 'run'}_iter_4.solverstate")
    assert len(s.mean_scores[0]) == 3


def test_test_nets_from_solver_fields(tmp_path: Path) -> None:
    p = _param("SGD", test_iter=[1, 3], test_interval=10)
    s = solvers.Solver(p)
    assert len(s.test_nets) == 2
    assert all(net.phase == 1 for net in s.test_nets)
    s.test_all()
    assert s.test_nets[0].learnable_params[0].data is not None
    np.testing.assert_array_equal(s.test_nets[1].params["innerprod"][0].data,
                                  s.net.params["innerprod"][0].data)
    with pytest.raises(errors.SolverError, match="test_interval"):
        solvers.Solver(_param("SGD", test_iter=[1]))
    p = _param("SGD")
    p.train_net_param.CopyFrom(p.net_param)
    with pytest.raises(errors.SolverError, match="must not contain more than one"):
        solvers.Solver(p)
    p = _param("SGD")
    p.ClearField("net_param")
    with pytest.raises(errors.SolverError, match="must specify a train net"):
        solvers.Solver(p)
    p = _param("SGD")
    p.train_net_param.CopyFrom(p.net_param)
    p.ClearField("net_param")
    p.test_net_param.add().CopyFrom(p.train_net_param)
    with pytest.raises(errors.SolverError, match="test_iter must be specified"):
        solvers.Solver(p)


def test_train_state_stages() -> None:
    p = _param("SGD")
    extra = p.net_param.layer.add(name="extra", type="InnerProduct", bottom=["data"],
                                  top=["extra"])
    extra.inner_product_param.num_output = 2
    extra.include.add(stage=["more"])
    assert "extra" not in solvers.Solver(p).net.layer_names
    p.train_state.stage.append("more")
    assert "extra" in solvers.Solver(p).net.layer_names


def test_smoothed_loss_and_callbacks() -> None:
    s = _solver("SGD", base_lr=0.01, average_loss=3)
    losses: list[float] = []
    fb = s.net.forward_backward

    def recording() -> float:
        losses.append(fb())
        return losses[-1]

    s.net.forward_backward = recording
    calls: list[str] = []

    def ready() -> None:
        calls.append(f"ready{float(np.abs(s.net.params['innerprod'][0].diff).sum()) > 0}")

    s.add_callback(lambda: calls.append("start"), ready)
    s.step(5)
    assert calls == ["start", "readyTrue"] * 5
    assert s.smoothed_loss == pytest.approx(np.mean(losses[-3:]), rel=1e-12)
    assert s.lr == pytest.approx(0.01)


def test_action_function_stop_and_snapshot(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    s = _snapshot_solver(tmp_path, "SGD", max_iter=10, snapshot_after_train=True)
    actions = iter(["none", "snapshot", "none", "stop"])
    s.set_action_function(lambda: next(actions, "none"))
    with caplog.at_level(logging.INFO, logger="pycaffe_mpi"):
        s.solve()
    assert s.iter == 4
    assert "Optimization stopped early." in caplog.text
    assert "Optimization Done." not in caplog.text
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "ls_iter_2.caffemodel", "ls_iter_2.solverstate",  # asked for
        "ls_iter_4.caffemodel", "ls_iter_4.solverstate"]  # snapshot_after_train
    s.set_action_function(lambda: "pause")
    with pytest.raises(errors.SolverError, match="action function"):
        s.step(1)


def test_seeds_per_rank() -> None:
    def weights(**kw: Any) -> np.ndarray:
        return solvers.Solver(_param("SGD"), **kw).net.params["innerprod"][0].data.copy()

    w0 = weights()
    np.testing.assert_array_equal(weights(), w0)
    assert not np.array_equal(weights(rank=1, size=2), w0)
    np.testing.assert_array_equal(weights(rank=1, size=2, same_seed_all_ranks=True), w0)
    np.testing.assert_array_equal(weights(rank=3, size=4, seed_offset=0), w0)


def test_pycaffe_classes_force_the_rule() -> None:
    p = _param("Adam")
    assert type(solvers.SGDSolver(p).rule).type == "SGD"
    assert solvers.AdamSolver(_param("SGD")).type == "Adam"
    assert isinstance(solvers.get_solver(_param("Nesterov")), solvers.NesterovSolver)
    with pytest.raises(errors.SolverError, match="Unknown solver type"):
        solvers.get_solver(_param("Adamm"))
    with pytest.raises(errors.SolverError, match="Momentum cannot be used with AdaGrad"):
        solvers.AdaGradSolver(_param("SGD", momentum=0.9))


def test_multistep_state_survives_restore(tmp_path: Path) -> None:
    kw = dict(lr_policy="multistep", stepvalue=[2, 4], gamma=0.5)
    a = _snapshot_solver(tmp_path, "SGD", **kw)
    a.step(3)
    path = a.snapshot()
    assert a.lr == pytest.approx(0.005)
    b = _snapshot_solver(tmp_path, "SGD", **kw)
    b.restore(path)
    a.step(2)
    b.step(2)
    assert a.lr == b.lr == pytest.approx(0.0025)


def test_results_file_gives_the_rate_of_its_iteration(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # a step boundary at iteration 2: the record written before that update says 0.025, as the
    # log's "Iteration 2, lr = 0.025" line does, not the previous update's 0.05
    from pycaffe_mpi.reports import results

    s = _snapshot_solver(tmp_path, "SGD", base_lr=0.05, lr_policy="step", gamma=0.5,
                         stepsize=2, display=1, max_iter=4)
    with caplog.at_level(logging.INFO, logger="pycaffe_mpi"):
        s.solve()
    s.close()
    logged = {int(m.group(1)): float(m.group(2)) for m in
              re.finditer(r"Iteration (\d+), lr = ([0-9.e+-]+)", caplog.text)}
    train = [r for r in results.read_results(tmp_path / "ls_results.jsonl")
             if r["kind"] == "train"]
    assert [r["iter"] for r in train] == [0, 1, 2, 3, 4]
    for r in train[:4]:
        assert r["lr"] == pytest.approx(logged[r["iter"]])
    assert [r["lr"] for r in train] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125])
