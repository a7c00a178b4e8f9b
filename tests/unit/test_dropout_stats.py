"""Dropout statistics, as Caffe's test_neuron_layer checks them: the dropped fraction is within
1.96 standard errors of the ratio, kept values are x / (1 − r), and TEST is the identity."""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer


def _dropout(ratio: float, phase: int, x: np.ndarray, dtype=np.float32):
    case = LayerCase(type="Dropout", id="stats",
                     proto=f"dropout_param {{ dropout_ratio: {ratio} }}", phase=phase)
    layer, bb, tb = build_layer(case, [x], dtype)
    layer.forward(bb, tb)
    return layer, bb, tb


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_train_drops_the_ratio_and_scales_the_rest(ratio, dtype):
    x = np.random.default_rng(1701).standard_normal((64, 3, 20, 25))  # no exact zeros
    _, _, tb = _dropout(ratio, TRAIN, x, dtype)
    y = np.asarray(tb[0].data)
    kept = y != 0
    count = x.size
    std_error = np.sqrt(ratio * (1 - ratio) / count)
    empirical = 1.0 - kept.sum() / count
    assert abs(empirical - ratio) <= 1.96 * std_error, (empirical, ratio, std_error)
    want = x.astype(dtype)[kept] / dtype(1 - ratio)
    np.testing.assert_allclose(y[kept], want, rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_backward_uses_the_forward_mask(ratio):
    x = np.random.default_rng(3).standard_normal((50, 40))
    layer, bb, tb = _dropout(ratio, TRAIN, x, np.float64)
    tb[0].diff[...] = 1.0
    layer.backward(tb, [True], bb)
    kept = tb[0].data != 0
    np.testing.assert_array_equal(bb[0].diff != 0, kept)
    np.testing.assert_allclose(bb[0].diff[kept], 1.0 / (1.0 - ratio))


def test_masks_differ_between_forwards():
    x = np.ones((40, 50))
    layer, bb, tb = _dropout(0.5, TRAIN, x, np.float64)
    first = np.array(tb[0].data)
    layer.forward(bb, tb)
    assert not np.array_equal(first, tb[0].data)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_test_phase_is_identity(ratio):
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 5))
    layer, bb, tb = _dropout(ratio, TEST, x, np.float64)
    np.testing.assert_array_equal(tb[0].data, x)
    tb[0].diff[...] = x
    layer.backward(tb, [True], bb)
    np.testing.assert_array_equal(bb[0].diff, x)


def test_ratio_one_is_refused():
    with pytest.raises(errors.NetError, match="dropout_ratio"):
        _dropout(1.0, TRAIN, np.ones((2, 2)))
