"""2-D depthwise convolution on the host (``group == channels``), compiled by numba.

Output channel ``o`` reads only input channel ``c = o // m`` (channel multiplier
``m = O / C``), so im2col + GEMM degenerates into ``N·O`` products of a ``(1, kh·kw)`` row with
a ``(kh·kw, OH·OW)`` matrix: the copy costs ``kh·kw`` times the input and the product is too
thin for BLAS. These loops read each plane once into cache instead.

Shapes (C-contiguous, float32 or float64): ``x`` ``(N, C, H, W)``, ``w`` ``(O, 1, kh, kw)``,
``b`` ``(O,)``, ``y`` ``(N, O, OH, OW)``, ``OH = (H + 2·ph − (dh·(kh − 1) + 1)) // sh + 1``
(``OW`` likewise).

Forward: ``y[n, o, p, q] = b[o] + Σ_{i, j} w[o, 0, i, j] · x[n, c, p·sh − ph + i·dh,
q·sw − pw + j·dw]`` (zero outside the image).

Backward: ``dx[n, c, h, v] = Σ_{o of c} Σ_{i, j, p, q: p·sh − ph + i·dh = h,
q·sw − pw + j·dw = v} w[o, 0, i, j] · dy[n, o, p, q]`` (overwritten);
``dw[o, 0, i, j] += Σ_{n, p, q} dy[n, o, p, q] · x[n, c, p·sh − ph + i·dh, q·sw − pw + j·dw]``;
``db[o] += Σ_{n, p, q} dy[n, o, p, q]``.

Layout (as pooling's, :mod:`pycaffe_mpi.kernels.pooling`): a plane is copied into its zero-padded
stride phases ``X[a, b][t, u] = x[t·sh + a − ph, u·sw + b − pw]`` (``TH × TW`` each, TW ≥ OW),
where kernel offset ``(i, j)`` of every output ``(p, q)`` is the one flat shift
``X[i·dh mod sh, j·dw mod sw][p + i·dh // sh, q + j·dw // sw]``. So each offset is one
contiguous SIMD pass over a few output rows at a time (``TW − OW`` wasted columns per row, kept
at zero in ``dy``): forward ``acc += w·X[shift]``; weight gradient ``dot(dy, X[shift])``; input
gradient ``dX[shift] += w·dy``, whose image cells are then read back into ``dx``.
NOTE: a first version looped over one output row per offset with clipped ranges; its short rows
(14 and 7 columns) did not vectorise: 26 ms forward+backward for ``conv5_1/dw`` against 17 ms
through im2col; the flat passes take 3.4 ms (MobileNet v1, batch 16, two threads).

Threads: the ``N·C`` planes (each with its ``m`` outputs) are split into contiguous parts with
:func:`pycaffe_mpi.kernels.threads.run`; each lane writes only its planes of ``y``/``dx`` and its
own ``dw``/``db`` partial, summed in lane order.

NOTE: ``cache=True`` keeps the compiled code on disk; this module imports numba, so the layer
imports it on first use (``import pycaffe_mpi`` does not pay for numba).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from pycaffe_mpi.kernels import threads

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
# NOTE: a dot product only vectorises if its sum may be reassociated (partial sums per SIMD
# lane); the order is still fixed for a given build, so results stay deterministic.
_jit_sum = numba.njit(cache=True, nogil=True, boundscheck=False,
                      fastmath={"reassoc", "contract"})

# NOTE: numba checks every signed index for a negative (wrap-around) value, which keeps the inner
# loops from vectorising; they index flat arrays with unsigned offsets, which it does not check
# (offsets that start below zero wrap modulo 2**64 and land right once the column is added).
_u = numba.uint64

# geometry vector ``g`` passed to the kernels (one int64 array instead of a dozen arguments)
_SH, _SW, _PH, _PW, _TH, _TW, _PLANE, _ROWS = range(8)
# NOTE: rows per pass: ~1024 outputs keep the accumulator and the rows it reads in L1.
_CHUNK = 1024


@_jit
def _split(xf: Any, base: int, xph: Any, height: int, width: int, g: Any, clo: Any,
           chi: Any) -> None:
    """The image plane at ``xf[base:]`` into its stride phases ``xph`` (cells outside the image
    are left as they are: zero)."""
    sh, sw, ph, pw, th, tw, plane = g[_SH], g[_SW], g[_PH], g[_PW], g[_TH], g[_TW], g[_PLANE]
    for h in range(height):
        t, a = (h + ph) // sh, (h + ph) % sh
        if t >= th:
            continue
        for b in range(sw):
            d, s = _u((a * sw + b) * plane + t * tw), _u(base + h * width + b - pw)
            for u in range(_u(clo[b]), _u(chi[b])):
                xph[d + u] = xf[s + u * _u(sw)]


@_jit
def _merge(dxph: Any, dxf: Any, base: int, height: int, width: int, g: Any, clo: Any, chi: Any,
           cend: Any) -> None:
    """The image cells of the stride phases ``dxph`` into the plane at ``dxf[base:]``; cells no
    window reads (beyond the last window) get zero."""
    sh, sw, ph, pw, th, tw, plane = g[_SH], g[_SW], g[_PH], g[_PW], g[_TH], g[_TW], g[_PLANE]
    for h in range(height):
        t, a = (h + ph) // sh, (h + ph) % sh
        row = base + h * width
        if t >= th:
            dxf[row:row + width] = 0
            continue
        for b in range(sw):
            s, d = _u((a * sw + b) * plane + t * tw), _u(row + b - pw)
            for u in range(_u(clo[b]), _u(chi[b])):
                dxf[d + u * _u(sw)] = dxph[s + u]
            for u in range(_u(chi[b]), _u(cend[b])):
                dxf[d + u * _u(sw)] = 0


@_jit_sum
def _dot(a: Any, i: int, b: Any, j: int, n: int) -> Any:
    """``Σ_{l<n} a[i + l]·b[j + l]``."""
    total = a.dtype.type(0)
    for k in range(_u(n)):
        total += a[_u(i) + k] * b[_u(j) + k]
    return total


@_jit_sum
def _sum(a: Any, i: int, n: int) -> Any:
    """``Σ_{l<n} a[i + l]``."""
    total = a.dtype.type(0)
    for k in range(_u(n)):
        total += a[_u(i) + k]
    return total


@_jit
def _forward(x: Any, w: Any, bias: Any, y: Any, p0: int, p1: int, g: Any, shift: Any, clo: Any,
             chi: Any) -> None:
    """``y`` for the planes ``p0 ≤ n·C + c < p1`` (all ``m`` outputs of each); ``shift[k]``: where
    kernel offset ``k = i·kw + j`` starts in the phases."""
    _, chans, height, width = x.shape
    _, outs, oh_n, ow_n = y.shape
    taps, m = shift.shape[0], outs // chans
    tw, rows = g[_TW], g[_ROWS]
    xf, yf, wf = x.reshape(-1), y.reshape(-1), w.reshape(-1)
    xph = np.zeros(g[_SH] * g[_SW] * g[_PLANE], x.dtype)
    acc = np.empty(rows * tw, y.dtype)
    for p in range(p0, p1):
        n, c = p // chans, p % chans
        _split(xf, p * height * width, xph, height, width, g, clo, chi)
        for o in range(c * m, c * m + m):
            for r0 in range(0, oh_n, rows):
                r1 = min(oh_n, r0 + rows)
                f0, size = r0 * tw, _u((r1 - r0) * tw)
                acc[:] = bias[o]
                for k in range(taps):
                    wk, s = wf[o * taps + k], _u(shift[k] + f0)
                    for q in range(size):
                        acc[q] += wk * xph[s + q]
                for r in range(r0, r1):
                    d, s = _u(((n * outs + o) * oh_n + r) * ow_n), _u((r - r0) * tw)
                    for q in range(_u(ow_n)):
                        yf[d + q] = acc[s + q]


@_jit
def _backward(x: Any, w: Any, dy: Any, dx: Any, dwp: Any, dbp: Any, p0: int, p1: int,
              want_dx: bool, g: Any, shift: Any, clo: Any, chi: Any, cend: Any) -> None:
    """For the planes ``p0 ≤ n·C + c < p1``: ``dwp`` ``(O, kh·kw)`` and ``dbp`` ``(O,)`` += their
    share of the weight and bias gradients, and (``want_dx``) their planes of ``dx``."""
    _, chans, height, width = x.shape
    _, outs, oh_n, ow_n = dy.shape
    taps, m = shift.shape[0], outs // chans
    tw, rows = g[_TW], g[_ROWS]
    xf, wf, dyf, dxf = x.reshape(-1), w.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    xph = np.zeros(g[_SH] * g[_SW] * g[_PLANE], x.dtype)
    dxph = np.empty(xph.shape[0], x.dtype)
    dyg = np.zeros(oh_n * tw, dy.dtype)  # dy with rows TW apart, the gap columns zero
    for p in range(p0, p1):
        n, c = p // chans, p % chans
        _split(xf, p * height * width, xph, height, width, g, clo, chi)
        if want_dx:
            dxph[:] = 0
        for o in range(c * m, c * m + m):
            for r in range(oh_n):
                s, d = _u(((n * outs + o) * oh_n + r) * ow_n), _u(r * tw)
                for q in range(_u(ow_n)):
                    dyg[d + q] = dyf[s + q]
            for r0 in range(0, oh_n, rows):
                f0, size = r0 * tw, (min(oh_n, r0 + rows) - r0) * tw
                dbp[o] += _sum(dyg, f0, size)
                for k in range(taps):
                    dwp[o, k] += _dot(dyg, f0, xph, shift[k] + f0, size)
                if want_dx:
                    for k in range(taps):
                        wk, d = wf[o * taps + k], _u(shift[k] + f0)
                        for q in range(_u(size)):
                            dxph[d + q] += wk * dyg[_u(f0) + q]
        if want_dx:
            _merge(dxph, dxf, p * height * width, height, width, g, clo, chi, cend)


class Depthwise:
    """One 2-D depthwise convolution's geometry and its threaded forward and backward."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                 dilation: Sequence[int]) -> None:
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.pad, self.dilation = tuple(pad), tuple(dilation)
        self._key: Any = None

    def _geometry(self, size: Sequence[int], out: Sequence[int]) -> tuple[Any, ...]:
        """``(g, shift, clo, chi, cend)`` for an ``H × W`` input and ``OH × OW`` output.

        The phases are ``TH = OH + (kh − 1)·dh // sh`` by ``TW = OW + (kw − 1)·dw // sw``, each
        ``TH·TW + (kw − 1)·dw // sw`` long (the last row's shifted read runs past its end).
        Image column ``v = u·sw + b − pw`` lies in phase ``b`` at ``clo[b] ≤ u < cend[b]``, of
        which ``u < chi[b] = min(cend[b], TW)`` are read by some window.
        """
        key = (tuple(size), tuple(out))
        if self._key == key:
            return self._geom
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        (dh, dw), width, (oh_n, ow_n) = self.dilation, size[1], out
        th, tw = oh_n + (kh - 1) * dh // sh, ow_n + (kw - 1) * dw // sw
        plane = th * tw + (kw - 1) * dw // sw
        rows = max(1, min(oh_n, _CHUNK // tw))
        g = np.array([sh, sw, ph, pw, th, tw, plane, rows], np.int64)
        shift = np.array([((i * dh % sh) * sw + j * dw % sw) * plane
                          + (i * dh // sh) * tw + j * dw // sw
                          for i in range(kh) for j in range(kw)], np.int64)
        clo = np.array([max(0, -((b - pw) // sw)) for b in range(sw)], np.int64)
        cend = np.array([max(0, (width - 1 + pw - b) // sw + 1) for b in range(sw)], np.int64)
        chi = np.maximum(clo, np.minimum(cend, tw))
        cend = np.maximum(cend, chi)
        self._key, self._geom = key, (g, shift, clo, chi, cend)
        return self._geom

    def forward(self, x: Any, w: Any, bias: Any | None, y: Any) -> None:
        """``y = w ⋆ x + b`` (``bias`` ``None``: no bias); shapes as in the module docstring."""
        g, shift, clo, chi, _ = self._geometry(x.shape[2:], y.shape[2:])
        b = bias if bias is not None else np.zeros(y.shape[1], y.dtype)

        def part(lane: int, lo: int, hi: int) -> None:
            _forward(x, w, b, y, lo, hi, g, shift, clo, chi)

        threads.run(part, x.shape[0] * x.shape[1])

    def backward(self, x: Any, w: Any, dy: Any, dw: Any, db: Any | None, dx: Any | None) -> None:
        """``dw += Σ dy·x``; ``db += Σ dy`` (unless ``None``); ``dx`` overwritten (unless
        ``None``)."""
        geom = self._geometry(x.shape[2:], dy.shape[2:])
        dx_arg = dx if dx is not None else np.empty((1, 1, 1, 1), x.dtype)
        outs, taps = dy.shape[1], len(geom[1])

        def part(lane: int, lo: int, hi: int) -> tuple[Any, Any]:
            dwp, dbp = np.zeros((outs, taps), dy.dtype), np.zeros(outs, dy.dtype)
            _backward(x, w, dy, dx_arg, dwp, dbp, lo, hi, dx is not None, *geom)
            return dwp, dbp

        parts = threads.run(part, x.shape[0] * x.shape[1])
        dwp, dbp = parts[0]
        for more_dw, more_db in parts[1:]:
            dwp += more_dw
            dbp += more_db
        dw += dwp.reshape(dw.shape)
        if db is not None:
            db += dbp
