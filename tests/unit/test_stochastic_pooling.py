"""STOCHASTIC pooling: Caffe's test_stochastic_pooling checks, the sampling law, and its rules
(no padding, no TEST backward, SPP levels without padding)."""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer

K3S2 = "pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }"


def _layer(x, proto=K3S2, phase=TRAIN, dtype=np.float64, type_name="Pooling"):
    case = LayerCase(type_name, "s", proto, bottoms=[x.shape], phase=phase)
    return build_layer(case, [x], dtype)


def _caffe_bottom(dtype=np.float64):
    """Caffe's fixture: 2×3×6×5 uniform in [0.1, 1]."""
    return np.random.default_rng(1701).uniform(0.1, 1.0, (2, 3, 6, 5)).astype(dtype)


def _windows(x, oh, ow):
    """The k3 s2 windows (clipped to the image) of every output, as arrays."""
    h, w = x.shape[2:]
    return [[x[:, :, i * 2:min(i * 2 + 3, h), j * 2:min(j * 2 + 3, w)] for j in range(ow)]
            for i in range(oh)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_outputs_a_window_value_biased_to_large_ones(dtype):
    """Caffe's TestStochastic: every output is one of its window's values, and their mean
    (weighted to high values) is at least 0.55 (the data mean is 0.55)."""
    x = _caffe_bottom(dtype)
    layer, bb, tb = _layer(x, dtype=dtype)
    layer.forward(bb, tb)
    y = tb[0].data
    assert y.shape == (2, 3, 3, 2)
    for i, row in enumerate(_windows(x, 3, 2)):
        for j, win in enumerate(row):
            hits = win == y[:, :, i, j][:, :, None, None]
            assert hits.any(axis=(2, 3)).all(), f"output ({i}, {j}) is not a window value"
    assert y.mean() >= 0.55


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_test_phase_is_the_weighted_average(dtype):
    """Caffe's TestStochasticTestPhase (each output is at most its window's maximum), and the
    value itself: Σ x² / Σ x."""
    x = _caffe_bottom(dtype)
    layer, bb, tb = _layer(x, phase=TEST, dtype=dtype)
    layer.forward(bb, tb)
    y = tb[0].data
    for i, row in enumerate(_windows(x.astype(np.float64), 3, 2)):
        for j, win in enumerate(row):
            want = (win**2).sum(axis=(2, 3)) / win.sum(axis=(2, 3))
            np.testing.assert_allclose(y[:, :, i, j], want, rtol=1e-5)
            assert (y[:, :, i, j] <= win.max(axis=(2, 3)) * (1 + 1e-6)).all()


def test_samples_in_proportion_to_the_values():
    """Many copies of one 2×2 window [1 2 / 3 4]: cell m is picked with probability m / 10."""
    x = np.broadcast_to(np.array([[1.0, 2.0], [3.0, 4.0]]), (4000, 5, 2, 2)).copy()
    layer, bb, tb = _layer(x, "pooling_param { pool: STOCHASTIC kernel_size: 2 }")
    layer.forward(bb, tb)
    freq = np.array([(tb[0].data == v).mean() for v in (1.0, 2.0, 3.0, 4.0)])
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)
    assert freq.sum() == 1.0


def test_zero_cells_are_never_picked_and_a_zero_window_gives_zero():
    """u lies in (0, 1] as in Caffe, so a cell of value 0 is never picked while the window has
    a positive sum; an all-zero window outputs 0 and routes its gradient to its first cell."""
    x = np.zeros((500, 2, 2, 4))
    x[:, :, 1, 0] = 5.0  # window 0: only one positive cell
    layer, bb, tb = _layer(x, "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }")
    layer.forward(bb, tb)
    np.testing.assert_array_equal(tb[0].data[..., 0, 0], 5.0)
    np.testing.assert_array_equal(tb[0].data[..., 0, 1], 0.0)
    tb[0].diff[...] = 1.0
    layer.backward(tb, [True], bb)
    want = np.zeros_like(x)
    want[:, :, 1, 0] = want[:, :, 0, 2] = 1.0
    np.testing.assert_array_equal(bb[0].diff, want)


def test_draws_come_from_the_layer_rng():
    x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 6, 6)))
    layer, bb, tb = _layer(x)
    layer.rng = np.random.default_rng(5)
    layer.forward(bb, tb)
    first = tb[0].data.copy()
    layer.forward(bb, tb)
    assert not np.array_equal(first, tb[0].data), "a second forward should draw again"
    layer.rng = np.random.default_rng(5)
    layer.forward(bb, tb)
    np.testing.assert_array_equal(first, tb[0].data)


def test_backward_routes_to_the_picked_cells_and_adds_overlaps():
    x = np.abs(np.random.default_rng(1).standard_normal((2, 2, 5, 5)))
    layer, bb, tb = _layer(x, "pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 1 }")
    layer.forward(bb, tb)
    dy = np.random.default_rng(2).standard_normal(tb[0].shape)
    tb[0].diff[...] = dy
    layer.backward(tb, [True], bb)
    want = np.zeros_like(x)
    for n, c, i, j in np.ndindex(*tb[0].shape):
        win = x[n, c, i:i + 3, j:j + 3]
        a, b = np.argwhere(win == tb[0].data[n, c, i, j])[0]
        want[n, c, i + a, j + b] += dy[n, c, i, j]
    np.testing.assert_allclose(bb[0].diff, want, rtol=1e-12, atol=1e-12)


def test_test_phase_backward_refuses_as_caffe_has_none():
    x = np.abs(np.random.default_rng(0).standard_normal((1, 2, 4, 4)))
    layer, bb, tb = _layer(x, phase=TEST)
    layer.forward(bb, tb)
    tb[0].diff[...] = 1.0
    with pytest.raises(NotImplementedError, match="no backward in the TEST phase"):
        layer.backward(tb, [True], bb)
    bb[0].diff[...] = np.nan
    layer.backward(tb, [False], bb)  # nothing asked, nothing written
    assert np.isnan(bb[0].diff).all()


def test_spp_test_phase_backward_refuses():
    x = np.abs(np.random.default_rng(0).standard_normal((1, 2, 4, 4)))
    layer, bb, tb = _layer(x, "spp_param { pyramid_height: 2 pool: STOCHASTIC }", phase=TEST,
                           type_name="SPP")
    layer.forward(bb, tb)
    tb[0].diff[...] = 1.0
    with pytest.raises(NotImplementedError, match="TEST phase"):
        layer.backward(tb, [True], bb)


@pytest.mark.parametrize("proto", [
    "pooling_param { pool: STOCHASTIC kernel_size: 3 pad: 1 }",
    "pooling_param { pool: STOCHASTIC kernel_size: 3 pad_h: 0 pad_w: 1 }",
])
def test_padding_is_refused_as_in_caffe(proto):
    with pytest.raises(errors.NetError, match=r"pooling_param\.pad.*only for MAX and AVE"):
        _layer(np.ones((1, 1, 5, 5)), proto)


def test_stochastic_has_no_mask_top():
    case = LayerCase("Pooling", "s", K3S2, bottoms=[(1, 1, 5, 5)], ntop=2)
    with pytest.raises(errors.NetError, match="only MAX pooling has a second top"):
        build_layer(case, [np.ones((1, 1, 5, 5))])


def test_spp_needs_sizes_without_padding():
    proto = "spp_param { pyramid_height: 3 pool: STOCHASTIC }"
    with pytest.raises(errors.NetError, match=r"spp_param\.pool.*cannot pad.*4 divides"):
        _layer(np.ones((1, 1, 8, 6)), proto, type_name="SPP")
    layer, bb, tb = _layer(np.ones((1, 1, 8, 12)), proto, type_name="SPP")
    layer.forward(bb, tb)
    np.testing.assert_array_equal(tb[0].data, 1.0)  # every cell of a constant image is 1


def test_reshape_to_a_smaller_image_with_the_same_overhang():
    """Two image sizes whose windows need the same zero margin: the second forward must not see
    cells of the first image in its margin."""
    proto = "pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 3 }"
    rng = np.random.default_rng(3)
    big, small = rng.uniform(1, 2, (1, 1, 5, 5)), rng.uniform(1, 2, (1, 1, 4, 4))  # both 6×6
    layer, bb, tb = _layer(big, proto, phase=TEST)
    layer.forward(bb, tb)
    bb[0].reshape(small.shape)
    bb[0].data[...] = small
    layer.reshape(bb, tb)
    layer.forward(bb, tb)
    fresh, fb, ft = _layer(small, proto, phase=TEST)
    fresh.forward(fb, ft)
    np.testing.assert_array_equal(tb[0].data, ft[0].data)
