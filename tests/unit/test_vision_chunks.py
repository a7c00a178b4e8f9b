"""Convolution and pooling over several cache-sized chunks, and MAX pooling ties.

The layer cases are too small to span more than one chunk, so these tests shrink the chunk
sizes and compare against the naive references and against one-chunk runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi.kernels import im2col as im2col_kernels
from pycaffe_mpi.kernels import pooling as pooling_kernels
from pycaffe_mpi.testing.cases import conv as conv_cases
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


@pytest.mark.parametrize("chunk", [1 << 18, 7])
def test_max_pool_ties_go_to_the_first_maximum(monkeypatch, chunk):
    monkeypatch.setattr(pooling_kernels, "CHUNK_ELEMENTS", chunk)
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
