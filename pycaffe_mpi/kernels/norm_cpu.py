"""CPU kernels for BatchNorm, Scale and Bias, compiled by numba, split over channels in lanes.

Every array is a C-contiguous ``(outer, C, inner)`` view: BatchNorm's ``(N, C, H·W)``, or
Scale's and Bias's ``(outer, dim, inner)`` around their operand. Channel ``c`` is the ``outer``
rows ``x[o, c, :]``; a lane of :func:`pycaffe_mpi.kernels.threads.run` takes a contiguous range
of channels, so every per-channel sum is made by one lane alone and results do not depend on
the thread count. Each function works for float32 and float64 (numba compiles one version per
argument types on first use); per-channel sums are accumulated in float64.

NumPy ran BatchNorm's training forward as five whole-array passes (mean, centre, square, mean,
divide) with two full-size temporaries, and kept a full-size copy of its output for the
backward. Here the forward reads each block of channels twice, the second time from the L2
cache, and writes it once; the backward likewise; and what the backward needs is the
per-channel mean and 1/sqrt(σ² + ε) alone: x̂ = (x − μ)·inv_std is recomputed from the bottom,
or read from the one copy an in-place layer keeps.

NOTE: ``cache=True`` keeps the compiled code on disk (``__pycache__``): the first process on a
machine pays ~10 s to compile these kernels in both dtypes (2 loaded cores), later ones load
them in ~0.3 s. numba is imported here, and this module is imported on first use by
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
# NOTE: a kernel that reads each channel twice (the sums, then the pass that uses them) runs
# over blocks of channels of about this many values, so that the second pass finds its inputs
# in the (1 MB per core) L2 cache instead of memory.
BLOCK = 1 << 16


@_jit
def _bn_train_forward(x: Any, y: Any, kept: Any, eps: float, mean: Any, var: Any,
                      inv_std: Any, block_values: int, c0: int, c1: int) -> None:
    """Batch statistics and ``y = (x − μ)·inv_std`` (also into ``kept`` when not empty) for
    channels ``c0:c1``; ``mean``, ``var`` (biased), ``inv_std`` = 1/sqrt(var + eps), float64.

    The sums are shifted, d = x − k with k = the channel's first value: var = Σd²/m − (Σd/m)².
    NOTE: the shift keeps the cancellation to the size of (mean − k)² / σ², i.e. none for data
    near its mean, where the unshifted formula loses digits as mean² / σ² grows."""
    outer, inner = x.shape[0], x.shape[2]
    m = outer * inner
    if m == 0:
        return
    block = max(1, block_values // m)
    s = np.empty(block)
    cast = np.empty((2, block), x.dtype)  # μ and inv_std in the arrays' dtype
    keep = kept.size > 0
    for b0 in range(c0, c1, block):
        b1 = min(b0 + block, c1)
        for c in range(b0, b1):
            mean[c] = x[0, c, 0]  # the shift k, until the sums are in
            var[c], s[c - b0] = 0.0, 0.0
        for o in range(outer):
            for c in range(b0, b1):
                ds, dq = _shifted_sums(x[o, c], mean[c])
                s[c - b0] += ds
                var[c] += dq
        for c in range(b0, b1):
            mu = s[c - b0] / m
            mean[c] += mu
            var[c] = max(var[c] / m - mu * mu, 0.0)
            inv_std[c] = 1.0 / np.sqrt(var[c] + eps)
            cast[0, c - b0], cast[1, c - b0] = mean[c], inv_std[c]
        for o in range(outer):
            for c in range(b0, b1):
                mu, inv = cast[0, c - b0], cast[1, c - b0]
                xr, yr = x[o, c], y[o, c]
                if keep:
                    kr = kept[o, c]
                    for i in range(inner):
                        v = (xr[i] - mu) * inv
                        yr[i] = v
                        kr[i] = v
                else:
                    for i in range(inner):
                        yr[i] = (xr[i] - mu) * inv


@_jit
def _bn_normalize(x: Any, mean: Any, inv_std: Any, y: Any, c0: int, c1: int) -> None:
    """``y = (x − mean)·inv_std`` per channel (``y`` may be ``x``)."""
    for o in range(x.shape[0]):
        for c in range(c0, c1):
            mu, inv = mean[c], inv_std[c]
            xr, yr = x[o, c], y[o, c]
            for i in range(xr.shape[0]):
                yr[i] = (xr[i] - mu) * inv


@_jit
def _bn_backward(dy: Any, src: Any, from_bottom: bool, mean: Any, inv_std: Any, inv_out: Any,
                 dx: Any, sums_out: Any, block_values: int, c0: int, c1: int) -> None:
    """``dx = (dy − mean(dy) − x̂·mean(dy·x̂))·inv_out`` per channel (``dx`` may be ``dy``);
    x̂ is ``src`` itself, or ``(src − mean)·inv_std`` when ``from_bottom``. ``sums_out`` (2, C)
    gets Σ dy and Σ dy·x̂ when it has columns."""
    outer, inner = dy.shape[0], dy.shape[2]
    m = outer * inner
    block = max(1, block_values // max(1, m))
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
            if sums_out.shape[1]:
                sums_out[0, b0 + j], sums_out[1, b0 + j] = sums[0, j], sums[1, j]
        for o in range(outer):
            for c in range(b0, b1):
                mu, inv, out = mean[c], inv_std[c], inv_out[c]
                a, b = means[0, c - b0], means[1, c - b0]
                dr, sr, xr = dy[o, c], src[o, c], dx[o, c]
                if from_bottom:
                    for i in range(inner):
                        xr[i] = (dr[i] - a - (sr[i] - mu) * inv * b) * out
                else:
                    for i in range(inner):
                        xr[i] = (dr[i] - a - sr[i] * b) * out


# -- Scale and Bias ----------------------------------------------------------------------------
# NOTE: inlined by numba, so that the branches on the flags leave the row loops alone
@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _affine_row(xr: Any, yr: Any, s: Any, b: Any, has_scale: bool, has_bias: bool) -> None:
    """``yr = xr·s + b`` over one row (``s`` or ``b`` left out when absent)."""
    if has_scale and has_bias:
        for i in range(xr.shape[0]):
            yr[i] = xr[i] * s + b
    elif has_scale:
        for i in range(xr.shape[0]):
            yr[i] = xr[i] * s
    else:
        for i in range(xr.shape[0]):
            yr[i] = xr[i] + b


@_jit
def _affine_forward(x: Any, scale: Any, bias: Any, y: Any, kept: Any, c0: int,
                    c1: int) -> None:
    """``y = x·scale[c] + bias[c]`` (an empty ``scale`` or ``bias`` is left out; ``y`` may be
    ``x``); ``x`` is also copied into ``kept`` when that is not empty."""
    has_scale, has_bias, keep = scale.size > 0, bias.size > 0, kept.size > 0
    zero = np.zeros(1, x.dtype)[0]  # stands for an absent scale or bias, in the arrays' dtype
    for o in range(x.shape[0]):
        for c in range(c0, c1):
            s = scale[c] if has_scale else zero
            b = bias[c] if has_bias else zero
            xr, yr = x[o, c], y[o, c]
            if keep:
                # NOTE: a loop, not ``kept[o, c][:] = xr``: the slice copy, even when not run,
                # made every row of this kernel 2-4x slower (reference counts on the views)
                kr = kept[o, c]
                for i in range(xr.shape[0]):
                    kr[i] = xr[i]
            _affine_row(xr, yr, s, b, has_scale, has_bias)


@_jit
def _affine_in_place_checked(x: Any, scale: Any, bias: Any, kept: Any, bottom: Any, mean: Any,
                             inv_std: Any, block_values: int, c0: int, c1: int) -> int:
    """``x = x·scale[c] + bias[c]`` in place on channels ``c0:c1``, each block of channels
    only once its values are found to be x̂: ``kept``'s (when not empty), else
    ``(bottom − mean)·inv_std`` as BatchNorm's forward computes it. Returns the first channel
    left as it was: ``c1``, or the start of the first block that differs."""
    outer, inner = x.shape[0], x.shape[2]
    block = max(1, block_values // max(1, outer * inner))
    has_scale, has_bias, from_kept = scale.size > 0, bias.size > 0, kept.size > 0
    zero = np.zeros(1, x.dtype)[0]
    for b0 in range(c0, c1, block):
        b1 = min(b0 + block, c1)
        for o in range(outer):
            for c in range(b0, b1):
                xr, differ = x[o, c], False
                if from_kept:
                    kr = kept[o, c]
                    for i in range(inner):
                        differ |= xr[i] != kr[i]
                else:
                    br, mu, inv = bottom[o, c], mean[c], inv_std[c]
                    for i in range(inner):
                        differ |= (br[i] - mu) * inv != xr[i]
                if differ:
                    return b0
        for o in range(outer):
            for c in range(b0, b1):
                s = scale[c] if has_scale else zero
                b = bias[c] if has_bias else zero
                _affine_row(x[o, c], x[o, c], s, b, has_scale, has_bias)
    return c1


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


def batch_norm_forward(x: Any, y: Any, eps: float, kept: Any = None) -> tuple[Any, Any, Any]:
    """BatchNorm's forward with batch statistics over ``x`` ``(N, C, S)``, per channel:

    μ = Σ x / m, σ² = Σ (x − μ)² / m over the m = N·S values, y = (x − μ)·inv_std with
    inv_std = 1/sqrt(σ² + eps), written into ``y`` (it may be ``x``) and ``kept`` when given.
    Returns (μ, σ², inv_std), float64 ``(C,)``."""
    mean, var, inv_std = (np.zeros(x.shape[1]) for _ in range(3))
    kept = _none3(x.dtype) if kept is None else kept
    _over_channels(lambda c0, c1: _bn_train_forward(x, y, kept, eps, mean, var, inv_std, BLOCK,
                                                    c0, c1), x)
    return mean, var, inv_std


def normalize(x: Any, mean: Any, inv_std: Any, y: Any) -> None:
    """``y = (x − μ)·inv_std`` per channel of ``x`` ``(N, C, S)`` (``y`` may be ``x``), with
    given ``mean`` and ``inv_std`` ``(C,)`` (BatchNorm's global statistics)."""
    mean, inv_std = mean.astype(x.dtype), inv_std.astype(x.dtype)
    _over_channels(lambda c0, c1: _bn_normalize(x, mean, inv_std, y, c0, c1), x)


def batch_norm_backward(dy: Any, mean: Any, inv_std: Any, dx: Any, x_norm: Any = None,
                        x: Any = None, scale: Any = None) -> Any:
    """BatchNorm's gradient with batch statistics, all arrays ``(N, C, S)``, per channel:

    dx = (dy − mean(dy) − x̂·mean(dy·x̂))·inv_std, means over the channel's N·S values;

    x̂ is ``x_norm``, or ``(x − μ)·inv_std`` recomputed from the bottom ``x``. ``dx`` may be
    ``dy`` (in place). With ``scale`` ``(C,)`` (a Scale layer's s after the BatchNorm, ``dy``
    then the gradient at the Scale's top), ``dx`` is taken through both layers,
    dx = s·(dy − mean(dy) − x̂·mean(dy·x̂))·inv_std, and (Σ dy, Σ dy·x̂) are returned, float64
    ``(2, C)``: the Scale's dE/db and dE/ds; else None."""
    from_bottom = x_norm is None
    src = x if from_bottom else x_norm
    inv_out = inv_std if scale is None else inv_std * scale.reshape(-1)
    mean, inv_std, inv_out = (a.astype(dy.dtype) for a in (mean, inv_std, inv_out))
    sums = np.zeros((2, dy.shape[1]) if scale is not None else (2, 0))
    _over_channels(lambda c0, c1: _bn_backward(dy, src, from_bottom, mean, inv_std, inv_out, dx,
                                               sums, BLOCK, c0, c1), dy)
    return sums if scale is not None else None


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


def affine_in_place_checked(x: Any, scale: Any = None, bias: Any = None, kept: Any = None,
                            bottom: Any = None, mean: Any = None, inv_std: Any = None) -> bool:
    """``x = x·scale + bias`` in place over ``x`` ``(outer, dim, inner)`` if ``x`` holds x̂:
    the values of ``kept`` (same shape), or else BatchNorm's ``(bottom − mean)·inv_std`` of
    ``bottom`` (same shape; ``mean``, ``inv_std`` float64 ``(dim,)``). Returns whether it did;
    if not, ``x`` is left with its values (those compared equal may come back from x̂).

    NOTE: one pass through memory: a block of channels is compared, then rewritten from the
    cache; the compare alone before an ordinary forward cost a whole read of both arrays more."""
    none1 = np.empty(0, x.dtype)
    scale = none1 if scale is None else scale.reshape(-1)
    bias = none1 if bias is None else bias.reshape(-1)
    from_kept = kept is not None
    kept = kept if from_kept else _none3(x.dtype)
    bottom = _none3(x.dtype) if bottom is None else bottom
    mean = none1 if mean is None else mean.astype(x.dtype)
    inv_std = none1 if inv_std is None else inv_std.astype(x.dtype)
    per_channel = max(1, x.shape[0] * x.shape[2])
    parts = threads.run(
        lambda lane, lo, hi: (lo, hi, _affine_in_place_checked(
            x, scale, bias, kept, bottom, mean, inv_std, BLOCK, lo, hi)),
        x.shape[1], grain=max(1, MIN_LANE_ELEMENTS // per_channel))
    if all(stop == hi for _, hi, stop in parts):
        return True
    for lo, _, stop in parts:  # put x̂ back where it was rewritten
        if from_kept:
            x[:, lo:stop] = kept[:, lo:stop]
        else:
            _bn_normalize(bottom, mean, inv_std, x, lo, stop)
    return False
