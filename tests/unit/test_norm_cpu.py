"""The host kernels of BatchNorm, Scale and Bias (pycaffe_mpi/kernels/norm_cpu.py): values
against float64 NumPy, the same bits for any number of lanes, channel blocks, the bitwise
compare, and the one copy that an in-place BatchNorm and an in-place Scale after it share."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi.kernels import norm_cpu, threads
from pycaffe_mpi.layer import TRAIN
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

SHAPES = [(1, 1, 1), (3, 5, 7), (2, 4, 1), (6, 3, 33), (4, 9, 50)]
DTYPES = [np.float32, np.float64]


@pytest.fixture
def lanes(monkeypatch):
    """Set the lane count; every channel is worth a lane (no minimum part size)."""
    monkeypatch.setattr(norm_cpu, "MIN_LANE_ELEMENTS", 1)
    yield threads.set_count
    threads.set_count(None)


def _tol(dtype):
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-12,
                                                                       "atol": 1e-12}


def _data(shape, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + offset).astype(dtype)


def _bn_reference(x, dy):
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    inv = 1 / np.sqrt(var + 1e-5)
    xh = (x - mean[:, None]) * inv[:, None]
    dx = (dy - dy.mean(axis=(0, 2), keepdims=True)
          - xh * (dy * xh).mean(axis=(0, 2), keepdims=True)) * inv[:, None]
    return mean, var, inv, xh, dx


def _all_kernels(x, dy, s, b):
    """Every entry point's outputs, in a list."""
    y, kept, g = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    mean, var, inv = norm_cpu.batch_norm_forward(x, y, 1e-5, kept)
    norm_cpu.normalize(x, mean, inv, g)
    dx_kept, dx_bottom = np.empty_like(x), np.empty_like(x)
    norm_cpu.batch_norm_backward(dy, mean, inv, dx_kept, x_norm=kept)
    norm_cpu.batch_norm_backward(dy, mean, inv, dx_bottom, x=x)
    z, zk, dz = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    norm_cpu.affine_forward(x, z, s, b, kept=zk)
    ds, db = norm_cpu.affine_backward(dy, x, s, dz, want_dscale=True, want_dbias=True)
    return [mean, var, y, kept, dx_kept, dx_bottom, z, zk, dz, ds, db, inv, g]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_numpy(shape, dtype):
    x, dy = _data(shape, dtype), _data(shape, dtype, seed=1, offset=0.0)
    s, b = _data(shape[1], dtype, seed=2, offset=0.0), _data(shape[1], dtype, seed=3)
    mean, var, y, kept, dx_kept, dx_bottom, z, zk, dz, ds, db, inv, g = _all_kernels(x, dy, s,
                                                                                      b)
    rmean, rvar, rinv, rxh, rdx = _bn_reference(x, dy)
    np.testing.assert_allclose(mean, rmean, **_tol(dtype))
    np.testing.assert_allclose(var, rvar, **_tol(dtype))
    np.testing.assert_allclose(inv, rinv, **_tol(dtype))
    np.testing.assert_allclose(y, rxh, **_tol(dtype))
    np.testing.assert_array_equal(kept, y)
    np.testing.assert_array_equal(g, y)  # the same arithmetic with given statistics
    np.testing.assert_allclose(dx_kept, rdx, **_tol(dtype))
    np.testing.assert_allclose(dx_bottom, rdx, **_tol(dtype))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    np.testing.assert_allclose(z, x64 * s[:, None] + b[:, None], **_tol(dtype))
    np.testing.assert_array_equal(zk, x)
    np.testing.assert_allclose(dz, dy64 * s[:, None], **_tol(dtype))
    np.testing.assert_allclose(ds, (dy64 * x64).sum(axis=(0, 2)), **_tol(dtype))
    np.testing.assert_allclose(db, dy64.sum(axis=(0, 2)), **_tol(dtype))


def test_variance_of_data_far_from_zero():
    """The shifted sums keep the variance of data with a large mean (float32 input)."""
    x = _data((4, 2, 100), np.float32, offset=1e4) * np.float32(1e-2) + np.float32(1e4)
    _, var, _ = norm_cpu.batch_norm_forward(x, np.empty_like(x), 1e-5)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 2)), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_kernels(dtype):
    """y = x, dx = dy: each kernel reads a value before it writes it."""
    shape = (3, 4, 10)
    x, dy = _data(shape, dtype), _data(shape, dtype, seed=1)
    s, b = _data(4, dtype, seed=2), _data(4, dtype, seed=3)
    want = _all_kernels(x, dy, s, b)
    y = x.copy()
    mean, _, inv = norm_cpu.batch_norm_forward(y, y, 1e-5)
    np.testing.assert_array_equal(y, want[2])
    y = x.copy()
    norm_cpu.normalize(y, mean, inv, y)
    np.testing.assert_array_equal(y, want[2])
    d = dy.copy()
    norm_cpu.batch_norm_backward(d, mean, inv, d, x_norm=want[3])
    np.testing.assert_array_equal(d, want[4])
    z = x.copy()
    norm_cpu.affine_forward(z, z, s, b)
    np.testing.assert_array_equal(z, want[6])
    d = dy.copy()
    ds, db = norm_cpu.affine_backward(d, x, s, d, want_dscale=True, want_dbias=True)
    np.testing.assert_array_equal(d, want[8])
    np.testing.assert_array_equal(ds, want[9])
    np.testing.assert_array_equal(db, want[10])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_give_the_same_bits(lanes, dtype):
    """Every per-channel sum is one lane's: 1 and 3 lanes agree exactly."""
    shape = (5, 7, 13)
    x, dy = _data(shape, dtype), _data(shape, dtype, seed=1)
    s, b = _data(7, dtype, seed=2), _data(7, dtype, seed=3)
    lanes(1)
    one = _all_kernels(x, dy, s, b)
    lanes(3)
    three = _all_kernels(x, dy, s, b)
    for i, (a, c) in enumerate(zip(one, three)):
        np.testing.assert_array_equal(a, c, err_msg=f"output {i}")


def test_channel_blocks(monkeypatch):
    """Blocks of one or two channels give the one-block result."""
    shape = (3, 5, 11)
    x, dy = _data(shape, np.float64), _data(shape, np.float64, seed=1)
    want = _all_kernels(x, dy, None, None)
    for block in (40, 70):  # 40 // 33 values: 1 channel; 70: 2 channels, the last alone
        monkeypatch.setattr(norm_cpu, "BLOCK", block)
        for i, (a, w) in enumerate(zip(_all_kernels(x, dy, None, None), want)):
            np.testing.assert_array_equal(a, w, err_msg=f"block {block}, output {i}")


def test_affine_without_scale_or_bias():
    x, dy = _data((2, 3, 4), np.float32), _data((2, 3, 4), np.float32, seed=1)
    s = _data(3, np.float32, seed=2)
    y = np.empty_like(x)
    norm_cpu.affine_forward(x, y, scale=s)
    np.testing.assert_array_equal(y, x * s[:, None])
    norm_cpu.affine_forward(x, y, bias=s)
    np.testing.assert_array_equal(y, x + s[:, None])
    dx = np.empty_like(x)
    ds, db = norm_cpu.affine_backward(dy, dx=dx, want_dbias=True)
    assert ds is None
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2)), rtol=1e-6)


@pytest.mark.parametrize("from_kept", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_in_place_checked(lanes, monkeypatch, dtype, from_kept):
    """Scale in place over x̂: done only where x holds x̂ (BatchNorm's copy, or its output
    recomputed from its bottom); a value changed anywhere leaves x as it was."""
    lanes(3)
    monkeypatch.setattr(norm_cpu, "BLOCK", 2 * 3 * 101)  # blocks of 2 channels
    bottom = _data((3, 7, 101), dtype)
    xhat = np.empty_like(bottom)
    mean, _, inv = norm_cpu.batch_norm_forward(bottom, xhat, 1e-5)
    s, b = _data(7, dtype, seed=2), _data(7, dtype, seed=3)
    source = ({"kept": xhat.copy()} if from_kept
              else {"bottom": bottom, "mean": mean, "inv_std": inv})
    want = np.empty_like(xhat)
    norm_cpu.affine_forward(xhat, want, s, b)
    x = xhat.copy()
    assert norm_cpu.affine_in_place_checked(x, s, b, **source)
    np.testing.assert_array_equal(x, want)
    for i in (0, 100, 101, 6 * 101 + 5, 1000, xhat.size - 1):  # lanes of 3, 2, 2 channels
        x = xhat.copy()
        x.reshape(-1)[i] = np.nextafter(x.reshape(-1)[i], np.inf)
        before = x.copy()
        assert not norm_cpu.affine_in_place_checked(x, s, b, **source), i
        np.testing.assert_array_equal(x, before, err_msg=str(i))


# -- the layers: one kept copy, shared; lanes ------------------------------------------------
NET = """
force_backward: true
layer { name: 'data' type: 'Input' top: 'data'
        input_param { shape { dim: 5 dim: 6 dim: 3 dim: 7 } } }
layer { name: 'conv' type: 'Convolution' bottom: 'data' top: 'c'
        convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: 'gaussian' } } }
layer { name: 'bn' type: 'BatchNorm' bottom: 'c' top: '%s' }
%s
layer { name: 'sc' type: 'Scale' bottom: '%s' top: '%s'
        scale_param { bias_term: true filler { type: 'gaussian' }
                      bias_filler { type: 'gaussian' } } }
layer { name: 'relu' type: 'ReLU' bottom: '%s' top: '%s' }
"""
# NOTE: a layer in between whose backward needs no data (a ReLU here would read Scale's output)
BETWEEN = """layer { name: 'mid' type: 'Power' bottom: '%s' top: '%s'
                   power_param { scale: 2 shift: 0.5 } }"""


def _net(names: str, between: bool = False, dtype: Any = np.float64) -> Net:
    """The net with BatchNorm's top, (Power's top,) Scale's top and ReLU's top named by
    ``names``: "cccc" runs all in place on the convolution's output, "bbbb" all but BatchNorm
    (DenseNet's prototxt), "wxyz" a blob per layer."""
    bn, mid, sc, relu = names
    text = NET % (bn, BETWEEN % (bn, mid) if between else "", mid if between else bn, sc, sc,
                  relu)
    return Net(text_format.Merge(text, caffe_pb2.NetParameter()), TRAIN, dtype=dtype, seed=5)


def _step(net: Net, out: str):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 6, 3, 7))
    net.forward(data=x)
    net.clear_param_diffs()
    net.backward(**{out: rng.standard_normal((5, 6, 3, 7))})
    grads = [np.array(p.diff) for name in ("conv", "sc") for p in net.params[name]]
    return np.array(net.blobs[out].data), np.array(net.blobs["data"].diff), grads


@pytest.mark.parametrize("between", [False, True])
@pytest.mark.parametrize("names", ["cccc", "bbbb"])
def test_in_place_chain_keeps_one_copy(names, between):
    """conv → BatchNorm → (Power) → Scale → ReLU, in place, match the chain with a blob per
    layer. Scale reads x̂ where BatchNorm keeps it: its copy in place, its bottom otherwise;
    it keeps a copy of its own only when a layer in between changed the blob."""
    inp, sep = _net(names, between), _net("wxyz", between)
    got, want = _step(inp, names[-1]), _step(sep, "z")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2], want[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    bn, sc = inp.layer_dict["bn"], inp.layer_dict["sc"]
    assert (bn._x_norm is not None) == (names == "cccc")
    assert (sc._kept is not None) == between
    if not between:
        assert sc._xhat.kept is bn._x_norm
        assert (sc._xhat.bottom is not None) == (names == "bbbb")
    # apart, BatchNorm keeps nothing (it recomputes x̂ from its bottom), nor does Scale
    assert sep.layer_dict["bn"]._x_norm is None and sep.layer_dict["sc"]._xhat is None


def test_in_place_chain_lanes_agree(lanes):
    lanes(1)
    one = _step(_net("cccc"), "c")
    lanes(3)
    three = _step(_net("cccc"), "c")
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])
    for a, b in zip(one[2], three[2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)  # conv's sums may split


@pytest.mark.parametrize("names,between,together", [("cccc", False, True),
                                                    ("cccc", True, False),
                                                    ("bbbb", False, False)])
def test_in_place_pair_takes_one_backward(monkeypatch, names, between, together):
    """BatchNorm → Scale in place on one blob, next to each other, take their gradient in one
    backward (Scale.backward_with; BatchNorm's own backward does not run, twice over), with
    the gradients of a blob per layer (float64 above; float32 here); with a layer in between,
    or BatchNorm on a top of its own, each runs its own backward."""
    from pycaffe_mpi.layer_types import normalization

    real, ran = normalization.BatchNorm.backward, []
    monkeypatch.setattr(normalization.BatchNorm, "backward",
                        lambda self, *a: (ran.append(self.name), real(self, *a)))
    net, sep = _net(names, between, np.float32), _net("wxyz", between, np.float32)
    assert bool(net.backward_pairs) == together and not sep.backward_pairs
    for _ in range(2):
        got = _step(net, names[-1])
    assert ran == ([] if together else ["bn", "bn"])
    want = _step(sep, "z")
    np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=1e-6)
    for a, b in zip(got[2], want[2]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_in_place_pair_apart_when_the_range_splits_it():
    """A backward that stops at the Scale leaves the blob's gradient at the Scale's bottom
    (dy·s), as Caffe; BatchNorm's backward then runs on its own."""
    net = _net("cccc")
    rng = np.random.default_rng(8)
    net.forward(data=rng.standard_normal((5, 6, 3, 7)))
    net.blobs["c"].diff[...] = dy = rng.standard_normal((5, 6, 3, 7))
    i = net.layer_names.index("sc")
    net.backward_from_to(i, i)
    s = net.params["sc"][0].data.reshape(1, 6, 1, 1)
    np.testing.assert_allclose(net.blobs["c"].diff, dy * s, rtol=1e-12)
