"""Stochastic pooling (Caffe's ``STOCHASTIC``, Zeiler & Fergus 2013), generic over ``xp``.

Output cell ``(oh, ow)`` pools the window rows ``[oh·s_h, min(oh·s_h + k_h, H))`` and columns
``[ow·s_w, min(ow·s_w + k_w, W))``: no padding (Caffe pads only MAX and AVE), windows clipped to
the image. The kernels gather, per window offset ``(i, j)`` in row-major order, the cell every
output reads (zero beyond the image, so clipped cells add nothing) and take one whole-batch pass
per offset.

TRAIN picks, per window, the first cell (row-major) whose running sum reaches ``u · Σ window``
with ``u`` uniform in ``(0, 1]`` (Caffe's GPU kernel): for non-negative inputs, a cell is picked
with probability proportional to its value. TEST outputs ``Σ x² / Σ x`` (0 where ``Σ x ≤ 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class Geometry(NamedTuple):
    """Pooling windows of an ``(N, C, H, W)`` input (pad 0)."""

    shape: tuple[int, int, int, int]  # (N, C, H, W)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    out: tuple[int, int]  # (OH, OW)

    @property
    def padded(self) -> tuple[int, int]:
        """``(H', W')`` holding every window whole: the ceil rounding lets windows overhang."""
        return tuple(max(size, (o - 1) * s + k) for size, k, s, o in
                     zip(self.shape[2:], self.kernel, self.stride, self.out))


def _columns(xp: Any, x: Any, g: Geometry, bufs: Any) -> Any:
    """``(k_h·k_w, N, C, OH, OW)``: per window offset ``(i, j)`` (row-major) the cell each
    output reads, zero beyond the image."""
    (h, w), (hp, wp) = g.shape[2:], g.padded
    if (hp, wp) != (h, w):
        xz = bufs.get("sto_x", (*g.shape[:2], hp, wp))
        xz[:, :, :h, :w] = x
        # NOTE: the margin is cleared every time: an earlier, larger image may have written it.
        xz[:, :, h:] = 0
        xz[:, :, :h, w:] = 0
    else:
        xz = x
    (kh, kw), (sh, sw), (oh, ow) = g.kernel, g.stride, g.out
    cols = bufs.get("sto_cols", (kh * kw, *g.shape[:2], oh, ow))
    # NOTE: one strided copy per offset; every later pass then reads contiguous memory (NumPy's
    # strided element-wise loops measured ~2x slower over the passes below).
    for i in range(kh):
        for j in range(kw):
            cols[i * kw + j] = xz[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
    return cols


def _inside(xp: Any, g: Geometry) -> Any:
    """``(OH, OW)`` bool: windows that start inside the image (a stride larger than the kernel
    can leave the last window past the edge; it pools nothing)."""
    (h, w), (sh, sw), (oh, ow) = g.shape[2:], g.stride, g.out
    return (xp.arange(oh) * sh < h)[:, None] & (xp.arange(ow) * sw < w)[None, :]


def sample(xp: Any, x: Any, u: Any, y: Any, g: Geometry, bufs: Any) -> tuple[Any, Any]:
    """``y`` = one sampled cell per window of ``x``; returns ``(argk, picked)``.

    ``u`` ``(N, C, OH, OW)`` holds uniforms in ``(0, 1]``. ``argk`` (int32) is the offset
    ``i·k_w + j`` of each window's pick and ``picked`` (bool) marks windows that picked a cell:
    all of them unless a window is empty or, with negative inputs, never reaches its threshold
    (``y`` is 0 there).
    """
    cols = _columns(xp, x, g, bufs)
    thres = bufs.get("sto_total", y.shape)
    thres[...] = cols[0]
    for v in cols[1:]:
        thres += v
    # NOTE: the running sum below repeats these additions in the same order, so its last value
    # equals the total exactly and u = 1 always picks a cell.
    thres *= u
    cum, tmp = bufs.get("sto_cum", y.shape), bufs.get("sto_tmp", y.shape)
    cum[...] = 0
    y[...] = 0
    hit = bufs.get("sto_hit", y.shape, dtype=bool)
    waiting = bufs.get("sto_waiting", y.shape, dtype=bool)  # windows still to pick
    waiting[...] = _inside(xp, g)
    argk = bufs.get("sto_argk", y.shape, dtype=np.int32)
    argk[...] = 0
    for v in cols:
        cum += v
        xp.greater_equal(cum, thres, out=hit)
        hit &= waiting
        waiting ^= hit
        # NOTE: arithmetic instead of masked copies (copyto with where= measured ~4x slower):
        # each window hits once, so y = Σ_k v_k·hit_k, and argk counts the offsets before it.
        argk += waiting
        xp.multiply(v, hit, out=tmp)
        y += tmp
    picked = bufs.get("sto_picked", y.shape, dtype=bool)
    xp.logical_and(_inside(xp, g), ~waiting, out=picked)
    return argk, picked


def sample_backward(xp: Any, dy: Any, dx: Any, argk: Any, picked: Any, g: Geometry) -> None:
    """``dx`` (overwritten) = each window's ``dy`` at the cell it picked; overlapping windows
    add up."""
    n, c, h, w = g.shape
    kw, (sh, sw), (oh, ow) = g.kernel[1], g.stride, g.out
    planes = (xp.arange(n * c) * (h * w)).reshape(n, c, 1, 1)
    rows = (xp.arange(oh) * sh).reshape(oh, 1) + argk // kw
    cols = (xp.arange(ow) * sw).reshape(1, ow) + argk % kw
    # NOTE: windows without a pick point at cell 0 of their plane with weight 0.
    flat = xp.where(picked, planes + rows * w + cols, 0).reshape(-1)
    weights = (dy * picked).reshape(-1)
    dx[...] = xp.bincount(flat, weights=weights, minlength=n * c * h * w).reshape(dx.shape)


def weighted_average(xp: Any, x: Any, y: Any, g: Geometry, bufs: Any) -> None:
    """``y = Σ x² / Σ x`` over each window, 0 where ``Σ x ≤ 0`` (Caffe's guard)."""
    cols = _columns(xp, x, g, bufs)
    s1, tmp = bufs.get("sto_total", y.shape), bufs.get("sto_tmp", y.shape)
    s1[...] = cols[0]
    xp.multiply(cols[0], cols[0], out=y)
    for v in cols[1:]:
        s1 += v
        xp.multiply(v, v, out=tmp)
        y += tmp
    positive = s1 > 0
    y /= xp.where(positive, s1, 1)
    y *= positive


def geometry(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
             out: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of pooling an ``(N, C, H, W)`` input."""
    return Geometry(tuple(int(d) for d in shape), tuple(kernel), tuple(stride), tuple(out))
