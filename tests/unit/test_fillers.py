"""Fillers, with Caffe's own statistical checks (test_filler.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import errors, fillers
from pycaffe_mpi.proto import caffe_pb2


def fp(text: str) -> caffe_pb2.FillerParameter:
    return text_format.Merge(text, caffe_pb2.FillerParameter())


RNG = np.random.default_rng(1701)


def test_default_is_constant_zero():
    assert not fillers.fill(None, (3, 4), RNG).any()
    assert not fillers.fill(caffe_pb2.FillerParameter(), (3, 4), RNG).any()


def test_constant_and_dtype():
    out = fillers.fill(fp("type: 'constant' value: 2.5"), (2, 3, 4), RNG, np.float64)
    assert out.dtype == np.float64 and (out == 2.5).all()


def test_uniform_range():
    out = fillers.fill(fp("type: 'uniform' min: -2 max: 3"), (1000,), RNG)
    assert out.min() >= -2 and out.max() <= 3 and out.std() > 1


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 4, 5, 2)])
def test_gaussian_moments(shape):
    big = (shape[0] * 200, *shape[1:])
    out = fillers.fill(fp("type: 'gaussian' mean: 10 std: 0.1"), big, RNG)
    tol = 3 if len(shape) == 4 else 2
    assert abs(out.mean() - 10) < 0.1 * tol
    assert 0.01 / tol <= out.var() <= 0.01 * tol


def test_sparse_gaussian_keeps_expected_fraction():
    out = fillers.fill(fp("type: 'gaussian' std: 1 sparse: 3"), (30, 2000), RNG)
    frac = (out != 0).mean()
    assert abs(frac - 3 / 30) < 0.01


def test_sparse_other_filler_is_an_error():
    with pytest.raises(errors.NetError, match="sparsity"):
        fillers.fill(fp("type: 'xavier' sparse: 3"), (3, 3), RNG)


def test_positive_unitball_rows_sum_to_one():
    out = fillers.fill(fp("type: 'positive_unitball'"), (2, 3, 4, 5), RNG)
    sums = out.reshape(2, -1).sum(1)
    assert ((sums > 0.999) & (sums < 1.001)).all() and (out >= 0).all()


@pytest.mark.parametrize(("norm", "n"), [("FAN_IN", 40), ("FAN_OUT", 20000), ("AVERAGE", 10020)])
def test_xavier_and_msra_scale(norm, n):
    shape = (1000, 2, 4, 5)
    x = fillers.fill(fp(f"type: 'xavier' variance_norm: {norm}"), shape, RNG)
    assert abs(x.mean()) < 0.1 and abs(x.std() - np.sqrt(1.0 / n)) < 0.1 * np.sqrt(1.0 / n) + 1e-3
    assert np.abs(x).max() <= np.sqrt(3.0 / n) + 1e-7
    m = fillers.fill(fp(f"type: 'msra' variance_norm: {norm}"), shape, RNG)
    assert abs(m.mean()) < 0.1 and abs(m.std() - np.sqrt(2.0 / n)) < 0.1 * np.sqrt(2.0 / n) + 1e-3


@pytest.mark.parametrize("k", [3, 4, 5])
def test_bilinear_formula(k):
    out = fillers.fill(fp("type: 'bilinear'"), (2, 3, k, k), RNG)
    f = np.ceil(k / 2)
    c = (k - 1) / (2 * f)
    for y in range(k):
        for x in range(k):
            want = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
            assert out[1, 2, y, x] == pytest.approx(want, abs=0.01)


def test_unknown_filler_suggests():
    with pytest.raises(errors.NetError, match='did you mean "gaussian"'):
        fillers.fill(fp("type: 'gausian'"), (2,), RNG)
