"""CPU kernels compiled by numba: the memory-bound passes of MAX and AVE pooling.

NumPy runs pooling as several whole-array operations per window offset, each a pass through
memory; these loops do each offset in one fused pass over data in the CPU cache (see
:mod:`pycaffe_mpi.kernels.pooling` for the layout). Arrays are C-contiguous; each function works
for float32 and float64 (numba compiles one version per argument types on first use).

NOTE: ``cache=True`` keeps the compiled code on disk (``__pycache__``), so only the first process
on a machine (or after this file changes) pays the compile time: 9-18 s for the four pooling
kernels in both dtypes on a loaded 2-core machine; later processes load them in ~0.3 s. numba is
imported here, and this module is imported on first use by :mod:`~pycaffe_mpi.kernels.pooling`,
so ``import pycaffe_mpi`` does not pay numba's import time.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


# -- pooling over (planes, H, W) ---------------------------------------------------------------
# Window (oh, ow) covers rows oh·sh − ph + i, i < kh, and columns ow·sw − pw + j, j < kw, clipped
# to the image; ``arg`` holds the offset i·kw + j of its first maximum in row-major order
# (Caffe's strict ``>``).


# NOTE: numba checks every signed index for a negative (wrap-around) value; in these short
# inner loops the check costs as much as the copy (measured 1.8x on the split), so the copies
# index flat arrays with unsigned offsets, which it does not check.
_u = numba.uint64


@_jit
def _phase_index(xph: Any, height: int, width: int, tw: int, ph: int,
                 pw: int) -> tuple[Any, Any, Any]:
    """Where image rows and columns land in the flat stride-phase planes ``xph``
    ``(sh, sw, n)``: row ``h`` of plane 0 starts at ``rows[h] + b·n + u`` for the columns
    ``u·sw + b − pw``, ``lo[b] ≤ u < hi[b]``.

    NOTE: set up once per call, not per row: the integer divisions cost more than a row copy
    (the split measured 1.5x faster)."""
    sh, sw, n = xph.shape
    lo, hi = np.empty(sw, np.int64), np.empty(sw, np.int64)
    for b in range(sw):
        lo[b] = max(0, (pw - b + sw - 1) // sw)
        hi[b] = (width - 1 + pw - b) // sw + 1
    rows = np.empty(height, np.int64)
    for h in range(height):
        rows[h] = (h + ph) // sh * tw + (h + ph) % sh * sw * n
    return lo, hi, rows


@_jit
def _split(x: Any, p0: int, m: int, xph: Any, th: int, tw: int, ph: int, pw: int) -> None:
    """Planes ``p0:p0+m`` of ``x`` into the stride-phase planes ``xph`` ``(sh, sw, n)``:
    ``xph[a, b, q·th·tw + t·tw + u] = x[p0 + q, t·sh + a − ph, u·sw + b − pw]``; cells that no
    image cell lands on are left as they are (the caller fills them with the padding value)."""
    sw, n = xph.shape[1], xph.shape[2]
    _, height, width = x.shape
    dst, src, step = xph.reshape(-1), x.reshape(-1), _u(sw)
    lo, hi, rows = _phase_index(xph, height, width, tw, ph, pw)
    for q in range(m):
        for h in range(height):
            row, start = ((p0 + q) * height + h) * width, q * th * tw + rows[h]
            for b in range(sw):
                d, s = _u(start + b * n), _u(row + b - pw)
                for u in range(_u(lo[b]), _u(hi[b])):
                    dst[d + u] = src[s + u * step]


@_jit
def max_pool_forward(x: Any, y: Any, arg: Any, xph: Any, best: Any, at: Any, kh: int, kw: int,
                     th: int, tw: int, ph: int, pw: int) -> None:
    """``y``, ``arg`` of ``x`` ``(planes, H, W)``; ``xph`` ``(sh, sw, n + slack)`` holds -inf
    wherever no image cell lands, ``best``/``at`` ``(n,)`` are scratch, ``n`` a multiple of
    ``th·tw``."""
    planes = x.shape[0]
    _, oh_n, ow_n = y.shape
    sh, sw = xph.shape[0], xph.shape[1]
    per = th * tw
    chunk = best.shape[0] // per
    yf, af = y.reshape(-1), arg.reshape(-1)
    # NOTE: on the stride-phase planes every window offset is one flat shift, so each offset is
    # one contiguous SIMD pass over a cache-sized chunk of planes (a loop per window, or per
    # output row, runs 2x slower: its loops are too short to vectorise).
    for p0 in range(0, planes, chunk):
        m = min(chunk, planes - p0)
        n = m * per
        _split(x, p0, m, xph, th, tw, ph, pw)
        first = xph[0, 0]
        for o in range(n):
            best[o] = first[o]
            at[o] = 0
        for i in range(kh):
            for j in range(kw):
                if i + j == 0:
                    continue
                shift = (i // sh) * tw + j // sw
                src = xph[i % sh, j % sw, shift:shift + n]
                k = at.dtype.type(i * kw + j)
                for o in range(n):
                    v, b = src[o], best[o]
                    gt = v > b
                    best[o] = v if gt else b
                    at[o] = k if gt else at[o]
        for q in range(m):
            for oh in range(oh_n):
                o, d = _u(q * per + oh * tw), _u(((p0 + q) * oh_n + oh) * ow_n)
                for ow in range(_u(ow_n)):
                    yf[d + ow] = best[o + ow]
                    af[d + ow] = at[o + ow]


@_jit
def max_pool_backward(dy: Any, arg: Any, dx: Any, kh: int, kw: int, sh: int, sw: int, ph: int,
                      pw: int) -> None:
    """``dx`` (overwritten) = ``dy`` routed to the offsets ``arg`` of :func:`max_pool_forward`,
    overlapping windows adding up."""
    planes, oh_n, ow_n = dy.shape
    _, height, width = dx.shape
    dx[:] = 0
    dxf, dyf, af = dx.reshape(-1), dy.reshape(-1), arg.reshape(-1)
    # flat input offset of each window offset (no division per output)
    off = np.empty(kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            off[i * kw + j] = i * width + j
    for p in range(planes):
        for oh in range(oh_n):
            base = (p * height + oh * sh - ph) * width - pw
            o = _u((p * oh_n + oh) * ow_n)
            for ow in range(_u(ow_n)):
                dxf[_u(base + ow * sw + off[af[o + ow]])] += dyf[o + ow]


@_jit
def _merge(dxph: Any, p0: int, m: int, dx: Any, th: int, tw: int, ph: int, pw: int) -> None:
    """Adjoint of :func:`_split`: planes ``p0:p0+m`` of ``dx`` = the image cells of the
    stride-phase planes ``dxph``."""
    sw, n = dxph.shape[1], dxph.shape[2]
    _, height, width = dx.shape
    src, dst, step = dxph.reshape(-1), dx.reshape(-1), _u(sw)
    lo, hi, rows = _phase_index(dxph, height, width, tw, ph, pw)
    for q in range(m):
        for h in range(height):
            row, start = ((p0 + q) * height + h) * width, q * th * tw + rows[h]
            for b in range(sw):
                s, d = _u(start + b * n), _u(row + b - pw)
                for u in range(_u(lo[b]), _u(hi[b])):
                    dst[d + u * step] = src[s + u]


@_jit
def ave_pool_forward(x: Any, y: Any, inv_area: Any, xph: Any, acc: Any, kh: int, kw: int,
                     th: int, tw: int, ph: int, pw: int) -> None:
    """``y`` = window sums of ``x`` ``(planes, H, W)`` times ``inv_area`` ``(OH, OW)``;
    ``xph`` as :func:`max_pool_forward`'s but holding 0 where no image cell lands, ``acc``
    ``(n,)`` scratch."""
    planes = x.shape[0]
    _, oh_n, ow_n = y.shape
    sh, sw = xph.shape[0], xph.shape[1]
    per = th * tw
    chunk = acc.shape[0] // per
    yf = y.reshape(-1)
    for p0 in range(0, planes, chunk):
        m = min(chunk, planes - p0)
        n = m * per
        _split(x, p0, m, xph, th, tw, ph, pw)
        first = xph[0, 0]
        for o in range(n):
            acc[o] = first[o]
        for i in range(kh):
            for j in range(kw):
                if i + j == 0:
                    continue
                shift = (i // sh) * tw + j // sw
                src = xph[i % sh, j % sw, shift:shift + n]
                for o in range(n):
                    acc[o] += src[o]
        for q in range(m):
            for oh in range(oh_n):
                o, d = _u(q * per + oh * tw), _u(((p0 + q) * oh_n + oh) * ow_n)
                for ow in range(_u(ow_n)):
                    yf[d + ow] = acc[o + ow] * inv_area[oh, ow]


@_jit
def ave_pool_backward(dy: Any, inv_area: Any, dx: Any, dxph: Any, acc: Any, kh: int, kw: int,
                      th: int, tw: int, ph: int, pw: int) -> None:
    """``dx`` (overwritten) = Σ over the windows holding a cell of ``dy · inv_area``, through
    the stride-phase planes: each window offset adds ``dy · inv_area`` shifted into its phase
    (contiguous passes), then the image cells are read back (:func:`_merge`)."""
    planes = dy.shape[0]
    _, oh_n, ow_n = dy.shape
    sh, sw = dxph.shape[0], dxph.shape[1]
    per = th * tw
    chunk = acc.shape[0] // per
    dyf = dy.reshape(-1)
    for p0 in range(0, planes, chunk):
        m = min(chunk, planes - p0)
        n = m * per
        acc[:n] = 0
        for q in range(m):
            for oh in range(oh_n):
                o, d = _u(q * per + oh * tw), _u(((p0 + q) * oh_n + oh) * ow_n)
                for ow in range(_u(ow_n)):
                    acc[o + ow] = dyf[d + ow] * inv_area[oh, ow]
        dxph[:] = 0
        for i in range(kh):
            for j in range(kw):
                shift = (i // sh) * tw + j // sw
                dst = dxph[i % sh, j % sw, shift:shift + n]
                for o in range(n):
                    dst[o] += acc[o]
        _merge(dxph, p0, m, dx, th, tw, ph, pw)
