"""2-D max/average pooling and centred window sums, generic over ``xp`` (NumPy or CuPy).

Output cell ``(oh, ow)`` with kernel offset ``(i, j)`` reads input ``(oh·s_h − pad_h + i,
ow·s_w − pad_w + j)``; windows are clipped to the image (MAX: padding never wins; AVE: padded
cells add nothing to the sum, but count in Caffe's divisor, :func:`ave_divisor`).

MAX keeps, per output cell, the offset ``i·k_w + j`` of the first maximum in row-major window
order (Caffe's strict ``>``); backward routes ``dy`` to it, overlapping windows adding up.

MAX on the CPU is compiled (:mod:`pycaffe_mpi.kernels.numba_cpu`): the forward copies a
cache-sized chunk of planes into "stride phases", ``X[a][b][t, u] = xpad[t·s_h + a, u·s_w + b]``
(``T_h × T_w`` each), where window offset ``(i, j)`` of every output is one flat shift of phase
``(i mod s_h, j mod s_w)``, and takes the maximum and its offset in one contiguous SIMD pass per
offset; the backward scatters ``dy`` to the recorded offsets. NOTE: this replaced NumPy passes
(4 array operations per offset): forward + backward of CIFAR10-Quick's pool1 measured 2.3-3x
faster (batch 350 and 100). AVE stays NumPy passes over the same phase planes (separable: rows,
then columns); its compiled loops measured slower (0.7x). On a GPU the CUDA kernels of
:mod:`pycaffe_mpi.kernels.cuda` do this work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from pycaffe_mpi.kernels import cuda as cuda_k


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool = True) -> int:
    """Caffe's pooled length: ``ceil((in + 2·pad − k) / s) + 1`` (floor when not ``ceil_mode``),
    minus one when ``pad > 0`` and the last window would start in the right padding."""
    span = size + 2 * pad - kernel
    pooled = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if pad > 0 and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


class Geometry(NamedTuple):
    """One 2-D pooling of an ``(N, C, H, W)`` input, seen as ``planes = N·C`` images."""

    planes: int  # N·C
    size: tuple[int, int]  # (H, W)
    out: tuple[int, int]  # (OH, OW)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]

    @property
    def arg_dtype(self) -> Any:
        """The narrowest type holding a window offset ``i·k_w + j``."""
        return np.uint8 if self.kernel[0] * self.kernel[1] <= 256 else np.int32

    @property
    def length(self) -> tuple[int, int]:
        """``(T_h, T_w)``: the stride-phase planes' size (see :func:`max_forward`), long enough
        that every window offset's shift stays inside its plane for the outputs kept."""
        return tuple(max(o + (k - 1) // s, -(-(sz + p) // s))  # type: ignore[return-value]
                     for sz, k, s, p, o in zip(self.size, self.kernel, self.stride, self.pad,
                                               self.out))

    @property
    def count(self) -> int:
        """Elements of one set of phase planes, ``planes·T_h·T_w``."""
        return self.planes * self.length[0] * self.length[1]

    def shift(self, i: int, j: int) -> int:
        """Flat shift of window offset ``(i, j)`` within the planes of its phase."""
        return (i // self.stride[0]) * self.length[1] + j // self.stride[1]

    @property
    def slack(self) -> int:
        """Cells after the last plane read by the largest shift."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        return (kh - 1) // sh * self.length[1] + (kw - 1) // sw + 1

    def args(self) -> tuple[int, ...]:
        """``k_h, k_w, s_h, s_w, pad_h, pad_w``."""
        return (*self.kernel, *self.stride, *self.pad)


def geometry(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
             pad: Sequence[int], out: Sequence[int]) -> Geometry:
    """The :class:`Geometry` of pooling an input of ``shape`` ``(N, C, H, W)``."""
    n, c, h, w = shape
    return Geometry(n * c, (h, w), (out[0], out[1]), (kernel[0], kernel[1]),
                    (stride[0], stride[1]), (pad[0], pad[1]))


# NOTE: the forward runs over chunks of planes of this many cells (~128 KB in float32), so its
# passes read what the previous one wrote from the CPU cache, not from memory.
MAX_CHUNK_ELEMENTS = 1 << 15


def _jit() -> Any:
    # NOTE: imported on first use, so that importing the package does not import numba
    from pycaffe_mpi.kernels import numba_cpu

    return numba_cpu


def _as_planes(a: Any, hw: Sequence[int]) -> Any:
    return a.reshape(-1, *hw)


def _phase_buffers(g: Geometry, bufs: Any, fill: float) -> tuple[Any, Any]:
    """The stride-phase planes of a chunk, ``(s_h, s_w, n + slack)``, filled with the padding
    value ``fill`` where no image cell lands, and an ``(n,)`` accumulator."""
    per = g.length[0] * g.length[1]
    n = per * max(1, min(g.planes, MAX_CHUNK_ELEMENTS // per))
    return bufs.get("xph", (*g.stride, n + g.slack), fill=fill), bufs.get("acc", (n,))


def max_forward(xp: Any, x: Any, top: Any, g: Geometry, bufs: Any) -> None:
    """``top`` = the maximum over each window of ``x`` ``(N, C, H, W)``.

    ``bufs.get(name, shape, fill=None, dtype=None)`` gives scratch arrays kept between calls; the
    argmax offsets stay there for :func:`max_argk` and :func:`max_backward`.
    """
    if cuda_k.enabled(xp):
        cuda_k.max_pool_forward(x, top, g, bufs)
        return
    arg = bufs.get("arg", (g.planes, *g.out), dtype=g.arg_dtype)
    xph, best = _phase_buffers(g, bufs, -np.inf)
    at = bufs.get("at", best.shape, dtype=g.arg_dtype)
    _jit().max_pool_forward(_as_planes(x, g.size), _as_planes(top, g.out), arg, xph, best, at,
                            *g.kernel, *g.length, *g.pad)


def max_argk(xp: Any, g: Geometry, bufs: Any) -> Any:
    """Offset ``i·kw + j`` of each window's maximum (found by the last :func:`max_forward`),
    ``(planes, OH, OW)`` int64."""
    if cuda_k.enabled(xp):
        return cuda_k.max_pool_argk(xp, g, bufs)
    return bufs.get("arg", (g.planes, *g.out), dtype=g.arg_dtype).astype(np.int64)


def max_backward(xp: Any, dy: Any, dx: Any, g: Geometry, bufs: Any) -> None:
    """``dx`` (overwritten) = each window's ``dy`` routed to its maximum (found by the last
    :func:`max_forward`); overlapping windows add up."""
    if cuda_k.enabled(xp):
        cuda_k.max_pool_backward(dy, dx, g, bufs)
        return
    arg = bufs.get("arg", (g.planes, *g.out), dtype=g.arg_dtype)
    _jit().max_pool_backward(_as_planes(dy, g.out), arg, _as_planes(dx, g.size), *g.args())


def ave_divisor(size_hw: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                pad: Sequence[int], out_hw: Sequence[int]) -> np.ndarray:
    """Caffe's AVE window area per output cell, ``(OH, OW)`` float64 on the host.

    The window is clipped to ``[−pad, in + pad)``: padded cells count, the ceil overhang does not.
    """
    areas = []
    for size, k, s, p, o in zip(size_hw, kernel, stride, pad, out_hw):
        start = np.arange(o) * s - p
        areas.append(np.minimum(start + k, size + p) - start)
    return np.outer(areas[0], areas[1]).astype(np.float64)


# -- AVE: NumPy passes over stride-phase planes -------------------------------------------------

# NOTE: passes run over chunks of this many elements per array (~1 MB in float32), so each
# pass reads what the previous one wrote from the CPU cache, not from memory.
CHUNK_ELEMENTS = 1 << 18


def _image_phase(g: Geometry, a: int, b: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(image rows/cols, plane rows/cols)`` slices pairing the image with phase ``(a, b)``."""
    pairs = []
    for size, s, p, phase in zip(g.size, g.stride, g.pad, (a, b)):
        first = (phase - p) % s  # first image index in this phase
        count = len(range(first, size, s))
        start = (first + p) // s
        pairs.append((slice(first, size, s), slice(start, start + count)))
    return (pairs[0][0], pairs[1][0]), (pairs[0][1], pairs[1][1])


def chunks(xp: Any, g: Geometry) -> list[tuple[int, int]]:
    """Plane ranges ``(p0, p1)`` processed together: whole passes stay in the CPU cache."""
    per = g.length[0] * g.length[1]
    step = g.planes if xp is not np else max(1, CHUNK_ELEMENTS // per)
    return [(p0, min(p0 + step, g.planes)) for p0 in range(0, g.planes, step)]


def _planes(flat: Any, g: Geometry, p0: int, p1: int) -> Any:
    """Planes ``p0:p1`` of a flat phase buffer viewed as ``(p1 − p0, T_h, T_w)``."""
    per = g.length[0] * g.length[1]
    return flat[p0 * per:p1 * per].reshape(p1 - p0, *g.length)


def split(x: Any, xph: Any, g: Geometry, p0: int, p1: int) -> None:
    """Write planes ``p0:p1`` of the image ``x`` ``(N, C, H, W)`` into the phase planes ``xph``
    ``(s_h, s_w, count + slack)``, which hold the padding value wherever the image does not land
    (those cells are never written)."""
    x3 = x.reshape(g.planes, *g.size)[p0:p1]
    for a in range(g.stride[0]):
        for b in range(g.stride[1]):
            img, pl = _image_phase(g, a, b)
            _planes(xph[a, b], g, p0, p1)[(slice(None), *pl)] = x3[(slice(None), *img)]


def merge(dxph: Any, dx: Any, g: Geometry, p0: int, p1: int) -> None:
    """Adjoint of :func:`split`: planes ``p0:p1`` of ``dx`` (overwritten) = the image cells of
    the phase planes ``dxph``."""
    dx3 = dx.reshape(g.planes, *g.size)[p0:p1]
    for a in range(g.stride[0]):
        for b in range(g.stride[1]):
            img, pl = _image_phase(g, a, b)
            dx3[(slice(None), *img)] = _planes(dxph[a, b], g, p0, p1)[(slice(None), *pl)]


def _valid(flat: Any, g: Geometry, p0: int, p1: int) -> Any:
    """The ``(p1 − p0, OH, OW)`` outputs of planes ``p0:p1`` in a flat ``(planes, T_h, T_w)``
    buffer."""
    return _planes(flat, g, p0, p1)[:, : g.out[0], : g.out[1]]


def _route(xp: Any, src: Any, dst: Any, lo: int, kernel: int, stride: int, step: int,
           arg: Any = None, eq: Any = None, tmp: Any = None) -> None:
    """Adjoint of one pass over flat positions ``lo:lo+len(src)``: ``dst[k mod s][t + shift_k]
    += src[t]`` (``· [arg[t] = k]`` for MAX) over the offsets ``k`` of one axis, ``shift_k =
    (k // s)·step``; overwrites ``dst[:, lo:hi + slack]`` (``dst``: ``(s, count + slack)``).

    Offsets ``k < s`` have shift 0 and come first: they overwrite their phase instead of adding
    to it (saves zeroing the buffers). What lands past ``hi`` comes from the last positions of a
    plane, which are outputs beyond ``O`` and carry zeros.
    """
    hi = lo + src.shape[0]
    end = hi + (kernel - 1) // stride * step
    for k in range(kernel):
        p, sh = k % stride, (k // stride) * step
        if arg is None:
            val = src
        else:
            xp.equal(arg, k, out=eq)
            val = xp.multiply(src, eq, out=tmp)
        if k < stride:
            dst[p, lo:hi] = val
            dst[p, hi:end] = 0
        else:
            dst[p, lo + sh:hi + sh] += val
    for p in range(kernel, stride):  # phases no window reads
        dst[p, lo:end] = 0


def _row_views(g: Geometry, xph: Any, a: int, lo: int, hi: int) -> list[Any]:
    """Offsets ``j`` of the row pass of row phase ``a`` over flat positions ``lo:hi``."""
    sw = g.stride[1]
    return [xph[a, j % sw, lo + g.shift(0, j):hi + g.shift(0, j)] for j in range(g.kernel[1])]


def _col_views(g: Geometry, hm: Any, lo: int, hi: int) -> list[Any]:
    """Offsets ``i`` of the column pass (over the row results ``hm``) at ``lo:hi``."""
    sh = g.stride[0]
    return [hm[i % sh, lo + g.shift(i, 0):hi + g.shift(i, 0)] for i in range(g.kernel[0])]


def _sum(views: Sequence[Any], out: Any) -> None:
    out[...] = views[0]
    for v in views[1:]:
        out += v


def ave_forward(xp: Any, x: Any, top: Any, inv_area: Any, g: Geometry, bufs: Any) -> None:
    """``top = (Σ over each window of x) · inv_area`` (``inv_area``: ``(OH, OW)``)."""
    if cuda_k.enabled(xp):
        cuda_k.ave_pool_forward(x, top, inv_area, g)
        return
    (kh, _), (sh, sw), n, per = g.kernel, g.stride, g.count, g.length[0] * g.length[1]
    xph = bufs.get("xph", (sh, sw, n + g.slack), fill=0.0)
    hs = bufs.get("hm", (sh, n + g.slack), fill=0.0)  # row sums per row phase
    ys = bufs.get("ym", (n,))
    top3 = top.reshape(g.planes, *g.out)
    for p0, p1 in chunks(xp, g):
        lo, hi = p0 * per, p1 * per
        split(x, xph, g, p0, p1)
        for a in range(min(sh, kh)):
            _sum(_row_views(g, xph, a, lo, hi), hs[a, lo:hi])
        _sum(_col_views(g, hs, lo, hi), ys[lo:hi])
        xp.multiply(_valid(ys, g, p0, p1), inv_area, out=top3[p0:p1])


def ave_backward(xp: Any, dy: Any, dx: Any, inv_area: Any, g: Geometry, bufs: Any) -> None:
    """``dx`` (overwritten) = Σ over the windows containing a cell of ``dy · inv_area``."""
    if cuda_k.enabled(xp):
        cuda_k.ave_pool_backward(dy, dx, inv_area, g)
        return
    (kh, kw), (sh, sw), n, per = g.kernel, g.stride, g.count, g.length[0] * g.length[1]
    dyf = bufs.get("dyf", (n,), fill=0.0)  # dy · inv_area inside (planes, T_h, T_w), 0 elsewhere
    dh = bufs.get("dh", (sh, n + g.slack))
    dxph = bufs.get("dxph", (sh, sw, n + g.slack))
    dy3 = dy.reshape(g.planes, *g.out)
    for p0, p1 in chunks(xp, g):
        lo, hi = p0 * per, p1 * per
        xp.multiply(dy3[p0:p1], inv_area, out=_valid(dyf, g, p0, p1))
        _route(xp, dyf[lo:hi], dh, lo, kh, sh, g.length[1])
        for a in range(sh):
            if a < kh:
                _route(xp, dh[a, lo:hi], dxph[a], lo, kw, sw, 1)
            else:
                dxph[a, :, lo:hi + g.slack] = 0
        merge(dxph, dx, g, p0, p1)


def centred_pad(size: int) -> int:
    """Cells each side of a centred window of odd ``size``."""
    return (size - 1) // 2


def window_sum(buf: Any, size: int, axis: int, out: Any) -> Any:
    """``out[c] = Σ_{|d| ≤ (size−1)/2} a[c + d]`` along ``axis``, zero outside (clipped windows).

    ``buf`` holds ``a`` padded by ``(size−1)/2`` zeros on both ends of ``axis`` (the caller writes
    the interior, :func:`pad_view`). Summing ``size`` shifted slices is exact, unlike differences
    of cumulative sums, which lose float32 precision on long axes.
    """
    length = out.shape[axis]
    idx: list[Any] = [slice(None)] * buf.ndim
    idx[axis] = slice(0, length)
    out[...] = buf[tuple(idx)]
    for d in range(1, size):
        idx[axis] = slice(d, d + length)
        out += buf[tuple(idx)]
    return out


def pad_view(buf: Any, size: int, axis: int) -> Any:
    """The interior of a :func:`window_sum` buffer (where the summed array is written)."""
    half = centred_pad(size)
    idx: list[Any] = [slice(None)] * buf.ndim
    idx[axis] = slice(half, buf.shape[axis] - half)
    return buf[tuple(idx)]
