"""Layer cases for the vision family: Convolution, Pooling, LRN.

The references are deliberately naive loops over output positions (Caffe's CPU loops for pooling),
independent of the vectorised kernels, and take the layer hyper-parameters from the case itself,
not from the layer object (only the filled weights are read from ``layer.blobs``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

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


# -- Pooling --------------------------------------------------------------------------------------

def _pooled(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    n = (math.ceil((size + 2 * p - k) / s) if ceil_mode else (size + 2 * p - k) // s) + 1
    if p > 0 and (n - 1) * s >= size + p:
        n -= 1
    return n


def pool_reference(x: np.ndarray, kernel: Sequence[int] | None, stride: Sequence[int],
                   pad: Sequence[int], pool: str, ceil_mode: bool = True,
                   mask: bool = False) -> list[np.ndarray]:
    """Caffe's CPU pooling loops; ``kernel=None`` means global pooling."""
    n_num, c_num, h, w = x.shape
    kh, kw = kernel if kernel is not None else (h, w)
    (sh, sw), (ph, pw) = stride, pad
    oh, ow = _pooled(h, kh, sh, ph, ceil_mode), _pooled(w, kw, sw, pw, ceil_mode)
    y, idx = np.zeros((n_num, c_num, oh, ow)), np.full((n_num, c_num, oh, ow), -1.0)
    for n, c, i, j in itertools.product(range(n_num), range(c_num), range(oh), range(ow)):
        hs, ws = i * sh - ph, j * sw - pw
        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
        area = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
        if pool == "AVE":
            y[n, c, i, j] = x[n, c, hs:he, ws:we].sum() / area
            continue
        best = -np.inf
        for a in range(hs, he):
            for b in range(ws, we):
                if x[n, c, a, b] > best:
                    best, idx[n, c, i, j] = x[n, c, a, b], a * w + b
        y[n, c, i, j] = best
    return [y, idx] if mask else [y]


def permuted(shape: Sequence[int], spacing: float = 0.1) -> Callable[[np.random.Generator],
                                                                     np.ndarray]:
    """Bottoms without ties: a random permutation of well-separated values (MAX kinks)."""
    size = math.prod(shape)
    return lambda rng: (rng.permutation(size).reshape(tuple(shape)) - size / 2) * spacing


def _pool_case(cid: str, shape: Sequence[int], proto: str, kernel: Sequence[int] | None,
               stride: Sequence[int] = (1, 1), pad: Sequence[int] = (0, 0), pool: str = "MAX",
               ceil_mode: bool = True, ntop: int = 1) -> None:
    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        return pool_reference(bottoms[0], kernel, stride, pad, pool, ceil_mode, ntop == 2)

    grown = (shape[0] + 1, *shape[1:-1], shape[-1] + 1)
    is_max = pool == "MAX"
    add_case(LayerCase(
        type="Pooling", id=cid, proto=f"pooling_param {{ pool: {pool} {proto} }}",
        bottoms=[permuted(shape) if is_max else tuple(shape)], ntop=ntop,
        reference=reference, reshape=[permuted(grown) if is_max else grown],
        stepsize=1e-3 if is_max else 1e-4))


_pool_case("max", (2, 2, 6, 6), "kernel_size: 3 stride: 2", (3, 3), (2, 2))
_pool_case("max_mask", (2, 2, 6, 6), "kernel_size: 3 stride: 2", (3, 3), (2, 2), ntop=2)
_pool_case("max_overlap_s1", (1, 2, 5, 5), "kernel_size: 3", (3, 3), (1, 1))
_pool_case("max_pad", (1, 2, 5, 5), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1))
_pool_case("max_pad_mask", (1, 2, 4, 5), "kernel_size: 3 stride: 2 pad: 2", (3, 3), (2, 2),
           (2, 2), ntop=2)
_pool_case("max_2x2_s2", (2, 2, 4, 6), "kernel_size: 2 stride: 2", (2, 2), (2, 2))
_pool_case("ave", (2, 2, 6, 6), "kernel_size: 3 stride: 2", (3, 3), (2, 2), pool="AVE")
_pool_case("ave_pad", (1, 2, 5, 5), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1),
           pool="AVE")
_pool_case("ave_pad_s1", (2, 2, 3, 4), "kernel_size: 3 pad: 1", (3, 3), (1, 1), (1, 1),
           pool="AVE")
_pool_case("max_global", (2, 3, 4, 4), "global_pooling: true", None, ntop=2)
_pool_case("ave_global", (2, 3, 4, 5), "global_pooling: true", None, pool="AVE")
_pool_case("max_floor", (2, 2, 6, 6), "kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3),
           (2, 2), ceil_mode=False)
_pool_case("ave_floor_pad", (1, 2, 6, 6), "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR",
           (3, 3), (2, 2), (1, 1), pool="AVE", ceil_mode=False)
_pool_case("max_rect", (2, 2, 6, 5),
           "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
           (3, 2), (2, 1), (1, 0))
_pool_case("ave_rect", (2, 2, 6, 5),
           "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
           (2, 3), (1, 2), (0, 1), pool="AVE")


# -- LRN ------------------------------------------------------------------------------------------

def lrn_reference(x: np.ndarray, size: int, alpha: float, beta: float, k: float,
                  within: bool = False) -> np.ndarray:
    """ACROSS: ``s = k + α/n·Σ_window x²`` over channels; WITHIN: ``s = 1 + α/n²·Σ_box x²``."""
    n_num, c_num, h, w = x.shape
    half = (size - 1) // 2
    scale = np.zeros_like(x)
    for n, c, i, j in itertools.product(range(n_num), range(c_num), range(h), range(w)):
        if within:
            box = x[n, c, max(i - half, 0):i + half + 1, max(j - half, 0):j + half + 1]
            scale[n, c, i, j] = 1.0 + alpha / size**2 * np.sum(box**2)
        else:
            win = x[n, max(c - half, 0):c + half + 1, i, j]
            scale[n, c, i, j] = k + alpha / size * np.sum(win**2)
    return x * scale**-beta


def _lrn_case(cid: str, shape: Sequence[int], size: int, alpha: float, beta: float, k: float,
              within: bool = False) -> None:
    region = "WITHIN_CHANNEL" if within else "ACROSS_CHANNELS"

    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        # the proto stores float32: use the same rounded values as the layer
        a, b, kk = (float(np.float32(v)) for v in (alpha, beta, k))
        return [lrn_reference(bottoms[0], size, a, b, kk, within)]

    add_case(LayerCase(
        type="LRN", id=cid,
        proto=(f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} "
               f"norm_region: {region} }}"),
        bottoms=[tuple(shape)], reference=reference))


_lrn_case("across3", (2, 4, 3, 3), 3, 0.5, 0.75, 2.0)
_lrn_case("across5_defaults", (2, 7, 2, 3), 5, 1.0, 0.75, 1.0)
_lrn_case("across5_alexnet", (1, 6, 3, 3), 5, 1e-1, 0.75, 1.0)
_lrn_case("within3", (2, 2, 4, 4), 3, 0.8, 0.6, 1.0, within=True)
_lrn_case("within5", (1, 2, 5, 6), 5, 2.0, 0.75, 3.0, within=True)
