"""Layer cases for the convolution family: Convolution, Deconvolution, Im2col.

The references are deliberately naive loops over output (or input) positions, independent of the
im2col kernels, and take the hyper-parameters from the case itself, not from the layer object
(only the filled weights are read from ``layer.blobs``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

# -- Convolution ----------------------------------------------------------------------------------


def conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: Sequence[int],
                   pad: Sequence[int], dilation: Sequence[int], group: int = 1,
                   axis: int = 1) -> np.ndarray:
    """Direct convolution, zero padded:
    ``y[n, o, pos] = b[o] + Σ_{c, k} w[o, c, k] · x[n, g·Cg + c, pos·s − p + k·d]``."""
    lead, c_in, spatial = x.shape[:axis], x.shape[axis], x.shape[axis + 1:]
    x = x.reshape(math.prod(lead), c_in, *spatial)
    o_num, cg, *kernel = w.shape
    og = o_num // group
    out = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
           for s, k, st, p, d in zip(spatial, kernel, stride, pad, dilation)]
    xpad = np.pad(x, [(0, 0), (0, 0), *[(p, p) for p in pad]])
    y = np.zeros((x.shape[0], o_num, *out))
    for n in range(x.shape[0]):
        for o in range(o_num):
            g = o // og
            for pos in itertools.product(*(range(v) for v in out)):
                win = tuple(slice(q * st, q * st + d * (k - 1) + 1, d)
                            for q, st, d, k in zip(pos, stride, dilation, kernel))
                patch = xpad[(n, slice(g * cg, (g + 1) * cg), *win)]
                y[(n, o, *pos)] = np.sum(patch * w[o]) + (b[o] if b is not None else 0.0)
    return y.reshape(*lead, o_num, *out)


def _conv_case(cid: str, shape: Sequence[int], proto: str, stride: Sequence[int],
               pad: Sequence[int], dilation: Sequence[int], group: int = 1, axis: int = 1,
               bias: bool = True, nbottom: int = 1) -> None:
    fillers = ('weight_filler { type: "gaussian" std: 0.5 } '
               'bias_filler { type: "gaussian" std: 0.5 }')

    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        w = np.asarray(layer.blobs[0].data, np.float64)
        b = np.asarray(layer.blobs[1].data, np.float64) if bias else None
        return [conv_reference(x, w, b, stride, pad, dilation, group, axis) for x in bottoms]

    add_case(LayerCase(
        type="Convolution", id=cid,
        proto=f"convolution_param {{ {proto} {fillers} }}",
        bottoms=[tuple(shape)] * nbottom, ntop=nbottom, reference=reference,
        rtol=1e-7, atol=1e-9))


_conv_case("basic", (2, 3, 5, 5), "num_output: 2 kernel_size: 3", (1, 1), (0, 0), (1, 1))
_conv_case("stride2", (2, 3, 6, 5), "num_output: 2 kernel_size: 3 stride: 2",
           (2, 2), (0, 0), (1, 1))
_conv_case("pad1", (1, 3, 5, 5), "num_output: 2 kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1))
_conv_case("stride2_pad2", (1, 2, 6, 6), "num_output: 2 kernel_size: 3 stride: 2 pad: 2",
           (2, 2), (2, 2), (1, 1))
_conv_case("rect_hw", (2, 2, 5, 4),
           "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
           (2, 1), (1, 0), (1, 1))
_conv_case("rect_repeated", (1, 2, 5, 6),
           "num_output: 2 kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 pad: 0 pad: 1",
           (1, 2), (0, 1), (1, 1))
_conv_case("dilation2", (1, 2, 7, 7), "num_output: 2 kernel_size: 3 dilation: 2",
           (1, 1), (0, 0), (2, 2))
_conv_case("group2", (1, 4, 4, 4), "num_output: 4 kernel_size: 3 pad: 1 group: 2",
           (1, 1), (1, 1), (1, 1), group=2)
_conv_case("group3", (2, 3, 4, 4), "num_output: 3 kernel_size: 3 group: 3",
           (1, 1), (0, 0), (1, 1), group=3)
_conv_case("no_bias", (2, 3, 4, 4), "num_output: 2 kernel_size: 3 bias_term: false",
           (1, 1), (0, 0), (1, 1), bias=False)
_conv_case("1x1", (2, 4, 3, 3), "num_output: 3 kernel_size: 1", (1, 1), (0, 0), (1, 1))
_conv_case("1x1_group2_no_bias", (2, 4, 3, 3),
           "num_output: 2 kernel_size: 1 group: 2 bias_term: false", (1, 1), (0, 0), (1, 1),
           group=2, bias=False)
_conv_case("1x1_stride2", (2, 3, 5, 5), "num_output: 2 kernel_size: 1 stride: 2",
           (2, 2), (0, 0), (1, 1))
_conv_case("more_outputs", (1, 2, 4, 4), "num_output: 3 kernel_size: 3 pad: 1", (1, 1), (1, 1),
           (1, 1))
_conv_case("k1_pad1", (1, 3, 3, 3), "num_output: 2 kernel_size: 1 pad: 1", (1, 1), (1, 1), (1, 1))
_conv_case("k2_pad2_dil1", (1, 3, 3, 4), "num_output: 2 kernel_size: 2 pad: 2", (1, 1), (2, 2),
           (1, 1))
_conv_case("axis_default_explicit", (2, 3, 4, 4), "num_output: 2 kernel_size: 3 axis: 1",
           (1, 1), (0, 0), (1, 1))
_conv_case("axis2", (2, 2, 2, 4, 4), "num_output: 2 kernel_size: 3 axis: 2",
           (1, 1), (0, 0), (1, 1), axis=2)
_conv_case("3d", (1, 2, 3, 4, 4), "num_output: 2 kernel_size: 2 pad: 0 pad: 1 pad: 0",
           (1, 1, 1), (0, 1, 0), (1, 1, 1))
_conv_case("two_bottoms", (1, 2, 4, 4), "num_output: 2 kernel_size: 3 pad: 1",
           (1, 1), (1, 1), (1, 1), nbottom=2)
# 16+ channels, 3x3 / 5x5, stride 1, outputs of 8+ a side: on the host these run Winograd's
# F(4x4, r×r) (kernels/winograd.py), partial tiles at the right and bottom edges included
_conv_case("winograd_3x3", (2, 16, 9, 10), "num_output: 16 kernel_size: 3 pad: 1",
           (1, 1), (1, 1), (1, 1))
_conv_case("winograd_3x3_pad0_no_bias", (1, 17, 10, 13),
           "num_output: 16 kernel_size: 3 bias_term: false", (1, 1), (0, 0), (1, 1), bias=False)
_conv_case("winograd_5x5_pad2", (1, 16, 8, 9), "num_output: 18 kernel_size: 5 pad: 2",
           (1, 1), (2, 2), (1, 1))
_conv_case("winograd_5x5_pad1", (1, 16, 11, 10), "num_output: 16 kernel_size: 5 pad: 1",
           (1, 1), (1, 1), (1, 1))
# depthwise (group == channels): on the host these run kernels/depthwise.py, not im2col
_conv_case("dw_pad1", (2, 3, 5, 6), "num_output: 3 kernel_size: 3 pad: 1 group: 3",
           (1, 1), (1, 1), (1, 1), group=3)
_conv_case("dw_mult2_stride2", (2, 2, 7, 5),
           "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1),
           group=2)
_conv_case("dw_dilation2", (2, 3, 7, 8), "num_output: 3 kernel_size: 3 dilation: 2 pad: 2 group: 3",
           (1, 1), (2, 2), (2, 2), group=3)
_conv_case("dw_rect_stride3_no_bias", (3, 2, 8, 7),
           "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 0 pad_w: 1 "
           "group: 2 bias_term: false", (3, 2), (0, 1), (1, 1), group=2, bias=False)
_conv_case("dw_mult3_dil2_stride2", (2, 2, 9, 6),
           "num_output: 6 kernel_size: 2 stride: 2 dilation: 2 pad: 1 group: 2",
           (2, 2), (1, 1), (2, 2), group=2)
_conv_case("dw_two_bottoms", (2, 2, 4, 5), "num_output: 2 kernel_size: 3 pad: 1 group: 2",
           (1, 1), (1, 1), (1, 1), group=2, nbottom=2)
_conv_case("dw_3d", (1, 2, 3, 4, 4), "num_output: 2 kernel_size: 2 pad: 1 group: 2",
           (1, 1, 1), (1, 1, 1), (1, 1, 1), group=2)


# -- Deconvolution --------------------------------------------------------------------------------

def deconv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: Sequence[int],
                     pad: Sequence[int], dilation: Sequence[int], group: int = 1,
                     axis: int = 1) -> np.ndarray:
    """Scatter of every input value through its kernel, padded border cropped:
    ``y[n, g·Og + o, q·s − p + k·d] += x[n, c, q] · w[c, o, k]`` (``c`` in group ``g``)."""
    lead, c_in, spatial = x.shape[:axis], x.shape[axis], x.shape[axis + 1:]
    x = x.reshape(math.prod(lead), c_in, *spatial)
    _, og, *kernel = w.shape
    cg = c_in // group
    full = [st * (s - 1) + d * (k - 1) + 1
            for s, k, st, d in zip(spatial, kernel, stride, dilation)]
    ypad = np.zeros((x.shape[0], og * group, *full))
    for n, c in itertools.product(range(x.shape[0]), range(c_in)):
        g = c // cg
        for q in itertools.product(*(range(s) for s in spatial)):
            for k in itertools.product(*(range(v) for v in kernel)):
                at = tuple(qi * st + ki * d for qi, ki, st, d in zip(q, k, stride, dilation))
                for o in range(og):
                    ypad[(n, g * og + o, *at)] += x[(n, c, *q)] * w[(c, o, *k)]
    crop = tuple(slice(p, f - p) for p, f in zip(pad, full))
    y = ypad[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + b.reshape(-1, *[1] * len(spatial))
    return y.reshape(*lead, og * group, *y.shape[2:])


def _deconv_case(cid: str, shape: Sequence[int], proto: str, stride: Sequence[int],
                 pad: Sequence[int], dilation: Sequence[int], group: int = 1, axis: int = 1,
                 bias: bool = True, nbottom: int = 1) -> None:
    fillers = ('weight_filler { type: "gaussian" std: 0.5 } '
               'bias_filler { type: "gaussian" std: 0.5 }')

    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        w = np.asarray(layer.blobs[0].data, np.float64)
        b = np.asarray(layer.blobs[1].data, np.float64) if bias else None
        return [deconv_reference(x, w, b, stride, pad, dilation, group, axis) for x in bottoms]

    add_case(LayerCase(
        type="Deconvolution", id=cid,
        proto=f"convolution_param {{ {proto} {fillers} }}",
        bottoms=[tuple(shape)] * nbottom, ntop=nbottom, reference=reference,
        rtol=1e-7, atol=1e-9))


_deconv_case("basic", (2, 3, 3, 3), "num_output: 2 kernel_size: 3", (1, 1), (0, 0), (1, 1))
_deconv_case("stride2", (2, 2, 3, 4), "num_output: 3 kernel_size: 3 stride: 2",
             (2, 2), (0, 0), (1, 1))
_deconv_case("stride2_k4_pad1", (1, 2, 3, 3), "num_output: 2 kernel_size: 4 stride: 2 pad: 1",
             (2, 2), (1, 1), (1, 1))
_deconv_case("pad1", (2, 3, 4, 4), "num_output: 2 kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1))
_deconv_case("pad_big", (1, 2, 4, 4), "num_output: 2 kernel_size: 2 pad: 1", (1, 1), (1, 1),
             (1, 1))
_deconv_case("dilation2", (1, 2, 3, 4), "num_output: 2 kernel_size: 3 dilation: 2 pad: 1",
             (1, 1), (1, 1), (2, 2))
_deconv_case("dilation2_stride2", (1, 2, 3, 3),
             "num_output: 2 kernel_size: 2 dilation: 2 stride: 2", (2, 2), (0, 0), (2, 2))
_deconv_case("group2", (2, 4, 3, 3), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2",
             (2, 2), (1, 1), (1, 1), group=2)
_deconv_case("group2_s1", (1, 4, 4, 3), "num_output: 2 kernel_size: 3 group: 2",
             (1, 1), (0, 0), (1, 1), group=2)
_deconv_case("rect_hw", (2, 2, 3, 4),
             "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
             (2, 1), (1, 0), (1, 1))
_deconv_case("rect_repeated", (1, 2, 3, 4),
             "num_output: 2 kernel_size: 2 kernel_size: 3 stride: 2 stride: 1 pad: 0 pad: 1",
             (2, 1), (0, 1), (1, 1))
_deconv_case("no_bias", (2, 3, 3, 3), "num_output: 2 kernel_size: 2 stride: 2 bias_term: false",
             (2, 2), (0, 0), (1, 1), bias=False)
_deconv_case("1x1", (2, 3, 3, 3), "num_output: 4 kernel_size: 1", (1, 1), (0, 0), (1, 1))
_deconv_case("1x1_stride2", (1, 3, 3, 3), "num_output: 2 kernel_size: 1 stride: 2",
             (2, 2), (0, 0), (1, 1))
_deconv_case("many_outputs", (1, 2, 3, 3), "num_output: 5 kernel_size: 3 pad: 1",
             (1, 1), (1, 1), (1, 1))
# the Winograd plan read backwards (see the Convolution cases)
_deconv_case("winograd_3x3_pad1", (2, 16, 8, 9), "num_output: 16 kernel_size: 3 pad: 1",
             (1, 1), (1, 1), (1, 1))
_deconv_case("winograd_5x5", (1, 16, 8, 9), "num_output: 17 kernel_size: 5",
             (1, 1), (0, 0), (1, 1))
_deconv_case("axis2", (2, 2, 2, 3, 3), "num_output: 2 kernel_size: 2 stride: 2 axis: 2",
             (2, 2), (0, 0), (1, 1), axis=2)
_deconv_case("3d", (1, 2, 2, 3, 3), "num_output: 2 kernel_size: 2 stride: 2 pad: 0 pad: 1 pad: 0",
             (2, 2, 2), (0, 1, 0), (1, 1, 1))
_deconv_case("two_bottoms", (1, 2, 3, 3), "num_output: 2 kernel_size: 3 stride: 2",
             (2, 2), (0, 0), (1, 1), nbottom=2)


# -- Im2col ---------------------------------------------------------------------------------------

def im2col_reference(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int],
                     pad: Sequence[int], dilation: Sequence[int], axis: int = 1) -> np.ndarray:
    """``y[n, c·Πk + k, q] = x[n, c, q·s − p + k·d]``, zero outside the image."""
    lead, c_in, spatial = x.shape[:axis], x.shape[axis], x.shape[axis + 1:]
    x = x.reshape(math.prod(lead), c_in, *spatial)
    out = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
           for s, k, st, p, d in zip(spatial, kernel, stride, pad, dilation)]
    y = np.zeros((x.shape[0], c_in * math.prod(kernel), *out))
    for n, c in itertools.product(range(x.shape[0]), range(c_in)):
        for ki, k in enumerate(itertools.product(*(range(v) for v in kernel))):
            for q in itertools.product(*(range(v) for v in out)):
                at = tuple(qi * st - p + kk * d
                           for qi, kk, st, p, d in zip(q, k, stride, pad, dilation))
                if all(0 <= a < s for a, s in zip(at, spatial)):
                    y[(n, c * math.prod(kernel) + ki, *q)] = x[(n, c, *at)]
    return y.reshape(*lead, *y.shape[1:])


def _im2col_case(cid: str, shape: Sequence[int], proto: str, kernel: Sequence[int],
                 stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int],
                 axis: int = 1) -> None:
    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        return [im2col_reference(bottoms[0], kernel, stride, pad, dilation, axis)]

    add_case(LayerCase(type="Im2col", id=cid, proto=f"convolution_param {{ {proto} }}",
                       bottoms=[tuple(shape)], reference=reference, rtol=0, atol=0))


_im2col_case("basic", (2, 3, 4, 5), "kernel_size: 3", (3, 3), (1, 1), (0, 0), (1, 1))
_im2col_case("stride2_pad1", (2, 2, 5, 5), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2),
             (1, 1), (1, 1))
_im2col_case("rect_hw", (1, 2, 5, 4),
             "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
             (2, 3), (1, 2), (1, 0), (1, 1))
_im2col_case("dilation2", (1, 2, 6, 6), "kernel_size: 2 dilation: 2 pad: 1", (2, 2), (1, 1),
             (1, 1), (2, 2))
_im2col_case("num_output_ignored", (2, 2, 3, 3), "num_output: 7 kernel_size: 2",
             (2, 2), (1, 1), (0, 0), (1, 1))
_im2col_case("axis2_3d", (2, 2, 2, 3, 4), "kernel_size: 2 axis: 2", (2, 2), (1, 1), (0, 0),
             (1, 1), axis=2)
_im2col_case("3d", (1, 2, 3, 3, 4), "kernel_size: 2 stride: 1 stride: 1 stride: 2 pad: 1",
             (2, 2, 2), (1, 1, 2), (1, 1, 1), (1, 1, 1))
