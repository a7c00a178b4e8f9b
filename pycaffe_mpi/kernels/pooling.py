"""2-D max/average pooling and centred window sums, generic over ``xp`` (NumPy or CuPy).

Output cell ``(oh, ow)`` with kernel offset ``(i, j)`` reads input ``(oh·s_h − pad_h + i,
ow·s_w − pad_w + j)``; windows are clipped to the image (MAX: padding never wins; AVE: padded
cells add nothing to the sum, but count in Caffe's divisor, :func:`ave_divisor`).

MAX keeps, per output cell, the offset ``i·k_w + j`` of the first maximum in row-major window
order (Caffe's strict ``>``); backward routes ``dy`` to it, overlapping windows adding up.

On the CPU both are compiled (:mod:`pycaffe_mpi.kernels.numba_cpu`). The forward copies a
cache-sized chunk of planes into "stride phases", ``X[a][b][t, u] = xpad[t·s_h + a, u·s_w + b]``
(``T_h × T_w`` each), where window offset ``(i, j)`` of every output is one flat shift of phase
``(i mod s_h, j mod s_w)``: one contiguous SIMD pass per offset takes the maximum and its offset
(MAX) or the sum (AVE). MAX's backward scatters ``dy`` to the recorded offsets; AVE's adds
``dy · inv_area`` back through the same shifts and reads the image cells out of the phases.
NOTE: this replaced NumPy passes over the same phase planes (4 array operations per offset for
MAX): forward + backward measured 3-3.8x faster on CIFAR10-Quick's pool1 (MAX) and 1.7-2x on
pool2 and pool3 (AVE), batch 100 and 350. On a GPU the CUDA kernels of
:mod:`pycaffe_mpi.kernels.cuda` do this work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from pycaffe_mpi.kernels import cuda as cuda_k
from pycaffe_mpi.kernels import threads


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


def _phase_buffers(g: Geometry, bufs: Any, fill: float, lane: int) -> tuple[Any, Any]:
    """``lane``'s stride-phase planes of a chunk, ``(s_h, s_w, n + slack)``, filled with the
    padding value ``fill`` where no image cell lands, and an ``(n,)`` accumulator."""
    per = g.length[0] * g.length[1]
    n = per * max(1, min(g.planes, MAX_CHUNK_ELEMENTS // per))
    return (bufs.get(f"xph{lane}", (*g.stride, n + g.slack), fill=fill),
            bufs.get(f"acc{lane}", (n,)))


def _split(g: Geometry, fn: Any) -> None:
    """``fn(lane, lo, hi)`` over the planes, split between the cores (kernels/threads.py) in
    parts of at least a chunk of cells."""
    threads.run(fn, g.planes, grain=-(-MAX_CHUNK_ELEMENTS // (g.size[0] * g.size[1])))


def max_forward(xp: Any, x: Any, top: Any, g: Geometry, bufs: Any) -> None:
    """``top`` = the maximum over each window of ``x`` ``(N, C, H, W)``.

    ``bufs.get(name, shape, fill=None, dtype=None)`` gives scratch arrays kept between calls; the
    argmax offsets stay there for :func:`max_argk` and :func:`max_backward`.
    """
    if cuda_k.enabled(xp):
        cuda_k.max_pool_forward(x, top, g, bufs)
        return
    arg = bufs.get("arg", (g.planes, *g.out), dtype=g.arg_dtype)
    xs, ys, jit = _as_planes(x, g.size), _as_planes(top, g.out), _jit()

    def part(lane: int, lo: int, hi: int) -> None:
        xph, best = _phase_buffers(g, bufs, -np.inf, lane)
        at = bufs.get(f"at{lane}", best.shape, dtype=g.arg_dtype)
        jit.max_pool_forward(xs[lo:hi], ys[lo:hi], arg[lo:hi], xph, best, at, *g.kernel,
                             *g.length, *g.pad)

    _split(g, part)


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
    dys, dxs, jit = _as_planes(dy, g.out), _as_planes(dx, g.size), _jit()
    _split(g, lambda lane, lo, hi: jit.max_pool_backward(dys[lo:hi], arg[lo:hi], dxs[lo:hi],
                                                          *g.args()))


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


def ave_forward(xp: Any, x: Any, top: Any, inv_area: Any, g: Geometry, bufs: Any) -> None:
    """``top = (Σ over each window of x) · inv_area`` (``inv_area``: ``(OH, OW)``)."""
    if cuda_k.enabled(xp):
        cuda_k.ave_pool_forward(x, top, inv_area, g)
        return
    xs, ys, jit = _as_planes(x, g.size), _as_planes(top, g.out), _jit()

    def part(lane: int, lo: int, hi: int) -> None:
        xph, acc = _phase_buffers(g, bufs, 0.0, lane)
        jit.ave_pool_forward(xs[lo:hi], ys[lo:hi], inv_area, xph, acc, *g.kernel, *g.length,
                             *g.pad)

    _split(g, part)


def ave_backward(xp: Any, dy: Any, dx: Any, inv_area: Any, g: Geometry, bufs: Any) -> None:
    """``dx`` (overwritten) = Σ over the windows containing a cell of ``dy · inv_area``."""
    if cuda_k.enabled(xp):
        cuda_k.ave_pool_backward(dy, dx, inv_area, g)
        return
    dys, dxs, jit = _as_planes(dy, g.out), _as_planes(dx, g.size), _jit()

    def part(lane: int, lo: int, hi: int) -> None:
        dxph, acc = _phase_buffers(g, bufs, 0.0, lane)
        jit.ave_pool_backward(dys[lo:hi], inv_area, dxs[lo:hi], dxph, acc, *g.kernel,
                              *g.length, *g.pad)

    _split(g, part)


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
