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
gradient, phase by phase, ``dX_P[f] = Σ_{offsets of P} w·dy[f − shift]`` (each cell written
once), whose image cells are then read back into ``dx``.
NOTE: a first version looped over one output row per offset with clipped ranges; its short rows
(14 and 7 columns) did not vectorise: ``conv5_1/dw`` forward+backward took 25.3 ms, the flat
passes 7.9 ms (MobileNet v1, batch 16, one thread).
NOTE: MobileNet v1, batch 16, AMD EPYC 2 cores, one quiet run, against the im2col plan: its 13
depthwise layers forward+backward 444.8 → 99.0 ms, the train step 990.8 → 648.1 ms, peak RSS
1218 → 1059 MiB.

Threads: the ``N·C`` planes (each with its ``m`` outputs) are split into contiguous parts with
:func:`pycaffe_mpi.kernels.threads.run` (planes, not images, so that one image still fills the
cores); each lane writes only its planes of ``y``/``dx`` and its own ``dw``/``db`` partial, summed
in lane order.

NOTE: ``cache=True`` keeps the compiled code on disk: the first process compiles for ~5 s
(float32, loaded 2-core machine), later ones load it in 0.3 s. This module imports numba, so the
layer imports it on first use (``import pycaffe_mpi`` does not pay for numba).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from pycaffe_mpi.kernels import threads

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)
# NOTE: a dot product only vectorises if its sum may be reassociated (partial sums per SIMD
# lane), and ``a·b + c`` becomes one FMA instruction only if it may be contracted; the order is
# still fixed for a given build, so results stay deterministic.
_jit_fast = numba.njit(cache=True, nogil=True, boundscheck=False,
                       fastmath={"reassoc", "contract"})

# NOTE: numba checks every signed index for a negative (wrap-around) value, which keeps the inner
# loops from vectorising; they index flat arrays with unsigned offsets, which it does not check
# (offsets that start below zero wrap modulo 2**64 and land right once the column is added).
_u = numba.uint64

# geometry vector ``g`` passed to the kernels (one int64 array instead of a dozen arguments)
_SH, _SW, _PH, _PW, _TH, _TW, _PLANE, _ROWS, _LO, _HI, _FRONT = range(11)
# NOTE: rows per pass: ~1024 outputs keep the accumulator and the rows it reads in L1.
_CHUNK = 1024


@_jit
def _split(xf: Any, base: int, xph: Any, height: int, width: int, g: Any, edge: Any) -> None:
    """The image plane at ``xf[base:]`` into its stride phases ``xph`` (cells outside the image
    are left as they are: zero): columns ``[g[_LO], g[_HI])`` of every phase, then the
    ``(phase, column)`` pairs ``edge`` that only some phases have."""
    sh, sw, ph, pw, th, tw, plane = g[_SH], g[_SW], g[_PH], g[_PW], g[_TH], g[_TW], g[_PLANE]
    lo, n = g[_LO], _u(g[_HI] - g[_LO])
    step, one, two = _u(sw), _u(1), _u(2)
    # NOTE: the phase row (t, a) of image row h is stepped, not divided: two integer divisions
    # per row cost more than copying a 14-column row (conv5_1/dw's split, one thread: 1.30 →
    # 1.12 ms)
    t, a = ph // sh, ph % sh
    for h in range(height):
        if h:
            a += 1
            if a == sh:
                t, a = t + 1, 0
        if t >= th:
            continue
        d, s = _u(a * sw * plane + t * tw), _u(base + h * width - pw)
        # NOTE: the loops below start at 0 and use unsigned constants: only then does LLVM
        # vectorise them (for stride 2 with paired loads and shuffles: 0.44 → 0.06 ns a float)
        dm, sm = d + _u(lo), s + _u(lo * sw)
        if sw == 1:
            for q in range(n):
                xph[dm + q] = xf[sm + q]
        elif sw == 2:
            d1 = dm + _u(plane)
            for q in range(n):
                xph[dm + q] = xf[sm + two * q]
                xph[d1 + q] = xf[sm + two * q + one]
        else:
            for b in range(sw):
                db, sb = dm + _u(b * plane), sm + _u(b)
                for q in range(n):
                    xph[db + q] = xf[sb + q * step]
        # NOTE: the edge columns after the row, whose cache lines the row brought in: before
        # it they cost 1.5 of conv2_2/dw's 5.5 ms split (batch 16, one thread)
        for e in range(edge.shape[0]):
            b, u = edge[e, 0], edge[e, 1]
            xph[d + _u(b * plane + u)] = xf[s + _u(b + u * sw)]


@_jit
def _merge(dxph: Any, dxf: Any, base: int, height: int, width: int, g: Any, edge: Any,
           zero: Any) -> None:
    """The image cells of the stride phases ``dxph`` into the plane at ``dxf[base:]`` (the
    adjoint of :func:`_split`); the ``(phase, column)`` cells ``zero``, which no window reads
    (beyond the last window), get zero."""
    sh, sw, ph, pw, th, tw, plane = g[_SH], g[_SW], g[_PH], g[_PW], g[_TH], g[_TW], g[_PLANE]
    lo, n = g[_LO], _u(g[_HI] - g[_LO])
    step, one, two = _u(sw), _u(1), _u(2)
    t, a = ph // sh, ph % sh
    for h in range(height):
        if h:
            a += 1
            if a == sh:
                t, a = t + 1, 0
        row = base + h * width
        if t >= th:
            dxf[row:row + width] = 0
            continue
        s, d = _u(a * sw * plane + t * tw), _u(row - pw)
        sm, dm = s + _u(lo), d + _u(lo * sw)
        if sw == 1:
            for q in range(n):
                dxf[dm + q] = dxph[sm + q]
        elif sw == 2:
            s1 = sm + _u(plane)
            for q in range(n):
                dxf[dm + two * q] = dxph[sm + q]
                dxf[dm + two * q + one] = dxph[s1 + q]
        else:
            for b in range(sw):
                sb, db = sm + _u(b * plane), dm + _u(b)
                for q in range(n):
                    dxf[db + q * step] = dxph[sb + q]
        for e in range(edge.shape[0]):
            b, u = edge[e, 0], edge[e, 1]
            dxf[d + _u(b + u * sw)] = dxph[s + _u(b * plane + u)]
        for e in range(zero.shape[0]):
            dxf[d + _u(zero[e, 0] + zero[e, 1] * sw)] = 0


@_jit_fast
def _dot(a: Any, i: int, b: Any, j: int, n: int) -> Any:
    """``Σ_{l<n} a[i + l]·b[j + l]``."""
    total = a.dtype.type(0)
    for k in range(_u(n)):
        total += a[_u(i) + k] * b[_u(j) + k]
    return total


@_jit_fast
def _dot3(a: Any, i: int, b: Any, j0: int, j1: int, j2: int, n: int) -> tuple[Any, Any, Any]:
    """:func:`_dot` of ``a[i:]`` with three runs of ``b`` in one pass (``a`` read once)."""
    s0 = s1 = s2 = a.dtype.type(0)
    i, j0, j1, j2 = _u(i), _u(j0), _u(j1), _u(j2)
    for k in range(_u(n)):
        v = a[i + k]
        s0 += v * b[j0 + k]
        s1 += v * b[j1 + k]
        s2 += v * b[j2 + k]
    return s0, s1, s2


@_jit
def _weight_grad(dwo: Any, dyg: Any, f0: int, xph: Any, shift: Any, r: int, size: int) -> None:
    """``dwo[k] += Σ_{l<size} dyg[f0 + l]·xph[shift[k] + r + l]`` for every kernel offset
    ``k``, three at a time.

    NOTE: three offsets per pass read ``dy`` a third as often: 0.058 → 0.039 ns per output and
    offset (3x3, 912-output passes in L1, one thread)."""
    taps, k = shift.shape[0], 0
    while k + 3 <= taps:
        s0, s1, s2 = _dot3(dyg, f0, xph, shift[k] + r, shift[k + 1] + r, shift[k + 2] + r, size)
        dwo[k] += s0
        dwo[k + 1] += s1
        dwo[k + 2] += s2
        k += 3
    while k < taps:
        dwo[k] += _dot(dyg, f0, xph, shift[k] + r, size)
        k += 1


@_jit_fast
def _sum(a: Any, i: int, n: int) -> Any:
    """``Σ_{l<n} a[i + l]``."""
    total = a.dtype.type(0)
    for k in range(_u(n)):
        total += a[_u(i) + k]
    return total


@_jit_fast
def _taps(acc: Any, n: int, src: Any, at: Any, w: Any, k0: int, k1: int, sign: int,
          f0: int) -> None:
    """``acc[:n] += Σ_{k0≤k<k1} w[k]·src[f0 + sign·at[k] + l]``, three offsets per pass (the
    last one or two together).

    NOTE: three offsets per pass store the accumulator a third as often as one: 0.059 → 0.043 ns
    per output and offset (3x3, 912-output passes in L1, one thread)."""
    size = _u(n)
    k = k0
    while k + 3 <= k1:
        wa, wb, wc = w[k], w[k + 1], w[k + 2]
        sa, sb, sc = _u(f0 + sign * at[k]), _u(f0 + sign * at[k + 1]), _u(f0 + sign * at[k + 2])
        for q in range(size):
            acc[q] += wa * src[sa + q] + wb * src[sb + q] + wc * src[sc + q]
        k += 3
    # NOTE: stride 2 splits a 3x3 kernel into phases of 4, 2, 2 and 1 offsets; the two of a
    # pair in one pass: 0.177 → 0.123 ns per output and offset (8x8 phases, one thread)
    if k + 2 == k1:
        wa, wb = w[k], w[k + 1]
        sa, sb = _u(f0 + sign * at[k]), _u(f0 + sign * at[k + 1])
        for q in range(size):
            acc[q] += wa * src[sa + q] + wb * src[sb + q]
    elif k + 1 == k1:
        wa, sa = w[k], _u(f0 + sign * at[k])
        for q in range(size):
            acc[q] += wa * src[sa + q]


@_jit
def _forward(x: Any, w: Any, bias: Any, y: Any, p0: int, p1: int, g: Any, shift: Any,
             edge: Any) -> None:
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
        _split(xf, p * height * width, xph, height, width, g, edge)
        for o in range(c * m, c * m + m):
            wo = wf[o * taps:(o + 1) * taps]
            for r0 in range(0, oh_n, rows):
                r1 = min(oh_n, r0 + rows)
                acc[:] = bias[o]
                _taps(acc, (r1 - r0) * tw, xph, shift, wo, 0, taps, 1, r0 * tw)
                for r in range(r0, r1):
                    d, s = _u(((n * outs + o) * oh_n + r) * ow_n), _u((r - r0) * tw)
                    for q in range(_u(ow_n)):
                        yf[d + q] = acc[s + q]


@_jit
def _backward(x: Any, w: Any, dy: Any, dx: Any, dwp: Any, dbp: Any, p0: int, p1: int,
              want_dx: bool, g: Any, shift: Any, edge: Any, zero: Any, order: Any, off: Any,
              first: Any) -> None:
    """For the planes ``p0 ≤ n·C + c < p1``: ``dwp`` ``(O, kh·kw)`` and ``dbp`` ``(O,)`` += their
    share of the weight and bias gradients, and (``want_dx``) their planes of ``dx``.

    The input gradient is gathered phase by phase: phase ``P``'s kernel offsets are
    ``order[first[P]:first[P + 1]]``, at ``off`` within it, and
    ``dX_P[f] = Σ_{o of c} Σ_{k of P} w[o, k]·dyg_o[f − off[k]]``, ``dyg`` being ``dy`` with rows
    ``TW`` apart behind ``g[_FRONT]`` zeros, so that every phase cell is written once."""
    _, chans, height, width = x.shape
    _, outs, oh_n, ow_n = dy.shape
    taps, m = shift.shape[0], outs // chans
    tw, rows, plane, front = g[_TW], g[_ROWS], g[_PLANE], g[_FRONT]
    xf, wf, dyf, dxf = x.reshape(-1), w.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    phases, cells = first.shape[0] - 1, g[_TH] * tw
    xph = np.zeros(g[_SH] * g[_SW] * plane, x.dtype)
    dxph = np.empty(xph.shape[0], x.dtype)
    lead = front + plane
    dyg = np.zeros(m * lead, dy.dtype)  # the gap columns and the border stay zero
    wsorted = np.empty(m * taps, w.dtype)  # w[o, order]
    for p in range(p0, p1):
        n, c = p // chans, p % chans
        _split(xf, p * height * width, xph, height, width, g, edge)
        for e in range(m):
            o = c * m + e
            for r in range(oh_n):
                s, d = _u(((n * outs + o) * oh_n + r) * ow_n), _u(e * lead + front + r * tw)
                for q in range(_u(ow_n)):
                    dyg[d + q] = dyf[s + q]
            for r0 in range(0, oh_n, rows):
                f0, size = e * lead + front + r0 * tw, (min(oh_n, r0 + rows) - r0) * tw
                dbp[o] += _sum(dyg, f0, size)
                _weight_grad(dwp[o], dyg, f0, xph, shift, r0 * tw, size)
            for k in range(taps):
                wsorted[e * taps + k] = wf[o * taps + order[k]]
        if not want_dx:
            continue
        for ph_i in range(phases):
            base = ph_i * plane
            for f0 in range(0, cells, rows * tw):
                size = min(cells - f0, rows * tw)
                acc = dxph[base + f0:base + f0 + size]
                acc[:] = 0
                for e in range(m):
                    _taps(acc, size, dyg, off, wsorted[e * taps:(e + 1) * taps], first[ph_i],
                          first[ph_i + 1], -1, e * lead + front + f0)
        _merge(dxph, dxf, p * height * width, height, width, g, edge, zero)


class Depthwise:
    """One 2-D depthwise convolution's geometry and its threaded forward and backward."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                 dilation: Sequence[int]) -> None:
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.pad, self.dilation = tuple(pad), tuple(dilation)
        self._key: Any = None

    def _geometry(self, size: Sequence[int], out: Sequence[int]) -> tuple[Any, ...]:
        """``(g, shift, edge, zero, order, off, first)`` for an ``H × W`` input and an
        ``OH × OW`` output.

        The phases are ``TH = OH + (kh − 1)·dh // sh`` by ``TW = OW + (kw − 1)·dw // sw``, each
        ``TH·TW + (kw − 1)·dw // sw`` long (the last row's shifted read runs past its end).
        Kernel offset ``k = i·kw + j`` reads phase ``P = (i·dh mod sh)·sw + j·dw mod sw`` at
        ``off = (i·dh // sh)·TW + j·dw // sw``; ``shift[k] = P·plane + off``; ``order`` lists the
        offsets by phase, phase ``P``'s being ``order[first[P]:first[P + 1]]`` (``off`` in that
        order). Image column ``v = u·sw + b − pw`` lies in phase ``b`` at
        ``clo[b] ≤ u < cend[b]``, of which ``u < chi[b] = min(cend[b], TW)`` are read: those
        in ``[LO, HI)`` in every phase, the others listed in ``edge`` as ``(b, u)``; ``zero``
        lists the unread ones.
        """
        key = (tuple(size), tuple(out))
        if self._key == key:
            return self._geom
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        (dh, dw), width, (oh_n, ow_n) = self.dilation, size[1], out
        th, tw = oh_n + (kh - 1) * dh // sh, ow_n + (kw - 1) * dw // sw
        plane = th * tw + (kw - 1) * dw // sw
        rows = max(1, min(oh_n, _CHUNK // tw))
        phase = [(i * dh % sh) * sw + j * dw % sw for i in range(kh) for j in range(kw)]
        offs = [(i * dh // sh) * tw + j * dw // sw for i in range(kh) for j in range(kw)]
        shift = np.array([q * plane + f for q, f in zip(phase, offs)], np.int64)
        order = np.array(sorted(range(kh * kw), key=lambda k: phase[k]), np.int64)
        first = np.searchsorted(np.array(phase)[order], np.arange(sh * sw + 1)).astype(np.int64)
        clo = np.array([max(0, -((b - pw) // sw)) for b in range(sw)], np.int64)
        cend = np.array([max(0, (width - 1 + pw - b) // sw + 1) for b in range(sw)], np.int64)
        chi = np.maximum(clo, np.minimum(cend, tw))
        cend = np.maximum(cend, chi)
        lo = int(clo.max())
        hi = max(lo, int(chi.min()))
        g = np.array([sh, sw, ph, pw, th, tw, plane, rows, lo, hi, max(offs)], np.int64)
        edge = [(b, u) for b in range(sw) for u in range(clo[b], chi[b]) if not lo <= u < hi]
        zero = [(b, u) for b in range(sw) for u in range(chi[b], cend[b])]
        self._geom = (g, shift, np.array(edge, np.int64).reshape(-1, 2),
                      np.array(zero, np.int64).reshape(-1, 2), order,
                      np.array(offs, np.int64)[order], first)
        self._key = key
        return self._geom

    def forward(self, x: Any, w: Any, bias: Any | None, y: Any) -> None:
        """``y = w ⋆ x + b`` (``bias`` ``None``: no bias); shapes as in the module docstring."""
        g, shift, edge = self._geometry(x.shape[2:], y.shape[2:])[:3]
        b = bias if bias is not None else np.zeros(y.shape[1], y.dtype)

        def part(lane: int, lo: int, hi: int) -> None:
            _forward(x, w, b, y, lo, hi, g, shift, edge)

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
