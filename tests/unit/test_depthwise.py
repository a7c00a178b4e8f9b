"""Host depthwise convolution kernels (pycaffe_mpi/kernels/depthwise.py): forward, input,
weight and bias gradients against a NumPy reference over strides, padding, dilation, odd sizes
and channel multipliers, results that do not depend on the thread count, and the Convolution
layer choosing them only for 2-D depthwise convolutions on the host."""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi.kernels import depthwise, threads
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer

# (N, C, multiplier, H, W, kernel, stride, pad, dilation)
GEOMETRIES = [
    (2, 3, 1, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 2, 2, 7, 5, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 2, 1, 8, 9, (3, 3), (1, 1), (2, 2), (2, 2)),
    (1, 2, 3, 6, 9, (2, 3), (2, 3), (0, 2), (1, 2)),
    (2, 1, 1, 4, 4, (3, 3), (2, 2), (0, 0), (1, 1)),
    (2, 2, 1, 11, 10, (1, 1), (2, 2), (0, 0), (1, 1)),  # unread rows and columns: dx = 0
    (4, 3, 1, 16, 15, (3, 3), (2, 2), (1, 1), (1, 1)),  # MobileNet's stride 2, odd width
    (2, 4, 1, 3, 40, (5, 5), (1, 1), (2, 2), (1, 1)),  # rows longer than one pass
]


@pytest.fixture
def lanes():
    """Restore the default thread count after the test."""
    yield threads.set_count
    threads.set_count(None)


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def reference(x, w, b, dy, stride, pad, dilation):
    """``(y, dx, dw, db)`` by shifted slices of the zero-padded input, one per kernel offset."""
    num, chans, height, width = x.shape
    outs, _, kh, kw = w.shape
    m = outs // chans
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh_n, ow_n = dy.shape[2:]
    xpad = np.pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw)])
    wg = w.reshape(chans, m, kh, kw)
    dyg = dy.reshape(num, chans, m, oh_n, ow_n)
    y = np.zeros((num, chans, m, oh_n, ow_n)) + b.reshape(chans, m, 1, 1)
    dxpad, dwg = np.zeros_like(xpad), np.zeros_like(wg)
    for i in range(kh):
        for j in range(kw):
            win = (slice(None), slice(None), slice(i * dh, i * dh + sh * (oh_n - 1) + 1, sh),
                   slice(j * dw, j * dw + sw * (ow_n - 1) + 1, sw))
            y += wg[None, :, :, i, j, None, None] * xpad[win][:, :, None]
            dxpad[win] += np.einsum("ncmpq,cm->ncpq", dyg, wg[:, :, i, j])
            dwg[:, :, i, j] = np.einsum("ncmpq,ncpq->cm", dyg, xpad[win])
    dx = dxpad[:, :, ph:ph + height, pw:pw + width]
    return (y.reshape(num, outs, oh_n, ow_n), dx, dwg.reshape(w.shape),
            dy.sum(axis=(0, 2, 3)))


def _arrays(geometry, dtype, seed=0):
    num, chans, m, height, width, kernel, stride, pad, dilation = geometry
    rng = np.random.default_rng(seed)
    out = [_out(s, k, st, p, d) for s, k, st, p, d in
           zip((height, width), kernel, stride, pad, dilation)]
    x = rng.standard_normal((num, chans, height, width))
    w = rng.standard_normal((chans * m, 1, *kernel))
    b = rng.standard_normal(chans * m)
    dy = rng.standard_normal((num, chans * m, *out))
    return [a.astype(dtype) for a in (x, w, b, dy)]


def _run(geometry, x, w, b, dy, want_dx=True, bias=True):
    """``(y, dx, dw, db)`` from the kernels, ``dw``/``db`` accumulated onto ones and ``dx``
    overwriting garbage."""
    kernel, stride, pad, dilation = geometry[5:]
    conv = depthwise.Depthwise(kernel, stride, pad, dilation)
    y = np.full(dy.shape, np.nan, x.dtype)
    conv.forward(x, w, b if bias else None, y)
    dx = np.full(x.shape, np.nan, x.dtype) if want_dx else None
    dw, db = np.ones_like(w), np.ones_like(b)
    conv.backward(x, w, dy, dw, db if bias else None, dx)
    return y, dx, dw - 1, db - 1


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g[:5]) for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_reference(geometry, dtype, lanes):
    lanes(2)
    x, w, b, dy = _arrays(geometry, dtype)
    want = reference(*(a.astype(np.float64) for a in (x, w, b, dy)), *geometry[6:])
    got = _run(geometry, x, w, b, dy)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * max(1.0, np.abs(r).max()),
                                   err_msg=name)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=[str(g[:5]) for g in GEOMETRIES[:4]])
def test_without_input_gradient_or_bias(geometry, lanes):
    x, w, b, dy = _arrays(geometry, np.float64)
    y_ref, _, dw_ref, _ = reference(x, w, np.zeros_like(b), dy, *geometry[6:])
    y, dx, dw, db = _run(geometry, x, w, b, dy, want_dx=False, bias=False)
    assert dx is None and not db.any()
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[6]],
                         ids=[str(GEOMETRIES[1][:5]), str(GEOMETRIES[6][:5])])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_thread_count_does_not_change_results(geometry, dtype, lanes):
    x, w, b, dy = _arrays(geometry, dtype, seed=3)
    results = []
    for count in (1, 3):
        lanes(count)
        results.append(_run(geometry, x, w, b, dy))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for name, one, three in zip(("y", "dx", "dw", "db"), *results):
        np.testing.assert_allclose(one, three, rtol=tol, atol=tol, err_msg=name)


def _layer(proto: str, shape: tuple[int, ...]):
    case = LayerCase(type="Convolution", id="dw",
                     proto=f"convolution_param {{ {proto} }}", bottoms=[shape])
    rng = np.random.default_rng(0)
    layer, _, _ = build_layer(case, [rng.standard_normal(shape)], np.float32)
    return layer


def test_layer_uses_the_kernels_only_for_2d_depthwise():
    assert _layer("num_output: 4 kernel_size: 3 group: 2", (1, 2, 5, 5)).depthwise is not None
    assert _layer("num_output: 4 kernel_size: 3 group: 2", (1, 4, 5, 5)).depthwise is None
    assert _layer("num_output: 2 kernel_size: 2 group: 2", (1, 2, 3, 4, 4)).depthwise is None
