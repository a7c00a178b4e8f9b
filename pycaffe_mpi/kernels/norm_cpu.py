"""CPU kernels for BatchNorm, Scale and Bias, compiled by numba, split over channels in lanes.

Every array is a C-contiguous ``(outer, C, inner)`` view: BatchNorm's ``(N, C, H·W)``, or
Scale's and Bias's ``(outer, dim, inner)`` around their operand. Channel ``c`` is the ``outer``
rows ``x[o, c, :]``; a lane of :func:`pycaffe_mpi.kernels.threads.run` takes a contiguous range
of channels, so every per-channel sum is made by one lane alone and results do not depend on
the thread count. Each function works for float32 and float64 (numba compiles one version per
argument types on first use); per-channel sums are accumulated in float64.

NumPy ran BatchNorm's training forward as five whole-array passes (mean, centre, square, mean,
divide) with two full-size temporaries, and kept a full-size copy of its output for the
backward. Here the statistics are one read of each channel, the normalization one read and one
write, the backward two reads of each channel (the second from the cache), and what the backward
needs is the per-channel mean and 1/sqrt(σ² + ε) alone: x̂ = (x − μ)·inv_std is recomputed from
the bottom, or read from the one copy an in-place layer keeps.

NOTE: numba is imported here, and this module is imported on first use by
:mod:`pycaffe_mpi.layer_types.normalization`, so ``import pycaffe_mpi`` does not pay for it.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from pycaffe_mpi.kernels import threads

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)

# NOTE: a lane takes channels worth at least this many values; below it, handing a part to the
# worker thread costs more than the part.
MIN_LANE_ELEMENTS = 1 << 15


# -- row helpers: sums over one contiguous row of ``inner`` values, in float64 ------------------
# NOTE: LLVM keeps a plain sum in program order and runs it one value at a time (one add per
# 4 cycles, 3x slower than the passes around it here); allowing it to reassociate the sums alone
# lets it keep several vector accumulators. The order is fixed by the code, not by the thread
# or the lane, so results stay reproducible.
_jit_sum = numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})


@_jit_sum
def _shifted_sums(a: Any, k: float) -> tuple[float, float]:
    """(Σ (a − k), Σ (a − k)²)."""
    s = q = 0.0
    for i in range(a.shape[0]):
        d = np.float64(a[i]) - k
        s += d
        q += d * d
    return s, q


@_jit_sum
def _sum(a: Any) -> float:
    """Σ a."""
    s = 0.0
    for i in range(a.shape[0]):
        s += np.float64(a[i])
    return s


@_jit_sum
def _sum_and_dot(a: Any, b: Any) -> tuple[float, float]:
    """(Σ a, Σ a·b)."""
    s = p = 0.0
    for i in range(a.shape[0]):
        v = np.float64(a[i])
        s += v
        p += v * np.float64(b[i])
    return s, p


@_jit_sum
def _sum_and_dot_centred(a: Any, x: Any, mu: Any, inv: Any) -> tuple[float, float]:
    """(Σ a, Σ a·x̂), x̂ = (x − mu)·inv computed in the arrays' dtype, as the forward does."""
    s = p = 0.0
    for i in range(a.shape[0]):
        v = np.float64(a[i])
        s += v
        p += v * np.float64((x[i] - mu) * inv)
    return s, p


# -- BatchNorm ---------------------------------------------------------------------------------
# NOTE: the loops run image by image over the lane's channels, i.e. through memory in order: one
# channel at a time over the images jumps C·inner values every inner values and measured 1.8x
# slower for the (8, 256, 56·56) passes here. Per-channel sums still add the images in order.
@_jit
def _bn_stats(x: Any, mean: Any, var: Any, c0: int, c1: int) -> None:
    """``mean[c]``, ``var[c]`` (biased) over ``x[:, c, :]`` for ``c0 ≤ c < c1``.

    One pass of shifted sums, d = x − k with k = the channel's first value: var = Σd²/m −
    (Σd/m)². NOTE: the shift keeps the cancellation to the size of (mean − k)² / σ², i.e. none
    for data near its mean, where the unshifted formula loses digits as mean² / σ² grows."""
    outer, inner = x.shape[0], x.shape[2]
    m = outer * inner
    if m == 0:
        return
    for c in range(c0, c1):
        mean[c] = x[0, c, 0]  # the shift k, until the sums are in
        var[c] = 0.0
    s = np.zeros(c1 - c0)
    for o in range(outer):
        for c in range(c0, c1):
            ds, dq = _shifted_sums(x[o, c], mean[c])
            s[c - c0] += ds
            var[c] += dq
    for c in range(c0, c1):
        mu = s[c - c0] / m
        mean[c] += mu
        var[c] = max(var[c] / m - mu * mu, 0.0)


@_jit
def _bn_normalize(x: Any, mean: Any, inv_std: Any, y: Any, kept: Any, c0: int,
                  c1: int) -> None:
    """``y = (x − mean)·inv_std`` per channel (``y`` may be ``x``); also into ``kept`` when
    it is not empty."""
    keep = kept.size > 0
    for o in range(x.shape[0]):
        for c in range(c0, c1):
            mu, inv = mean[c], inv_std[c]
            xr, yr = x[o, c], y[o, c]
            if keep:
                kr = kept[o, c]
                for i in range(xr.shape[0]):
                    v = (xr[i] - mu) * inv
                    yr[i] = v
                    kr[i] = v
            else:
                for i in range(xr.shape[0]):
                    yr[i] = (xr[i] - mu) * inv


# NOTE: the backward reads each channel twice (sums, then dx); it runs over blocks of channels
# of about this many values, so that the second pass finds dy and x̂ in the (1 MB) L2 cache.
BACKWARD_BLOCK = 1 << 16


@_jit
def _bn_backward(dy: Any, src: Any, from_bottom: bool, mean: Any, inv_std: Any, dx: Any,
                 c0: int, c1: int) -> None:
    """``dx = (dy − mean(dy) − x̂·mean(dy·x̂))·inv_std`` per channel (``dx`` may be ``dy``);
    x̂ is ``src`` itself, or ``(src − mean)·inv_std`` when ``from_bottom``."""
    outer, inner = dy.shape[0], dy.shape[2]
    m = outer * inner
    block = max(1, BACKWARD_BLOCK // max(1, m))
    sums = np.empty((2, block))
    means = np.empty((2, block), dy.dtype)  # in the arrays' dtype: the pass does not widen
    for b0 in range(c0, c1, block):
        b1 = min(b0 + block, c1)
        sums[:] = 0.0
        for o in range(outer):
            for c in range(b0, b1):
                if from_bottom:
                    ds, dp = _sum_and_dot_centred(dy[o, c], src[o, c], mean[c], inv_std[c])
                else:
                    ds, dp = _sum_and_dot(dy[o, c], src[o, c])
                sums[0, c - b0] += ds
                sums[1, c - b0] += dp
        for j in range(b1 - b0):
            means[0, j], means[1, j] = sums[0, j] / m, sums[1, j] / m
        for o in range(outer):
            for c in range(b0, b1):
                mu, inv = mean[c], inv_std[c]
                a, b = means[0, c - b0], means[1, c - b0]
                dr, sr, xr = dy[o, c], src[o, c], dx[o, c]
                if from_bottom:
                    for i in range(inner):
                        xr[i] = (dr[i] - a - (sr[i] - mu) * inv * b) * inv
                else:
                    for i in range(inner):
                        xr[i] = (dr[i] - a - sr[i] * b) * inv


# -- Scale and Bias ----------------------------------------------------------------------------
@_jit
def _affine_forward(x: Any, scale: Any, bias: Any, y: Any, kept: Any, c0: int,
                    c1: int) -> None:
    """``y = x·scale[c] + bias[c]`` (an empty ``scale`` or ``bias`` is left out; ``y`` may be
    ``x``); ``x`` is also copied into ``kept`` when that is not empty."""
    has_scale, has_bias, keep = scale.size > 0, bias.size > 0, kept.size > 0
    one = np.ones(1, x.dtype)[0]  # 1 and 0 in the arrays' dtype: the pass does not widen
    zero = one - one
    for o in range(x.shape[0]):
        for c in range(c0, c1):
            s = scale[c] if has_scale else one
            b = bias[c] if has_bias else zero
            xr, yr = x[o, c], y[o, c]
            if keep:
                kr = kept[o, c]
                for i in range(xr.shape[0]):
                    v = xr[i]
                    kr[i] = v
                    yr[i] = v * s + b
            elif has_scale and has_bias:
                for i in range(xr.shape[0]):
                    yr[i] = xr[i] * s + b
            elif has_scale:
                for i in range(xr.shape[0]):
                    yr[i] = xr[i] * s
            else:
                for i in range(xr.shape[0]):
                    yr[i] = xr[i] + b


@_jit
def _affine_backward(dy: Any, x: Any, mean: Any, inv_std: Any, scale: Any, dx: Any,
                     dscale: Any, dbias: Any, c0: int, c1: int) -> None:
    """Per channel: ``dscale[c] = Σ dy·x`` and ``dbias[c] = Σ dy`` (float64, each when not
    empty, zeroed by the caller), and ``dx = dy·scale[c]`` (``dy`` without a scale; ``dx`` may
    be ``dy``; skipped when ``dx`` is empty). A row's sums read ``dy`` before ``dx`` is
    written. With a ``mean`` (not empty), ``x`` is a BatchNorm's bottom and its
    ``(x − mean)·inv_std`` stands for x."""
    want_ds, want_db, want_dx = dscale.size > 0, dbias.size > 0, dx.size > 0
    has_scale, centred = scale.size > 0, mean.size > 0
    for o in range(dy.shape[0]):
        for c in range(c0, c1):
            dr = dy[o, c]
            if want_ds:
                if centred:
                    ds, dp = _sum_and_dot_centred(dr, x[o, c], mean[c], inv_std[c])
                else:
                    ds, dp = _sum_and_dot(dr, x[o, c])
                dscale[c] += dp
                if want_db:
                    dbias[c] += ds
            elif want_db:
                dbias[c] += _sum(dr)
            if want_dx:
                xr = dx[o, c]
                if has_scale:
                    g = scale[c]
                    for i in range(dr.shape[0]):
                        xr[i] = dr[i] * g
                else:
                    for i in range(dr.shape[0]):
                        xr[i] = dr[i]


@_jit
def _equal_normalized(y: Any, x: Any, mean: Any, inv_std: Any, c0: int, c1: int) -> bool:
    """Whether ``y == (x − mean)·inv_std`` on channels ``c0:c1``, computed as
    :func:`_bn_normalize` computes it, stopping after the first row that differs."""
    for o in range(x.shape[0]):
        for c in range(c0, c1):
            mu, inv = mean[c], inv_std[c]
            xr, yr = x[o, c], y[o, c]
            differ = False
            for i in range(xr.shape[0]):
                differ |= (xr[i] - mu) * inv != yr[i]
            if differ:
                return False
    return True


@_jit
def _equal(a: Any, b: Any, lo: int, hi: int) -> bool:
    """Whether ``a[lo:hi]`` and ``b[lo:hi]`` (flat, unsigned integers) hold the same bits,
    stopping after the first block that differs."""
    # NOTE: an OR of XORs over a block vectorizes; a compare and a branch per value ran 5x slower
    for start in range(lo, hi, 4096):
        ra, rb = a[start:min(start + 4096, hi)], b[start:min(start + 4096, hi)]
        differ = ra[0] ^ rb[0]
        for i in range(1, ra.shape[0]):  # from 0: no negative-index check per value
            differ |= ra[i] ^ rb[i]
        if differ:
            return False
    return True


# -- host entry points: the lanes --------------------------------------------------------------
_EMPTY3: dict[Any, Any] = {}


def _none3(dtype: Any) -> Any:
    """An empty (0, 0, 0) array standing for an absent array argument."""
    dtype = np.dtype(dtype)
    if dtype not in _EMPTY3:
        _EMPTY3[dtype] = np.empty((0, 0, 0), dtype)
    return _EMPTY3[dtype]


def _over_channels(fn: Any, x: Any) -> None:
    """``fn(c0, c1)`` for the channels (axis 1) of ``x`` ``(outer, C, inner)``, in lanes."""
    per_channel = max(1, x.shape[0] * x.shape[2])
    threads.run(lambda lane, lo, hi: fn(lo, hi), x.shape[1],
                grain=max(1, MIN_LANE_ELEMENTS // per_channel))


def batch_stats(x: Any) -> tuple[Any, Any]:
    """Per-channel mean μ and biased variance σ² of ``x`` ``(N, C, S)``: float64 ``(C,)``.

    μ = Σ x / m, σ² = Σ (x − μ)² / m over the m = N·S values of a channel."""
    mean, var = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    _over_channels(lambda c0, c1: _bn_stats(x, mean, var, c0, c1), x)
    return mean, var


def normalize(x: Any, mean: Any, inv_std: Any, y: Any, kept: Any = None) -> None:
    """``y = (x − μ)·inv_std`` per channel of ``x`` ``(N, C, S)`` (``y`` may be ``x``), also
    written into ``kept`` (same shape) when given; ``mean``, ``inv_std`` ``(C,)``."""
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    kept = _none3(x.dtype) if kept is None else kept
    _over_channels(lambda c0, c1: _bn_normalize(x, mean, inv_std, y, kept, c0, c1), x)


def batch_norm_backward(dy: Any, mean: Any, inv_std: Any, dx: Any, x_norm: Any = None,
                        x: Any = None) -> None:
    """BatchNorm's gradient with batch statistics, all arrays ``(N, C, S)``, per channel:

    dx = (dy − mean(dy) − x̂·mean(dy·x̂))·inv_std, means over the channel's N·S values;

    x̂ is ``x_norm``, or ``(x − μ)·inv_std`` recomputed from the bottom ``x``. ``dx`` may be
    ``dy`` (in place)."""
    from_bottom = x_norm is None
    src = x if from_bottom else x_norm
    mean, inv_std = mean.astype(dy.dtype), inv_std.astype(dy.dtype)
    _over_channels(
        lambda c0, c1: _bn_backward(dy, src, from_bottom, mean, inv_std, dx, c0, c1), dy)


def affine_forward(x: Any, y: Any, scale: Any = None, bias: Any = None,
                   kept: Any = None) -> None:
    """``y = x·scale + bias`` over ``x`` ``(outer, dim, inner)``, ``scale`` and ``bias``
    ``(dim,)`` (either may be None; ``y`` may be ``x``); ``x`` is first copied into ``kept``
    when given."""
    none1 = np.empty(0, x.dtype)
    scale = none1 if scale is None else scale.reshape(-1)
    bias = none1 if bias is None else bias.reshape(-1)
    kept = _none3(x.dtype) if kept is None else kept
    _over_channels(lambda c0, c1: _affine_forward(x, scale, bias, y, kept, c0, c1), x)


def affine_backward(dy: Any, x: Any = None, scale: Any = None, dx: Any = None,
                    want_dscale: bool = False, want_dbias: bool = False, mean: Any = None,
                    inv_std: Any = None) -> tuple[Any, Any]:
    """The gradients of ``y = x·scale + bias`` over ``(outer, dim, inner)`` arrays:

    dscale = Σ dy·x and dbias = Σ dy over outer and inner (float64 ``(dim,)``, or None when not
    wanted; dscale needs ``x``), and dx = dy·scale (dy without a scale) written into ``dx``
    when given (it may be ``dy``). With ``mean`` and ``inv_std`` ``(dim,)``, x is
    ``(x − mean)·inv_std``: a BatchNorm's output recomputed from its bottom ``x``."""
    none1, dim = np.empty(0, dy.dtype), dy.shape[1]
    scale = none1 if scale is None else scale.reshape(-1)
    mean = none1 if mean is None else mean.astype(dy.dtype)
    inv_std = none1 if inv_std is None else inv_std.astype(dy.dtype)
    dscale = np.zeros(dim) if want_dscale else np.empty(0)
    dbias = np.zeros(dim) if want_dbias else np.empty(0)
    x = _none3(dy.dtype) if x is None else x
    dx = _none3(dy.dtype) if dx is None else dx
    _over_channels(lambda c0, c1: _affine_backward(dy, x, mean, inv_std, scale, dx, dscale,
                                                   dbias, c0, c1), dy)
    return (dscale if want_dscale else None), (dbias if want_dbias else None)


def equal_normalized(y: Any, x: Any, mean: Any, inv_std: Any) -> bool:
    """Whether ``y`` is :func:`normalize`'s ``(x − mean)·inv_std`` of ``x``, value for value
    (``y``, ``x`` of one shape ``(N, C, S)``), checked in lanes."""
    if y.shape != x.shape or y.dtype != x.dtype:
        return False
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    return all(threads.run(lambda lane, lo, hi: _equal_normalized(y, x, mean, inv_std, lo, hi),
                           x.shape[1], grain=max(1, MIN_LANE_ELEMENTS
                                                 // max(1, x.shape[0] * x.shape[2]))))


def equal(a: Any, b: Any) -> bool:
    """Whether the C-contiguous arrays ``a`` and ``b`` have the same shape, dtype and bits,
    checked in lanes."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = f"u{a.dtype.itemsize}"
    fa, fb = a.reshape(-1).view(bits), b.reshape(-1).view(bits)
    return all(threads.run(lambda lane, lo, hi: _equal(fa, fb, lo, hi), fa.size,
                           grain=MIN_LANE_ELEMENTS))
