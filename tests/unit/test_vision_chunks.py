"""Convolution, Deconvolution and pooling over several cache-sized chunks, MAX pooling ties,
and the convolution family's contracts the generic layer suite does not see (Deconvolution as
Convolution's adjoint, Caffe's weight shapes, Crop's second bottom, SPP's size limit).

The layer cases are too small to span more than one chunk, so these tests shrink the chunk
sizes and compare against the naive references and against one-chunk runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi.kernels import conv_plan as im2col_kernels
from pycaffe_mpi.kernels import pooling as pooling_kernels
from pycaffe_mpi.testing.cases import conv as conv_cases
from pycaffe_mpi.testing.cases import vision as vision_cases
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer


def _run(case: LayerCase, x: np.ndarray, dy_seed: int = 3):
    layer, bb, tb = build_layer(case, [x])
    layer.forward(bb, tb)
    rng = np.random.default_rng(dy_seed)
    for t in tb:
        t.diff[...] = rng.standard_normal(t.shape)
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward(tb, [True], bb)
    return ([np.array(t.data) for t in tb], np.array(bb[0].diff),
            [np.array(p.diff) for p in layer.blobs], [np.array(p.data) for p in layer.blobs])


@pytest.mark.parametrize("proto", [
    "convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: 'gaussian' } "
    "bias_filler { type: 'gaussian' } }",
    "convolution_param { num_output: 3 kernel_size: 3 stride: 2 weight_filler { type: 'gaussian' }"
    " }",
    "convolution_param { num_output: 4 kernel_size: 5 pad: 2 group: 2 "
    "weight_filler { type: 'gaussian' } }",
    # one channel per group: the image-major channels-first layout
    "convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 group: 4 "
    "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
    "convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 4 "
    "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
])
def test_conv_in_small_chunks_equals_one_chunk_and_reference(monkeypatch, proto):
    x = np.random.default_rng(0).standard_normal((7, 4, 9, 8))
    case = LayerCase("Convolution", "chunks", proto, bottoms=[x.shape])
    whole = _run(case, x)
    monkeypatch.setattr(im2col_kernels, "CHUNK_BYTES", 1)  # one image per chunk
    chunked = _run(case, x)
    monkeypatch.setattr(im2col_kernels, "CHUNK_BYTES", 3 * 8 * 4 * 9 * 8 * 25)  # a few images
    some = _run(case, x)
    for got in (chunked, some):
        for a, b in zip(got[0] + [got[1]] + got[2], whole[0] + [whole[1]] + whole[2]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    p = build_layer(case, [x])[0].layer_param.convolution_param
    w, bias = whole[3][0], (whole[3][1] if len(whole[3]) > 1 else None)
    stride = [p.stride[0]] * 2 if len(p.stride) else [1, 1]
    pad = [p.pad[0]] * 2 if len(p.pad) else [0, 0]
    want = conv_cases.conv_reference(x, w, bias, stride, pad, [1, 1], p.group or 1)
    np.testing.assert_allclose(whole[0][0], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("proto, shape", [
    # 28x28 outputs with runs that would pick channels-last: channels-first by size
    ("convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: 'gaussian' }"
     " bias_filler { type: 'gaussian' } }", (3, 10, 28, 28)),
    # a strided 1x1 kernel: channels-first
    ("convolution_param { num_output: 5 kernel_size: 1 stride: 2 weight_filler { type: "
     "'gaussian' } }", (3, 6, 9, 7)),
])
def test_channels_first_by_size_and_kernel_equals_channels_last(monkeypatch, proto, shape):
    x = np.random.default_rng(2).standard_normal(shape)
    case = LayerCase("Convolution", "layout", proto, bottoms=[x.shape])
    layer = build_layer(case, [x])[0]
    assert not layer.plan.channels_last
    first = _run(case, x)
    real_reshape, forced = im2col_kernels.ConvPlan.reshape, []

    def channels_last(self, num, spatial):
        real_reshape(self, num, spatial)
        self.channels_last, self.per_image = True, False
        forced.append(num)

    monkeypatch.setattr(im2col_kernels.ConvPlan, "reshape", channels_last)
    last = _run(case, x)
    assert forced
    for a, b in zip(first[0] + [first[1]] + first[2], last[0] + [last[1]] + last[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    p = layer.layer_param.convolution_param
    w, bias = first[3][0], (first[3][1] if len(first[3]) > 1 else None)
    stride = [p.stride[0]] * 2 if len(p.stride) else [1, 1]
    pad = [p.pad[0]] * 2 if len(p.pad) else [0, 0]
    want = conv_cases.conv_reference(x, w, bias, stride, pad, [1, 1])
    np.testing.assert_allclose(first[0][0], want, rtol=1e-10, atol=1e-10)


def _naive_max_pool(x, k, s):
    n, c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    y = np.full((n, c, oh, ow), -np.inf)
    mask = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            for a in range(i * s, min(i * s + k, h)):
                for b in range(j * s, min(j * s + k, w)):
                    v = x[:, :, a, b]
                    better = v > y[:, :, i, j]  # strict: the first maximum wins ties
                    y[:, :, i, j] = np.where(better, v, y[:, :, i, j])
                    mask[:, :, i, j] = np.where(better, a * w + b, mask[:, :, i, j])
    return y, mask


def test_max_pool_ties_go_to_the_first_maximum():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(3, 2, 11, 10)).astype(np.float64)  # many ties
    case = LayerCase("Pooling", "ties", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }",
                     bottoms=[x.shape], ntop=2)
    tops, dx, _, _ = _run(case, x)
    want_y, want_mask = _naive_max_pool(x, 3, 2)
    np.testing.assert_array_equal(tops[0], want_y)
    np.testing.assert_array_equal(tops[1], want_mask)
    dy = np.random.default_rng(3).standard_normal(want_y.shape)
    want_dx = np.zeros_like(x).reshape(3, 2, -1)
    idx = want_mask.reshape(3, 2, -1).astype(int)
    for n in range(3):
        for c in range(2):
            np.add.at(want_dx[n, c], idx[n, c], dy.reshape(3, 2, -1)[n, c])
    np.testing.assert_allclose(dx, want_dx.reshape(x.shape), rtol=1e-12)


@pytest.mark.parametrize("proto", [
    "convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 "
    "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
    "convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: 'gaussian' } }",
])
def test_deconv_in_small_chunks_equals_one_chunk_and_reference(monkeypatch, proto):
    x = np.random.default_rng(0).standard_normal((7, 4, 5, 4))
    case = LayerCase("Deconvolution", "chunks", proto, bottoms=[x.shape])
    whole = _run(case, x)
    monkeypatch.setattr(im2col_kernels, "CHUNK_BYTES", 1)
    chunked = _run(case, x)
    for a, b in zip(chunked[0] + [chunked[1]] + chunked[2], whole[0] + [whole[1]] + whole[2]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    p = build_layer(case, [x])[0].layer_param.convolution_param
    w, bias = whole[3][0], (whole[3][1] if len(whole[3]) > 1 else None)
    s, q = (p.stride[0] if len(p.stride) else 1), (p.pad[0] if len(p.pad) else 0)
    want = conv_cases.deconv_reference(x, w, bias, (s, s), (q, q), (1, 1), p.group or 1)
    np.testing.assert_allclose(whole[0][0], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", [
    "kernel_size: 3 stride: 2 pad: 1 group: 2", "kernel_size: 3", "kernel_size: 2 dilation: 2",
    "kernel_size: 1 stride: 2", "kernel_size: 1",
])
def test_deconv_is_the_adjoint_of_conv_with_the_same_weights(geometry):
    """<conv(x), z> = <x, deconv(z)> with one weight blob: Caffe's (C_in, O/group, *k) for the
    Deconvolution is the (O', C'/group, *k) of the Convolution from its top to its bottom."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 7, 5))  # no trailing rows/columns that a stride skips
    conv_case = LayerCase("Convolution", "c", "convolution_param { num_output: 6 bias_term: false "
                          f"{geometry} weight_filler {{ type: 'gaussian' }} }}", bottoms=[x.shape])
    conv, cb, ct = build_layer(conv_case, [x])
    conv.forward(cb, ct)
    z = rng.standard_normal(ct[0].shape)
    de_case = LayerCase("Deconvolution", "d", "convolution_param { num_output: 4 bias_term: false "
                        f"{geometry} }}", bottoms=[z.shape])
    de, db, dt = build_layer(de_case, [z])
    assert de.blobs[0].shape == conv.blobs[0].shape == (6, 4 // de.group, *conv.geom.kernel)
    de.blobs[0].data[...] = conv.blobs[0].data
    de.forward(db, dt)
    assert dt[0].shape == x.shape
    np.testing.assert_allclose(np.sum(ct[0].data * z), np.sum(x * dt[0].data), rtol=1e-10)


def test_im2col_top_times_weights_is_the_convolution():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 5))
    geometry = "kernel_size: 3 stride: 2 pad: 1 dilation: 1"
    case = LayerCase("Im2col", "i", f"convolution_param {{ {geometry} }}", bottoms=[x.shape])
    layer, bb, tb = build_layer(case, [x])
    layer.forward(bb, tb)
    w = rng.standard_normal((4, 3, 3, 3))
    got = np.einsum("ok,nkhw->nohw", w.reshape(4, -1), tb[0].data)
    want = conv_cases.conv_reference(x, w, None, (2, 2), (1, 1), (1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_crop_second_bottom_takes_no_gradient():
    rng = np.random.default_rng(0)
    x, like = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((2, 3, 3, 4))
    case = LayerCase("Crop", "c", "crop_param { offset: 1 }", bottoms=[x.shape, like.shape])
    layer, bb, tb = build_layer(case, [x, like])
    layer.forward(bb, tb)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    tb[0].diff[...] = rng.standard_normal(tb[0].shape)
    bb[1].diff[...] = np.nan
    layer.backward(tb, [True, False], bb)
    assert np.isnan(bb[1].diff).all()
    layer.backward(tb, [True, True], bb)
    np.testing.assert_array_equal(bb[1].diff, 0)
    want = np.zeros_like(x)
    want[:, :, 1:4, 1:5] = tb[0].diff
    np.testing.assert_array_equal(bb[0].diff, want)


@pytest.mark.parametrize(("type_name", "proto", "shapes", "match"), [
    ("SPP", "spp_param { pyramid_height: 3 }", [(1, 2, 5, 8)], "too small"),
    ("SPP", "spp_param { pyramid_height: 2 pool: STOCHASTIC }", [(1, 2, 5, 4)], "cannot pad"),
    ("SPP", "spp_param { }", [(1, 2, 4, 4)], "pyramid_height"),
    ("Crop", "crop_param { offset: 3 }", [(1, 2, 5, 5), (1, 2, 3, 3)], "out of bounds"),
    ("Crop", "crop_param { axis: 1 offset: 1 offset: 1 }", [(1, 2, 5, 5), (1, 1, 3, 3)],
     "one per axis"),
    ("Deconvolution", "convolution_param { num_output: 3 kernel_size: 2 group: 2 }",
     [(1, 4, 3, 3)], "multiple of group"),
    ("Deconvolution", "convolution_param { num_output: 2 kernel_size: 1 pad: 1 }",
     [(1, 2, 2, 2)], "not positive"),
    ("Im2col", "convolution_param { kernel_size: 4 }", [(1, 2, 3, 3)], "smaller than"),
])
def test_clear_errors(type_name, proto, shapes, match):
    case = LayerCase(type_name, "e", proto, bottoms=shapes)
    with pytest.raises(errors.NetError, match=match):
        build_layer(case, [np.zeros(s) for s in shapes])


def test_deconv_bilinear_upsampling_as_in_caffe_docs():
    """Caffe's BilinearFiller example: factor-2 upsampling per channel (group = C) keeps a
    constant image constant away from the border."""
    x = np.ones((1, 3, 4, 5))
    case = LayerCase("Deconvolution", "up", "convolution_param { num_output: 3 group: 3 "
                     "kernel_size: 4 stride: 2 pad: 1 bias_term: false "
                     "weight_filler { type: 'bilinear' } }", bottoms=[x.shape])
    layer, bb, tb = build_layer(case, [x])
    layer.forward(bb, tb)
    assert layer.blobs[0].shape == (3, 1, 4, 4)
    assert tb[0].shape == (1, 3, 8, 10)
    np.testing.assert_allclose(tb[0].data[:, :, 1:-1, 1:-1], 1.0, rtol=1e-12)


@pytest.mark.parametrize(("num_output", "group"), [(4, 1), (3, 3)])
def test_deconv_caffe_setup_and_simple_values(num_output, group):
    """Caffe's test_deconvolution_layer.cpp: two (2, 3, 6, 4) bottoms of ones, kernel 3,
    stride 2, weights 1 and bias 0.1: (2, O, 13, 9) tops of 3.1, 6.1 where two windows overlap
    along one axis and 12.1 along both (Caffe checks the values for group 1 only)."""
    x = np.ones((2, 3, 6, 4))
    case = LayerCase("Deconvolution", "simple", "convolution_param { kernel_size: 3 stride: 2 "
                     f"num_output: {num_output} group: {group} "
                     "weight_filler { type: 'constant' value: 1 } "
                     "bias_filler { type: 'constant' value: 0.1 } }",
                     bottoms=[x.shape, x.shape], ntop=2)
    layer, bb, tb = build_layer(case, [x, x])
    layer.forward(bb, tb)
    h_over = np.array([h % 2 == 0 and 0 < h < 12 for h in range(13)])
    w_over = np.array([w % 2 == 0 and 0 < w < 8 for w in range(9)])
    fan = 3 // group  # input channels feeding each output
    want = 0.1 + fan * (1 + h_over[:, None]) * (1 + w_over[None, :])
    for t in tb:
        assert t.shape == (2, num_output, 13, 9)
        np.testing.assert_allclose(t.data, np.broadcast_to(want, t.shape), atol=1e-7)  # f32 0.1


@pytest.mark.parametrize(("shape", "height", "width"), [
    ((2, 3, 9, 8), 3, 63), ((4, 3, 1024, 765), 5, 1023), ((10, 3, 7, 7), 3, 63),
])
def test_spp_caffe_output_dims(shape, height, width):
    """Caffe's test_spp_layer.cpp setups: C·(4^L − 1)/3 values per image."""
    case = LayerCase("SPP", "dims", f"spp_param {{ pyramid_height: {height} }}", bottoms=[shape])
    _, _, tb = build_layer(case, [np.zeros(shape, np.float32)], np.float32)
    assert tb[0].shape == (shape[0], width)


@pytest.mark.parametrize(("proto", "kernel", "stride", "pad"), [
    ("kernel_size: 3 stride: 3 pad: 1", (3, 3), (3, 3), (1, 1)),
    ("kernel_size: 17 stride: 2 pad: 4", (17, 17), (2, 2), (4, 4)),  # offsets past uint8
])
@pytest.mark.parametrize("chunk", [1 << 15, 1])
def test_max_pool_over_chunks_of_planes_equals_reference(monkeypatch, proto, kernel, stride, pad,
                                                         chunk):
    monkeypatch.setattr(pooling_kernels, "MAX_CHUNK_ELEMENTS", chunk)  # 1: one plane per chunk
    x = np.random.default_rng(2).standard_normal((2, 3, 19, 21))
    case = LayerCase("Pooling", "chunks", f"pooling_param {{ pool: MAX {proto} }}",
                     bottoms=[x.shape], ntop=2)
    tops, dx, _, _ = _run(case, x)
    want = vision_cases.pool_reference(x, kernel, stride, pad, "MAX", True, True)
    np.testing.assert_array_equal(tops[0], want[0])
    np.testing.assert_array_equal(tops[1], want[1])
    dy = np.random.default_rng(3).standard_normal(want[0].shape)
    want_dx = np.zeros((6, 19 * 21))
    np.add.at(want_dx, (np.arange(6)[:, None], want[1].reshape(6, -1).astype(int)),
              dy.reshape(6, -1))
    np.testing.assert_allclose(dx, want_dx.reshape(x.shape), rtol=1e-12)
