"""Stochastic pooling (Caffe's ``STOCHASTIC``, Zeiler & Fergus 2013), generic over ``xp``.

Output cell ``(oh, ow)`` pools the window rows ``[oh·s_h, min(oh·s_h + k_h, H))`` and columns
``[ow·s_w, min(ow·s_w + k_w, W))``: no padding (Caffe pads only MAX and AVE), windows clipped to
the image. The kernels take one whole-batch pass per window offset ``(i, j)`` in row-major
order, over a view of the input that is zero beyond the image, so clipped cells add nothing.

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


def _views(xp: Any, x: Any, g: Geometry, bufs: Any) -> list[Any]:
    """Per window offset ``(i, j)`` (row-major), the ``(N, C, OH, OW)`` cells it reads, zero
    beyond the image."""
    (h, w), (hp, wp) = g.shape[2:], g.padded
    if (hp, wp) != (h, w):
        # NOTE: only the image part is rewritten, so the margin keeps the zeros of allocation.
        xz = bufs.get("sto_x", (*g.shape[:2], hp, wp), fill=0.0)
        xz[:, :, :h, :w] = x
    else:
        xz = x
    (kh, kw), (sh, sw), (oh, ow) = g.kernel, g.stride, g.out
    return [xz[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]


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
    views = _views(xp, x, g, bufs)
    total = bufs.get("sto_total", y.shape)
    total[...] = views[0]
    for v in views[1:]:
        total += v
    # NOTE: the running sum below repeats the additions above in the same order, so its last
    # value equals the total exactly and u = 1 always picks a cell.
    thres = xp.multiply(u, total, out=total)
    cum = bufs.get("sto_cum", y.shape)
    cum[...] = 0
    inside = _inside(xp, g)
    picked = bufs.get("sto_picked", y.shape, dtype=bool)
    picked[...] = ~inside  # empty windows take part as if they had picked already
    hit = bufs.get("sto_hit", y.shape, dtype=bool)
    argk = bufs.get("sto_argk", y.shape, dtype=np.int32)
    argk[...] = 0
    y[...] = 0
    for k, v in enumerate(views):
        cum += v
        xp.greater_equal(cum, thres, out=hit)
        hit &= ~picked
        xp.copyto(y, v, where=hit)
        xp.copyto(argk, k, where=hit)
        picked |= hit
    picked &= inside
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
    views = _views(xp, x, g, bufs)
    s1 = bufs.get("sto_total", y.shape)
    s1[...] = views[0]
    xp.multiply(views[0], views[0], out=y)
    for v in views[1:]:
        s1 += v
        y += v * v
    positive = s1 > 0
    y /= xp.where(positive, s1, 1)
    y *= positive


def geometry(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
             out: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of pooling an ``(N, C, H, W)`` input."""
    return Geometry(tuple(int(d) for d in shape), tuple(kernel), tuple(stride), tuple(out))
