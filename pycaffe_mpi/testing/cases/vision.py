"""Layer cases for the vision family: Pooling, LRN, Crop, SPP.

The references are deliberately naive loops over output positions (Caffe's CPU loops for pooling,
its GPU kernels for STOCHASTIC pooling), independent of the vectorised kernels, and take the layer
hyper-parameters from the case itself, not from the layer object (only the filled weights are read
from ``layer.blobs``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

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


# -- STOCHASTIC pooling ---------------------------------------------------------------------------

def stochastic_pool_reference(x: np.ndarray, kernel: Sequence[int] | None, stride: Sequence[int],
                              phase: int, rng: np.random.Generator | None = None,
                              ceil_mode: bool = True) -> np.ndarray:
    """Caffe's StoPoolForwardTrain / StoPoolForwardTest, one output at a time.

    Windows ``[o·s, min(o·s + k, in))`` (no pad). TRAIN: ``u = 1 − rng.random(top shape)`` (all
    outputs drawn at once, C order), then the first cell whose running sum reaches ``u · Σ``;
    0 when none does (empty windows). TEST: ``Σ x² / Σ x``, 0 unless ``Σ x > 0``.
    """
    n_num, c_num, h, w = x.shape
    kh, kw = kernel if kernel is not None else (h, w)
    sh, sw = stride
    oh, ow = _pooled(h, kh, sh, 0, ceil_mode), _pooled(w, kw, sw, 0, ceil_mode)
    u = 1.0 - rng.random((n_num, c_num, oh, ow)) if phase == TRAIN else None
    y = np.zeros((n_num, c_num, oh, ow))
    for n, c, i, j in itertools.product(range(n_num), range(c_num), range(oh), range(ow)):
        cells = [x[n, c, a, b] for a in range(i * sh, min(i * sh + kh, h))
                 for b in range(j * sw, min(j * sw + kw, w))]
        total = 0.0
        for v in cells:
            total += v
        if phase != TRAIN:
            squares = 0.0
            for v in cells:
                squares += v * v
            y[n, c, i, j] = squares / total if total > 0 else 0.0
            continue
        thres, running = u[n, c, i, j] * total, 0.0
        for v in cells:
            running += v
            if running >= thres:
                y[n, c, i, j] = v
                break
    return y


def non_negative(shape: Sequence[int], zero_windows: bool = False) -> Callable[
        [np.random.Generator], np.ndarray]:
    """|N(0, 1)| draws (activations after a ReLU); ``zero_windows`` also zeroes the top-left
    2×2 cells and the whole of channel 0 of the first image."""
    def draw(rng: np.random.Generator) -> np.ndarray:
        x = np.abs(rng.standard_normal(tuple(shape)))
        if zero_windows:
            x[:, :, :2, :2] = 0
            x[0, 0] = 0
        return x
    return draw


def _stochastic_case(cid: str, shape: Sequence[int], proto: str, kernel: Sequence[int] | None,
                     stride: Sequence[int] = (1, 1), phase: int = TRAIN,
                     grown: Sequence[int] | None = None, zero_windows: bool = False) -> None:
    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        # The suite reseeds layer.rng with default_rng(7) before the forward: redraw the same u.
        return [stochastic_pool_reference(bottoms[0], kernel, stride, phase,
                                          np.random.default_rng(7))]

    train = phase == TRAIN
    grown = grown or (shape[0] + 1, *shape[1:])
    add_case(LayerCase(
        type="Pooling", id=f"stochastic_{'train' if train else 'test'}_{cid}",
        proto=f"pooling_param {{ pool: STOCHASTIC {proto} }}",
        bottoms=[non_negative(shape, zero_windows)], reference=reference, phase=phase,
        reshape=[non_negative(grown, zero_windows)],
        # NOTE: the gradient of a sample is a selection (reseeding repeats the draws); a window
        # summing to 0 is a kink (−h picks nothing), and TEST has no backward (as in Caffe).
        grad=train and not zero_windows, stochastic=train))


# Caffe's test_stochastic_pooling geometry: ceil rounding clips the last windows to the image.
_stochastic_case("k3s2", (2, 3, 6, 5), "kernel_size: 3 stride: 2", (3, 3), (2, 2))
_stochastic_case("k3s2", (2, 3, 6, 5), "kernel_size: 3 stride: 2", (3, 3), (2, 2), phase=TEST)
_stochastic_case("rect_overlap", (1, 2, 5, 6),
                 "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (2, 3), (1, 2))
_stochastic_case("global", (2, 3, 3, 4), "global_pooling: true", None, grown=(1, 3, 4, 2))
_stochastic_case("global", (2, 3, 3, 4), "global_pooling: true", None, phase=TEST)
# a stride beyond the kernel leaves cells unpooled and, with ceil rounding, an empty last row
_stochastic_case("stride_gt_kernel", (1, 2, 6, 7), "kernel_size: 2 stride: 3", (2, 2), (3, 3))
_stochastic_case("stride_gt_kernel", (1, 2, 6, 7), "kernel_size: 2 stride: 3", (2, 2), (3, 3),
                 phase=TEST)
_stochastic_case("zero_windows", (2, 2, 4, 6), "kernel_size: 2 stride: 2", (2, 2), (2, 2),
                 zero_windows=True)
_stochastic_case("zero_windows", (2, 2, 4, 6), "kernel_size: 2 stride: 2", (2, 2), (2, 2),
                 phase=TEST, zero_windows=True)


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


# -- SPP ------------------------------------------------------------------------------------------

def spp_reference(x: np.ndarray, height: int, pool: str) -> np.ndarray:
    """Each level pooled with Caffe's bins (``k = ceil(H / 2^l)``, stride k,
    ``pad = (k·2^l − H + 1) // 2``), flattened and concatenated; one level stays 4-D."""
    n_num, _, h, w = x.shape
    flat = []
    for level in range(height):
        bins = 2**level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        y = pool_reference(x, (kh, kw), (kh, kw), (ph, pw), pool)[0]
        if height == 1:
            return y
        flat.append(y.reshape(n_num, -1))
    return np.concatenate(flat, axis=1)


def _spp_case(cid: str, shape: Sequence[int], height: int, pool: str,
              grown: Sequence[int]) -> None:
    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        return [spp_reference(bottoms[0], height, pool)]

    is_max = pool == "MAX"
    add_case(LayerCase(
        type="SPP", id=cid, proto=f"spp_param {{ pyramid_height: {height} pool: {pool} }}",
        bottoms=[permuted(shape) if is_max else tuple(shape)], reference=reference,
        reshape=[permuted(grown) if is_max else tuple(grown)],
        stepsize=1e-3 if is_max else 1e-4))


def spp_stochastic_reference(x: np.ndarray, height: int, phase: int) -> np.ndarray:
    """Levels as in :func:`spp_reference` (all with pad 0), each pooled by
    :func:`stochastic_pool_reference`; the levels draw in turn from one ``default_rng(7)``."""
    n_num, _, h, w = x.shape
    rng, flat = np.random.default_rng(7), []
    for level in range(height):
        k = (math.ceil(h / 2**level), math.ceil(w / 2**level))
        y = stochastic_pool_reference(x, k, k, phase, rng)
        if height == 1:
            return y
        flat.append(y.reshape(n_num, -1))
    return np.concatenate(flat, axis=1)


def _spp_stochastic_case(cid: str, shape: Sequence[int], height: int, phase: int,
                         grown: Sequence[int]) -> None:
    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        return [spp_stochastic_reference(bottoms[0], height, phase)]

    add_case(LayerCase(
        type="SPP", id=cid, proto=f"spp_param {{ pyramid_height: {height} pool: STOCHASTIC }}",
        bottoms=[non_negative(shape)], reference=reference, reshape=[non_negative(grown)],
        phase=phase, grad=phase == TRAIN, stochastic=phase == TRAIN))


_spp_case("max3", (2, 2, 7, 6), 3, "MAX", (3, 2, 8, 9))
_spp_case("ave3", (2, 2, 7, 6), 3, "AVE", (1, 2, 9, 8))
_spp_case("max1", (2, 3, 5, 4), 1, "MAX", (3, 3, 4, 6))
_spp_case("ave1", (2, 3, 5, 4), 1, "AVE", (1, 3, 3, 3))
_spp_case("ave2", (1, 3, 5, 5), 2, "AVE", (2, 3, 6, 4))
_spp_case("max2_small", (2, 2, 3, 3), 2, "MAX", (2, 2, 4, 3))
_spp_stochastic_case("stochastic3_train", (2, 2, 4, 8), 3, TRAIN, (1, 2, 8, 4))
_spp_stochastic_case("stochastic2_test", (2, 2, 6, 4), 2, TEST, (1, 2, 2, 8))
_spp_stochastic_case("stochastic1_train", (2, 3, 3, 5), 1, TRAIN, (1, 3, 5, 2))


# -- Crop -----------------------------------------------------------------------------------------

def crop_reference(x: np.ndarray, like: Sequence[int], axis: int,
                   offsets: Sequence[int]) -> np.ndarray:
    """``y[i] = x[i + off]`` with ``off_d = 0`` before ``axis``, else the one offset given or
    the offset of axis d."""
    axis %= x.ndim
    off = [0] * x.ndim
    for d in range(axis, x.ndim):
        if len(offsets) == 1:
            off[d] = offsets[0]
        elif offsets:
            off[d] = offsets[d - axis]
    shape = [x.shape[d] if d < axis else like[d] for d in range(x.ndim)]
    y = np.zeros(shape)
    for idx in np.ndindex(*shape):
        y[idx] = x[tuple(i + o for i, o in zip(idx, off))]
    return y


def _crop_case(cid: str, shapes: Sequence[Sequence[int]], axis: int | None,
               offsets: Sequence[int]) -> None:
    proto = "" if axis is None else f"axis: {axis} "
    proto += " ".join(f"offset: {o}" for o in offsets)

    def reference(bottoms: list[np.ndarray], layer) -> list[np.ndarray]:
        return [crop_reference(bottoms[0], bottoms[1].shape, 2 if axis is None else axis,
                               offsets)]

    add_case(LayerCase(type="Crop", id=cid, proto=f"crop_param {{ {proto} }}",
                       bottoms=[tuple(s) for s in shapes], reference=reference,
                       rtol=0, atol=0))


_crop_case("defaults", [(2, 3, 5, 6), (1, 1, 3, 4)], None, [])
_crop_case("one_offset", [(2, 3, 5, 6), (2, 3, 3, 4)], None, [2])
_crop_case("offset_per_axis", [(2, 4, 5, 6), (1, 2, 3, 4)], 1, [1, 2, 0])
_crop_case("negative_axis", [(2, 3, 5, 6), (1, 1, 1, 3)], -1, [3])
_crop_case("axis0_2d", [(6, 7), (4, 3)], 0, [1, 4])
_crop_case("same_size", [(2, 2, 3, 3), (2, 2, 3, 3)], 2, [0])
