"""Caffe's own known-value checks for the vision layers (test_pooling_layer.cpp,
test_convolution_layer.cpp; bvlc-caffe.md §10.3 items 1–6), in float32."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import errors, registry
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing.cases.conv import conv_reference

F32 = np.float32

MAGIC6 = np.array([[35, 1, 6, 26, 19, 24],
                   [3, 32, 7, 21, 23, 25],
                   [31, 9, 2, 22, 27, 20],
                   [8, 28, 33, 17, 10, 15],
                   [30, 5, 34, 12, 14, 16],
                   [4, 36, 29, 13, 18, 11]], dtype=F32)


def make(type_name, proto, bottoms, ntop=1, blobs=None):
    """Build, set up, reshape and run a layer forward in float32; return (layer, bottoms, tops)."""
    p = caffe_pb2.LayerParameter(name="under_test", type=type_name)
    text_format.Merge(proto, p)
    layer = registry.layer_class(type_name)(p, dtype=F32, rng=np.random.default_rng(1701))
    for arr in blobs or []:
        b = Blob(arr.shape, F32)
        b.data[...] = arr
        layer.blobs.append(b)
    bb = []
    for a in bottoms:
        b = Blob(a.shape, F32)
        b.data[...] = a
        bb.append(b)
    tb = [Blob((), F32) for _ in range(ntop)]
    layer.check_counts(len(bb), len(tb))
    layer.setup(bb, tb)
    layer.reshape(bb, tb)
    layer.forward(bb, tb)
    return layer, bb, tb


def tiled(channel, num=2, channels=2):
    """Caffe's pooling tests put the same image in every (num, channel)."""
    return np.broadcast_to(np.asarray(channel, F32), (num, channels, *np.shape(channel))).copy()


def assert_every_channel(top, want):
    want = np.asarray(want, F32)
    for n in range(top.shape[0]):
        for c in range(top.shape[1]):
            np.testing.assert_allclose(top.data[n, c], want, rtol=0, atol=1e-5)


# -- 1. MAX 2×2 stride 1 on a 3×5 image (TestForwardSquare) ----------------------------------------

def test_max_pool_square_values_and_mask():
    x = tiled([[1, 2, 5, 2, 3], [9, 4, 1, 4, 8], [1, 2, 5, 2, 3]])
    _, _, (top, mask) = make("Pooling", "pooling_param { pool: MAX kernel_size: 2 }", [x], ntop=2)
    assert top.shape == (2, 2, 2, 4) and mask.shape == (2, 2, 2, 4)
    assert top.data.dtype == F32
    assert_every_channel(top, [[9, 5, 5, 8], [9, 5, 5, 8]])
    assert_every_channel(mask, [[5, 2, 2, 9], [5, 12, 12, 9]])


# -- 2. MAX on magic(6) with kernel 3×2 and 2×3 (TestForwardRectHigh / RectWide) ------------------

def test_max_pool_rect_high_magic6():
    _, _, (top, mask) = make("Pooling", "pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 }",
                             [tiled(MAGIC6)], ntop=2)
    assert top.shape == (2, 2, 4, 5)
    assert_every_channel(top, [[35, 32, 26, 27, 27], [32, 33, 33, 27, 27],
                               [31, 34, 34, 27, 27], [36, 36, 34, 18, 18]])
    assert_every_channel(mask, [[0, 7, 3, 16, 16], [7, 20, 20, 16, 16],
                                [12, 26, 26, 16, 16], [31, 31, 26, 34, 34]])


def test_max_pool_rect_wide_magic6():
    _, _, (top, mask) = make("Pooling", "pooling_param { pool: MAX kernel_h: 2 kernel_w: 3 }",
                             [tiled(MAGIC6)], ntop=2)
    assert top.shape == (2, 2, 5, 4)
    assert_every_channel(top, [[35, 32, 26, 26], [32, 32, 27, 27], [33, 33, 33, 27],
                               [34, 34, 34, 17], [36, 36, 34, 18]])
    one_based = np.array([[1, 8, 4, 4], [8, 8, 17, 17], [21, 21, 21, 17],
                          [27, 27, 27, 22], [32, 32, 27, 35]])
    assert_every_channel(mask, one_based - 1)


# -- 3. padded MAX k3 s2 p2 (TestForwardMaxPadded) -------------------------------------------------

def test_max_pool_padded():
    x = np.array([[[[1, 2, 4], [2, 3, 2], [4, 2, 1]]]], F32)
    _, _, (top,) = make("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 }",
                        [x])
    assert top.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(top.data[0, 0], [[1, 4, 4], [4, 4, 4], [4, 4, 1]], atol=1e-5)


# -- 4. AVE k3 s1 p1 on a 3×3 of 2s: padded cells count in the divisor (TestForwardAve) -----------

def test_ave_pool_padded_divisor():
    x = np.full((1, 1, 3, 3), 2.0, F32)
    _, _, (top,) = make("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }",
                        [x])
    assert top.shape == (1, 1, 3, 3)
    e, f = 8.0 / 9, 4.0 / 3
    np.testing.assert_allclose(top.data[0, 0], [[e, f, e], [f, 2, f], [e, f, e]], atol=1e-5)


# -- 5. pooling output shapes on 2×3×6×5 (TestSetup, TestSetupPadded, TestSetupGlobalPooling) -----

@pytest.mark.parametrize(("proto", "hw"), [
    ("pool: MAX kernel_size: 3 stride: 2", (3, 2)),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (4, 3)),
    ("pool: MAX global_pooling: true", (1, 1)),
    ("pool: AVE global_pooling: true", (1, 1)),
])
def test_pool_shapes(proto, hw):
    x = np.random.default_rng(1701).standard_normal((2, 3, 6, 5)).astype(F32)
    _, _, (top,) = make("Pooling", f"pooling_param {{ {proto} }}", [x])
    assert top.shape == (2, 3, *hw)


# -- 6. convolution shapes, values and the Sobel separability check -------------------------------

CONV_FILLERS = ('weight_filler { type: "gaussian" std: 1 } '
                'bias_filler { type: "constant" value: 0.1 }')


def test_conv_shapes_and_values_two_bottoms():
    rng = np.random.default_rng(1701)
    xs = [rng.standard_normal((2, 3, 6, 4)).astype(F32) for _ in range(2)]
    layer, _, tops = make("Convolution", "convolution_param { num_output: 4 kernel_size: 3 "
                          f"stride: 2 {CONV_FILLERS} }}", xs, ntop=2)
    w, b = np.asarray(layer.blobs[0].data, np.float64), np.asarray(layer.blobs[1].data, np.float64)
    assert w.shape == (4, 3, 3, 3) and b.shape == (4,)
    for x, t in zip(xs, tops):
        assert t.shape == (2, 4, 2, 1) and t.data.dtype == F32
        want = conv_reference(x.astype(np.float64), w, b, (2, 2), (0, 0), (1, 1))
        np.testing.assert_allclose(t.data, want, rtol=1e-4, atol=1e-4)


def test_conv_group_shape_and_values():
    x = np.random.default_rng(1701).standard_normal((2, 3, 6, 4)).astype(F32)
    layer, _, (top,) = make("Convolution", "convolution_param { num_output: 3 kernel_size: 3 "
                            f"stride: 2 group: 3 {CONV_FILLERS} }}", [x])
    assert layer.blobs[0].shape == (3, 1, 3, 3)
    assert top.shape == (2, 3, 2, 1)
    w, b = np.asarray(layer.blobs[0].data, np.float64), np.asarray(layer.blobs[1].data, np.float64)
    want = conv_reference(x.astype(np.float64), w, b, (2, 2), (0, 0), (1, 1), group=3)
    np.testing.assert_allclose(top.data, want, rtol=1e-4, atol=1e-4)


def test_sobel_equals_separable_filters():
    x = np.random.default_rng(1701).standard_normal((2, 3, 6, 4)).astype(F32)
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], F32)
    _, _, (full,) = make("Convolution", "convolution_param { num_output: 1 bias_term: false "
                         "kernel_size: 3 stride: 2 }", [x],
                         blobs=[np.broadcast_to(sobel, (1, 3, 3, 3)).copy()])
    col = np.broadcast_to(np.array([1, 2, 1], F32).reshape(3, 1), (1, 3, 3, 1)).copy()
    _, _, (mid,) = make("Convolution", "convolution_param { num_output: 1 bias_term: false "
                        "kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 }", [x], blobs=[col])
    row = np.array([-1, 0, 1], F32).reshape(1, 1, 1, 3)
    _, _, (sep,) = make("Convolution", "convolution_param { num_output: 1 bias_term: false "
                        "kernel_h: 1 kernel_w: 3 stride_h: 1 stride_w: 2 }", [mid.data.copy()],
                        blobs=[row])
    assert full.shape == sep.shape == (2, 1, 2, 1)
    np.testing.assert_allclose(full.data, sep.data, rtol=1e-4, atol=1e-4)


# -- user mistakes give clear errors ---------------------------------------------------------------

@pytest.mark.parametrize(("type_name", "proto", "match"), [
    ("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 3 pad: 1 }", "only for MAX and AVE"),
    ("Pooling", "pooling_param { kernel_size: 2 kernel_h: 2 kernel_w: 2 }", "not both"),
    ("Pooling", "pooling_param { global_pooling: true kernel_size: 2 }", "global_pooling"),
    ("Pooling", "pooling_param { kernel_size: 2 pad: 2 }", "smaller than the kernel"),
    ("LRN", "lrn_param { local_size: 4 }", "odd"),
    ("Convolution", "convolution_param { num_output: 2 kernel_size: 3 group: 2 }", "group"),
    ("Convolution", "convolution_param { num_output: 2 }", "kernel_size"),
    ("Convolution", "convolution_param { num_output: 2 kernel_size: 9 }", "smaller than"),
])
def test_clear_errors(type_name, proto, match):
    x = np.zeros((1, 3, 5, 5), F32)
    with pytest.raises(errors.NetError, match=match):
        make(type_name, proto, [x])


def test_pretrained_weight_shape_mismatch_is_a_clear_error():
    x = np.zeros((1, 3, 5, 5), F32)
    with pytest.raises(errors.NetError, match="rename it"):
        make("Convolution", "convolution_param { num_output: 2 kernel_size: 3 bias_term: false }",
             [x], blobs=[np.zeros((2, 3, 5, 5), F32)])
