"""Update rules (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam) on bare arrays, no Net.

Each rule is checked against hand-computed numbers and against a straightforward NumPy
reference written from the formulas of Caffe's ``*Solver::ComputeUpdateValue`` (bvlc-caffe.md
§4.4), over 3 steps with momentum, L2/L1 weight decay, lr_mult/decay_mult, clipping and
iter_size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.solvers import rules

ALL = ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]
NO_MOMENTUM = {"AdaGrad", "RMSProp"}


def _param(type_: str, **kw: object) -> caffe_pb2.SolverParameter:
    return caffe_pb2.SolverParameter(type=type_, **kw)


def _blob(values: np.ndarray, dtype: type = np.float64) -> Blob:
    b = Blob(values.shape, dtype)
    b.data[...] = values
    return b


def _run(rule: rules.UpdateRule, blobs: list[Blob], grads: list[list[np.ndarray]],
         lr_mults: list[float], decay_mults: list[float], rate: float, it0: int = 0) -> None:
    """grads[step][param] is written into the diffs before each update."""
    for k, gs in enumerate(grads):
        for b, g in zip(blobs, gs):
            b.diff[...] = g
        rule.apply(blobs, lr_mults, decay_mults, rate, it0 + k)


# -- an independent reference ---------------------------------------------------------------
def _reference(type_: str, p: caffe_pb2.SolverParameter, ws: list[np.ndarray],
               grads: list[list[np.ndarray]], lr_mults: list[float], decay_mults: list[float],
               rate: float, it0: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Plain-NumPy Caffe update, returning (weights, history in Caffe's order)."""
    ws = [w.astype(np.float64).copy() for w in ws]
    n = len(ws)
    h1 = [np.zeros_like(w) for w in ws]
    h2 = [np.zeros_like(w) for w in ws]
    m, delta = p.momentum, p.delta
    for k, gs in enumerate(grads):
        it = it0 + k
        gs = [np.asarray(g, np.float64) / p.iter_size for g in gs]
        if p.clip_gradients >= 0:
            norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
            if norm > p.clip_gradients:
                gs = [g * (p.clip_gradients / norm) for g in gs]
        for i in range(n):
            w, lr = ws[i], rate * lr_mults[i]
            lam = p.weight_decay * decay_mults[i]
            g = gs[i] + (lam * w if p.regularization_type == "L2" else lam * np.sign(w))
            if type_ == "SGD":
                h1[i] = m * h1[i] + lr * g
                step = h1[i]
            elif type_ == "Nesterov":
                old = h1[i]
                h1[i] = m * old + lr * g
                step = (1 + m) * h1[i] - m * old
            elif type_ == "AdaGrad":
                h1[i] = h1[i] + g * g
                step = lr * g / (np.sqrt(h1[i]) + delta)
            elif type_ == "RMSProp":
                r = p.rms_decay
                h1[i] = r * h1[i] + (1 - r) * g * g
                step = lr * g / (np.sqrt(h1[i]) + delta)
            elif type_ == "AdaDelta":
                h1[i] = m * h1[i] + (1 - m) * g * g
                u = g * np.sqrt((h2[i] + delta) / (h1[i] + delta))
                h2[i] = m * h2[i] + (1 - m) * u * u
                step = lr * u
            elif type_ == "Adam":
                b1, b2, t = m, p.momentum2, it + 1
                h1[i] = b1 * h1[i] + (1 - b1) * g
                h2[i] = b2 * h2[i] + (1 - b2) * g * g
                step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * h1[i] / (
                    np.sqrt(h2[i]) + delta)
            ws[i] = w - step
    hist = h1 + (h2 if type_ in ("AdaDelta", "Adam") else [])
    return ws, hist


def _problem(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(3, 4)), rng.normal(size=(4,))]
    ws[0][0, 0] = 0.0  # sign(0) = 0 for L1
    grads = [[rng.normal(size=w.shape) for w in ws] for _ in range(3)]
    return ws, grads


CONFIGS = {
    "plain": dict(),
    "l2": dict(weight_decay=0.5),
    "l1": dict(weight_decay=0.1, regularization_type="L1"),
    "clip": dict(weight_decay=0.5, clip_gradients=0.5),
    "clip_inactive": dict(clip_gradients=1e6),
    "iter_size": dict(weight_decay=0.5, iter_size=3),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("type_", ALL)
def test_rule_matches_reference(type_: str, config: str) -> None:
    momentum = 0.0 if type_ in NO_MOMENTUM else 0.9
    p = _param(type_, momentum=momentum, rms_decay=0.95, delta=1e-6, **CONFIGS[config])
    ws, grads = _problem()
    lr_mults, decay_mults = [1.0, 2.0], [1.0, 0.5]
    rate = 1.0 if type_ == "AdaDelta" else 0.01
    blobs = [_blob(w) for w in ws]
    rule = rules.make_rule(p)
    rule.setup(blobs)
    _run(rule, blobs, grads, lr_mults, decay_mults, rate, it0=4)
    want_w, want_h = _reference(type_, p, ws, grads, lr_mults, decay_mults, rate, it0=4)
    for b, w in zip(blobs, want_w):
        np.testing.assert_allclose(b.data, w, rtol=1e-10, atol=1e-12)
    assert len(rule.history) == len(want_h)
    for h, w in zip(rule.history, want_h):
        np.testing.assert_allclose(h, w, rtol=1e-10, atol=1e-12)


# -- hand-computed numbers ------------------------------------------------------------------
def _scalar_run(type_: str, grads: list[float], w0: float = 1.0, rate: float = 0.1,
                lr_mult: float = 1.0, decay_mult: float = 1.0, **kw: object) -> tuple:
    rule = rules.make_rule(_param(type_, **kw))
    b = _blob(np.array([w0]))
    rule.setup([b])
    ws = []
    for k, g in enumerate(grads):
        b.diff[...] = g
        rule.apply([b], [lr_mult], [decay_mult], rate, k)
        ws.append(float(b.data[0]))
    return ws, [float(h[0]) for h in rule.history]


def test_sgd_by_hand() -> None:
    # v1 = 0.1·0.5 = 0.05; v2 = 0.9·0.05 + 0.05 = 0.095; v3 = 0.9·0.095 + 0.05 = 0.1355
    ws, hist = _scalar_run("SGD", [0.5, 0.5, 0.5], momentum=0.9)
    assert ws == pytest.approx([0.95, 0.855, 0.7195], abs=1e-7)
    assert hist == pytest.approx([0.1355], abs=1e-7)


def test_sgd_l2_decay_and_multipliers_by_hand() -> None:
    # λ = 0.5·2 = 1, lr = 0.1·0.5 = 0.05, momentum 0.5, g = 0 so the decay drives everything.
    # g1 = 1.0: v1 = 0.05, w1 = 0.95
    # g2 = 0.95: v2 = 0.025 + 0.0475 = 0.0725, w2 = 0.8775
    # g3 = 0.8775: v3 = 0.03625 + 0.043875 = 0.080125, w3 = 0.797375
    ws, hist = _scalar_run("SGD", [0, 0, 0], lr_mult=0.5, decay_mult=2.0, momentum=0.5,
                           weight_decay=0.5)
    assert ws == pytest.approx([0.95, 0.8775, 0.797375], abs=1e-7)
    assert hist == pytest.approx([0.080125], abs=1e-7)


def test_sgd_l1_decay_by_hand() -> None:
    # L1: g += 0.2·sign(w): w = 1 → 1 − 0.1·(0.3 + 0.2) = 0.95 → 0.9 → 0.85 (no momentum)
    ws, _ = _scalar_run("SGD", [0.3, 0.3, 0.3], weight_decay=0.2, regularization_type="L1")
    assert ws == pytest.approx([0.95, 0.9, 0.85], abs=1e-7)
    # sign(0) = 0: a zero weight gets no L1 push
    ws, _ = _scalar_run("SGD", [0.0], w0=0.0, weight_decay=0.2, regularization_type="L1")
    assert ws == [0.0]


def test_nesterov_by_hand() -> None:
    # v1 = 0.05, step = 1.9·0.05 − 0.9·0 = 0.095 → w1 = 0.905
    # v2 = 0.095, step = 1.9·0.095 − 0.9·0.05 = 0.1355 → w2 = 0.7695
    ws, hist = _scalar_run("Nesterov", [0.5, 0.5], momentum=0.9)
    assert ws == pytest.approx([0.905, 0.7695], abs=1e-7)
    assert hist == pytest.approx([0.095], abs=1e-7)


def test_adagrad_by_hand() -> None:
    # h1 = 4, step = 0.1·2/2 = 0.1; h2 = 4 + 9 = 13, step = 0.1·3/√13
    ws, hist = _scalar_run("AdaGrad", [2.0, 3.0], delta=0.0)
    assert ws == pytest.approx([0.9, 0.9 - 0.3 / math.sqrt(13)], abs=1e-7)
    assert hist == pytest.approx([13.0], abs=1e-7)


def test_rmsprop_by_hand() -> None:
    # h1 = 0.1·4 = 0.4, step = 0.1·2/√0.4
    ws, hist = _scalar_run("RMSProp", [2.0], rms_decay=0.9, delta=0.0)
    assert ws == pytest.approx([1 - 0.2 / math.sqrt(0.4)], abs=1e-7)
    assert hist == pytest.approx([0.4], abs=1e-7)


def test_adadelta_by_hand() -> None:
    # ρ = 0.5, δ = 1: h_g = 0.5·4 = 2; u = 2·√((0 + 1)/(2 + 1)); h_u = 0.5·u²; w = 1 − 1·u
    ws, hist = _scalar_run("AdaDelta", [2.0], rate=1.0, momentum=0.5, delta=1.0)
    u = 2 * math.sqrt(1 / 3)
    assert ws == pytest.approx([1 - u], abs=1e-7)
    assert hist == pytest.approx([2.0, 0.5 * u * u], abs=1e-7)  # [h_g, h_u]


def test_adam_by_hand() -> None:
    # t = 1: m = 0.1·2 = 0.2, v = 0.001·4 = 0.004, corr = √0.001/0.1
    # step = 0.1·corr·0.2/√0.004 = 0.1·(√0.001/0.1)·0.2/(2√0.001) = 0.1 (first Adam step = lr)
    ws, hist = _scalar_run("Adam", [2.0], momentum=0.9, momentum2=0.999, delta=0.0)
    assert ws == pytest.approx([0.9], abs=1e-7)
    assert hist == pytest.approx([0.2, 0.004], abs=1e-7)


def test_clip_scales_all_params_by_global_norm(caplog: pytest.LogCaptureFixture) -> None:
    rule = rules.make_rule(_param("SGD", clip_gradients=1.0))
    a, b = _blob(np.zeros(1)), _blob(np.zeros(1))
    rule.setup([a, b])
    a.diff[...], b.diff[...] = 3.0, 4.0  # norm 5 → scale 0.2
    with caplog.at_level("INFO", logger="pycaffe_mpi"):
        rule.apply([a, b], [1.0, 1.0], [1.0, 1.0], 1.0, 0)
    assert float(a.data[0]) == pytest.approx(-0.6)
    assert float(b.data[0]) == pytest.approx(-0.8)
    assert "Gradient clipping: scaling down gradients (L2 norm 5 > 1) by scale factor 0.2" \
        in caplog.text


def test_iter_size_divides_the_accumulated_gradient() -> None:
    ws, _ = _scalar_run("SGD", [3.0], iter_size=3)  # diff 3 from 3 passes → mean 1
    assert ws == pytest.approx([0.9])


# -- layout, dtype, in place ----------------------------------------------------------------
@pytest.mark.parametrize("type_", ALL)
def test_history_order_and_float32_in_place(type_: str) -> None:
    momentum = 0.0 if type_ in NO_MOMENTUM else 0.9
    rule = rules.make_rule(_param(type_, momentum=momentum, weight_decay=0.1))
    blobs = [_blob(np.ones((2, 3)), np.float32), _blob(np.ones(5), np.float32)]
    rule.setup(blobs)
    sets = 2 if type_ in ("AdaDelta", "Adam") else 1
    assert [h.shape for h in rule.history] == [(2, 3), (5,)] * sets
    data_ids = [id(b.data) for b in blobs]
    hist_ids = [id(h) for h in rule.history]
    for k in range(3):
        for b in blobs:
            b.diff[...] = 0.5
        rule.apply(blobs, [1.0, 1.0], [1.0, 1.0], 0.01, k)
    assert [id(b.data) for b in blobs] == data_ids
    assert [id(h) for h in rule.history] == hist_ids
    for arr in [*rule.history, *(b.data for b in blobs)]:
        assert arr.dtype == np.float32
        assert np.all(np.isfinite(arr))
    assert float(blobs[0].data[0, 0]) < 1.0


def test_adam_history_is_first_then_second_moments() -> None:
    rule = rules.make_rule(_param("Adam", momentum=0.9))
    blobs = [_blob(np.zeros(2)), _blob(np.zeros(3))]
    rule.setup(blobs)
    blobs[0].diff[...], blobs[1].diff[...] = 1.0, 2.0
    rule.apply(blobs, [1.0, 1.0], [1.0, 1.0], 0.1, 0)
    m0, m1, v0, v1 = rule.history
    np.testing.assert_allclose(m0, 0.1, rtol=1e-6)
    np.testing.assert_allclose(m1, 0.2, rtol=1e-6)
    np.testing.assert_allclose(v0, 0.001, rtol=1e-4)  # 1 − float32(0.999)
    np.testing.assert_allclose(v1, 0.004, rtol=1e-4)


# -- Caffe's checks and the type/solver_type upgrade -----------------------------------------
def test_adagrad_refuses_momentum() -> None:
    with pytest.raises(errors.SolverError, match=r"Momentum cannot be used with AdaGrad\."):
        rules.make_rule(_param("AdaGrad", momentum=0.9))


def test_rmsprop_checks() -> None:
    with pytest.raises(errors.SolverError, match=r"Momentum cannot be used with RMSProp\."):
        rules.make_rule(_param("RMSProp", momentum=0.9))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(errors.SolverError, match="rms_decay should lie between 0 and 1"):
            rules.make_rule(_param("RMSProp", rms_decay=bad))
    rules.make_rule(_param("RMSProp", rms_decay=0.0))


def test_unknown_regularization_type() -> None:
    with pytest.raises(errors.SolverError, match=r'Unknown regularization type: "l2".*"L2"'):
        rules.make_rule(_param("SGD", regularization_type="l2"))


def test_unknown_solver_type_suggests() -> None:
    with pytest.raises(errors.SolverError, match=r'Unknown solver type: "Adma".*"Adam"'):
        rules.make_rule(_param("Adma"))


def test_deprecated_solver_type_enum() -> None:
    P = caffe_pb2.SolverParameter
    for enum, name in [(P.SGD, "SGD"), (P.NESTEROV, "Nesterov"), (P.ADAGRAD, "AdaGrad"),
                       (P.RMSPROP, "RMSProp"), (P.ADADELTA, "AdaDelta"), (P.ADAM, "Adam")]:
        p = P(solver_type=enum)
        assert rules.solver_type(p) == name
        assert type(rules.make_rule(p)).type == name
        assert rules.upgrade_solver_type(p)
        assert p.type == name and not p.HasField("solver_type")
    assert rules.solver_type(P(solver_type=P.ADAM, type="Adam")) == "Adam"  # agreeing: fine
    with pytest.raises(errors.SolverError, match="solver_type"):
        rules.solver_type(P(solver_type=P.ADAM, type="SGD"))
    assert rules.solver_type(P()) == "SGD"  # the default


def test_apply_checks_param_count() -> None:
    rule = rules.make_rule(_param("SGD"))
    rule.setup([_blob(np.zeros(2))])
    with pytest.raises(errors.SolverError):
        rule.apply([_blob(np.zeros(2)), _blob(np.zeros(2))], [1, 1], [1, 1], 0.1, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", ["plain", "l2", "l1", "iter_size"])
def test_sgd_one_pass_kernel_equals_the_numpy_passes_bit_for_bit(
        dtype: type, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # SGDRule steps host arrays in one pass (kernels/update_cpu.py); the base class runs
    # Caffe's passes. Large enough to be split between lanes; decay_mult 0 skips the decay.
    from pycaffe_mpi.kernels import threads, update_cpu

    calls = []
    kernel = update_cpu.sgd
    monkeypatch.setattr(update_cpu, "sgd", lambda *a: calls.append(a[0].size) or kernel(*a))
    monkeypatch.setattr(update_cpu, "MIN_LANE_ELEMENTS", 1000)
    threads.set_count(2)
    p = _param("SGD", momentum=0.9, **CONFIGS[config])
    rng = np.random.default_rng(3)
    shapes = [(300, 700), (64,), (5, 3, 3)]
    start = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s).astype(dtype) for s in shapes] for _ in range(3)]
    out = {}
    try:
        for cls in (rules.SGDRule, rules.UpdateRule):
            blobs = [_blob(w, dtype) for w in start]
            rule = cls(p)
            rule.setup(blobs)
            _run(rule, blobs, grads, [1.0, 2.0, 1.0], [1.0, 0.0, 0.5], 0.01)
            out[cls] = [b.data for b in blobs] + [b.diff for b in blobs] + rule.history
    finally:
        threads.set_count(None)
    l1 = config == "l1"  # L1 decay stays on the NumPy passes (but decay_mult 0 does not)
    assert calls == ([64] if l1 else [300 * 700, 64, 45]) * 3
    assert type(rules.make_rule(p)) is rules.SGDRule
    for a, b in zip(out[rules.SGDRule], out[rules.UpdateRule]):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(out[rules.SGDRule][0], start[0].astype(dtype))  # it moved
