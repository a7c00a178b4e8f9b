"""Winograd's F(m×m, r×r) convolutions on the host (kernels/winograd.py through ConvPlan).

The layer suite's ``winograd`` cases check them against the naive references with float64
gradient checks; here: the transform matrices, which plans take Winograd, and float32 / float64
agreement with the im2col products of the same plan over chunks and lanes.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi.kernels import conv_plan, threads, winograd
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import build_layer, make_bottoms


@pytest.mark.parametrize("m, r", [(2, 3), (4, 3), (6, 3), (2, 5), (4, 5), (3, 2)])
def test_matrices_compute_the_1d_correlation(m, r):
    at, g, bt = winograd.matrices(m, r)
    rng = np.random.default_rng(m * 10 + r)
    d, w = rng.standard_normal(m + r - 1), rng.standard_normal(r)
    want = [sum(d[i + j] * w[j] for j in range(r)) for i in range(m)]
    np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), want, rtol=1e-13, atol=1e-13)


def test_f4x4_3x3_matrices_are_lavin_and_grays():
    at, g, bt = winograd.matrices(4, 3)
    np.testing.assert_array_equal(bt[0], [4, 0, -5, 0, 1, 0])
    np.testing.assert_array_equal(bt[5], [0, 4, 0, -5, 0, 1])
    np.testing.assert_allclose(g[1], [-1 / 6] * 3)
    np.testing.assert_array_equal(at[3], [0, 1, -1, 8, -8, 1])


def test_winograd_layer_cases_run_winograd():
    cases = [c for c in layer_cases.all_cases() if "winograd" in c.id]
    assert len(cases) >= 6
    for case in cases:
        layer = build_layer(case, make_bottoms(case.bottoms, np.random.default_rng(0)))[0]
        assert layer.plan.winograd == 4, case.test_id


def _plan(dtype, c, o, k, pad, spatial, n=3, stride=1, dilation=1, group=1, pads=None):
    plan = conv_plan.ConvPlan(np, dtype, c, o, group, (k, k), (stride,) * 2,
                              pads or (pad, pad), (dilation,) * 2)
    plan.reshape(n, spatial)
    return plan


@pytest.mark.parametrize("kwargs", [
    dict(c=16, o=16, k=3, pad=1, spatial=(7, 9)),  # a 7-row output
    dict(c=15, o=32, k=3, pad=1, spatial=(9, 9)),  # too few channels
    dict(c=16, o=16, k=3, pad=1, spatial=(9, 9), stride=2),
    dict(c=16, o=16, k=3, pad=2, spatial=(9, 9), dilation=2),
    dict(c=32, o=32, k=3, pad=1, spatial=(9, 9), group=2),
    dict(c=16, o=16, k=3, pad=0, spatial=(9, 9), pads=(1, 0)),
    dict(c=16, o=16, k=3, pad=3, spatial=(9, 9)),  # pad ≥ r: dx's padding would be negative
    dict(c=16, o=16, k=7, pad=3, spatial=(9, 9)),
    dict(c=16, o=16, k=1, pad=0, spatial=(9, 9)),
])
def test_plans_outside_winograds_scope_use_im2col(kwargs):
    assert _plan(np.float32, **kwargs).winograd == 0


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 3e-5)])
@pytest.mark.parametrize("c, o, k, pad, spatial", [
    (16, 24, 3, 1, (9, 10)),
    (20, 16, 3, 0, (13, 10)),
    (16, 16, 5, 2, (8, 11)),
    (16, 17, 5, 1, (12, 12)),
])
@pytest.mark.parametrize("lanes, chunk_bytes", [(1, None), (2, 1)])
def test_winograd_equals_im2col(monkeypatch, dtype, tol, c, o, k, pad, spatial, lanes,
                                chunk_bytes):
    rng = np.random.default_rng(5)
    n = 5
    x = rng.standard_normal((n, c, *spatial)).astype(dtype)
    w = rng.standard_normal((o, c, k, k)).astype(dtype)
    bias = rng.standard_normal(o).astype(dtype)
    results = []
    threads.set_count(lanes)
    try:
        if chunk_bytes:
            monkeypatch.setattr(conv_plan, "CHUNK_BYTES", chunk_bytes)
        for use in (True, False):
            plan = _plan(dtype, c, o, k, pad, spatial, n=n)
            assert plan.winograd == (4 if use else plan.winograd)
            if not use:
                plan.winograd = 0
            dy = np.random.default_rng(6).standard_normal((n, o, *plan.out)).astype(dtype)
            y, dx, dw = np.empty(dy.shape, dtype), np.empty_like(x), np.ones_like(w)
            plan.forward(x, w, y, bias)
            plan.backward(dy, x, w, dw, dx)
            dw_deconv = np.ones_like(w)  # Deconvolution's backward: forward with dy and dw
            plan.forward(x, w, np.empty_like(y), None, dy=dy, dw=dw_deconv)
            results.append((y, dx, dw, dw_deconv))
    finally:
        threads.set_count(None)
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("layer_type", ["Convolution", "Deconvolution"])
def test_engine_caffe_keeps_im2col_and_default_cudnn_take_winograd(layer_type):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 9, 9))
    results = {}
    for engine in ("DEFAULT", "CUDNN", "CAFFE"):
        case = layer_cases.LayerCase(
            layer_type, f"engine_{engine}",
            f"convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 engine: {engine} "
            "weight_filler { type: 'gaussian' std: 0.1 } }", bottoms=[x.shape])
        layer, bb, tb = build_layer(case, [x])
        assert layer.plan.winograd == (0 if engine == "CAFFE" else 4), engine
        layer.forward(bb, tb)
        results[engine] = np.array(tb[0].data)
    np.testing.assert_allclose(results["DEFAULT"], results["CAFFE"], rtol=1e-10, atol=1e-10)


def test_reshape_reuses_the_transforms_and_zero_bias():
    plan = _plan(np.float32, 16, 16, 3, 1, (9, 9))
    first, zero = plan._wgt, plan._wg_zero
    plan.reshape(3, (9, 9))
    plan.reshape(4, (12, 12))
    assert plan._wgt is first and plan._wg_zero is zero
    assert first.gg.dtype == np.float32 and first.gg.shape == (36, 9)
    np.testing.assert_array_equal(first.a, first.at.T)
