"""Learning-rate policies against their closed forms (Caffe's SGDSolver::GetLearningRate)."""

from __future__ import annotations

import math

import pytest

from pycaffe_mpi import errors
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.solvers import lr_policy


def _param(**kw: object) -> caffe_pb2.SolverParameter:
    return caffe_pb2.SolverParameter(**kw)


def _rate(p: caffe_pb2.SolverParameter, it: int, step: int = 0) -> float:
    return lr_policy.learning_rate(p, it, step)[0]


def test_fixed() -> None:
    p = _param(lr_policy="fixed", base_lr=0.01)
    for it in (0, 1, 1000, 10**6):
        assert _rate(p, it) == pytest.approx(0.01, rel=1e-7)


def test_step_sets_current_step() -> None:
    p = _param(lr_policy="step", base_lr=0.01, gamma=0.1, stepsize=100)
    for it, k in [(0, 0), (99, 0), (100, 1), (199, 1), (250, 2), (1000, 10)]:
        rate, step = lr_policy.learning_rate(p, it, 0)
        assert step == k
        assert rate == pytest.approx(p.base_lr * p.gamma ** k, rel=1e-9)


def test_exp() -> None:
    p = _param(lr_policy="exp", base_lr=0.1, gamma=0.99)
    for it in (0, 1, 10, 500):
        assert _rate(p, it) == pytest.approx(p.base_lr * p.gamma ** it, rel=1e-9)


def test_inv() -> None:
    p = _param(lr_policy="inv", base_lr=0.01, gamma=1e-4, power=0.75)
    for it in (0, 1, 100, 10000):
        want = p.base_lr * (1 + p.gamma * it) ** (-p.power)
        assert _rate(p, it) == pytest.approx(want, rel=1e-9)
    assert _rate(p, 0) == pytest.approx(0.01, rel=1e-7)


def test_multistep_is_stateful() -> None:
    p = _param(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[10, 20, 40])
    step = 0
    seen = {}
    for it in range(60):
        rate, step = lr_policy.learning_rate(p, it, step)
        seen[it] = (rate, step)
    assert seen[0] == (1.0, 0)
    assert seen[9] == (1.0, 0)
    assert seen[10] == (0.5, 1)
    assert seen[19] == (0.5, 1)
    assert seen[20] == (0.25, 2)
    assert seen[39] == (0.25, 2)
    assert seen[40] == (0.125, 3)
    assert seen[59] == (0.125, 3)  # no more stepvalues: stays


def test_multistep_resumes_from_saved_step() -> None:
    p = _param(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[10, 20, 40])
    # a restored run passes the saved current_step back in
    assert lr_policy.learning_rate(p, 25, 2) == (0.25, 2)
    # NOTE: Caffe advances at most one step per call; a run that jumps past several
    # stepvalues with a stale current_step catches up one step per iteration.
    assert lr_policy.learning_rate(p, 45, 0) == (0.5, 1)
    assert lr_policy.learning_rate(p, 46, 1) == (0.25, 2)


def test_multistep_logs_caffe_status_line(caplog: pytest.LogCaptureFixture) -> None:
    p = _param(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[3])
    with caplog.at_level("INFO", logger="pycaffe_mpi"):
        lr_policy.learning_rate(p, 3, 0)
    assert "MultiStep Status: Iteration 3, step = 1" in caplog.text


def test_poly() -> None:
    p = _param(lr_policy="poly", base_lr=0.1, power=2.0, max_iter=100)
    for it in (0, 1, 50, 99):
        want = p.base_lr * (1 - it / 100) ** 2
        assert _rate(p, it) == pytest.approx(want, rel=1e-9)
    assert _rate(p, 100) == 0.0  # zero at max_iter
    p.power = 0.5
    assert _rate(p, 100) == 0.0
    assert _rate(p, 75) == pytest.approx(p.base_lr * 0.5, rel=1e-7)


def test_sigmoid() -> None:
    p = _param(lr_policy="sigmoid", base_lr=0.2, gamma=0.1, stepsize=50)
    assert _rate(p, 50) == pytest.approx(0.1, rel=1e-7)  # half at the step
    for it in (0, 10, 100, 400):
        want = p.base_lr / (1 + math.exp(-p.gamma * (it - 50)))
        assert _rate(p, it) == pytest.approx(want, rel=1e-9)
    # far before the step: tiny, no overflow
    p.gamma = 100.0
    assert _rate(p, 0) == pytest.approx(0.0, abs=1e-300)


def test_unknown_policy_suggests_a_name() -> None:
    with pytest.raises(errors.SolverError, match=r'Unknown learning rate policy: "stpe".*"step"'):
        _rate(_param(lr_policy="stpe", base_lr=0.1), 0)
    with pytest.raises(errors.SolverError, match="Unknown learning rate policy"):
        _rate(_param(base_lr=0.1), 0)  # lr_policy has no default, as in Caffe


@pytest.mark.parametrize("kw", [
    dict(lr_policy="step", stepsize=0, gamma=0.1),
    dict(lr_policy="step", stepsize=10, gamma=-1.0),
    dict(lr_policy="sigmoid", stepsize=0, gamma=0.1),
    dict(lr_policy="exp", gamma=-0.5),
])
def test_caffe_checks(kw: dict) -> None:
    with pytest.raises(errors.SolverError):
        _rate(_param(base_lr=0.1, **kw), 5)
