"""2-D max/average pooling and centred window sums, generic over ``xp`` (NumPy or CuPy).

Pooling reads a padded copy ``xpad`` of the input ``(N, C, H, W)``: ``pad`` cells on the left and
top, and on the right/bottom as many as Caffe's ceil-rounded output needs, filled with ``-inf``
(MAX: padding never wins) or ``0`` (AVE: padded cells add nothing to the sum). Output cell
``(oh, ow)`` with kernel offset ``(i, j)`` reads ``xpad[oh·s_h + i, ow·s_w + j]``, i.e. input
``(oh·s_h − pad_h + i, ow·s_w − pad_w + j)``. Forward and backward loop over the ``kh·kw`` kernel
offsets; each step is one vectorised strided-slice operation over the whole batch.

NOTE: two layouts that make every window a contiguous run (stride phases in separate planes, or
channels last) were measured: they speed up the window passes, but building them costs as much
as they save in NumPy, so the plain strided windows stay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool = True) -> int:
    """Caffe's pooled length: ``ceil((in + 2·pad − k) / s) + 1`` (floor when not ``ceil_mode``),
    minus one when ``pad > 0`` and the last window would start in the right padding."""
    span = size + 2 * pad - kernel
    pooled = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if pad > 0 and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def padded_extent(size: int, kernel: int, stride: int, pad: int, pooled: int) -> int:
    """Length of the padded copy: left pad plus enough cells for every window and the image."""
    return pad + max(size, (pooled - 1) * stride - pad + kernel)


def _win(k: int, kernel: Sequence[int], out_hw: Sequence[int],
         stride: Sequence[int]) -> tuple[Any, ...]:
    """Slices of ``xpad`` read by kernel offset ``k = i·kw + j`` at every output cell."""
    i, j = divmod(k, kernel[1])
    (oh, ow), (sh, sw) = out_hw, stride
    return (Ellipsis, slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw))


def max_forward(xp: Any, xpad: Any, top: Any, argk: Any, gt: Any, kgt: Any,
                kernel: Sequence[int], stride: Sequence[int]) -> None:
    """``top = max`` over each window of ``xpad`` and ``argk`` = the winning offset ``i·kw + j``.

    Ties keep the first maximum in row-major window order (Caffe's strict ``>``). ``gt`` (bool)
    and ``kgt`` (``argk``'s dtype) are scratch shaped like ``top``.
    """
    out_hw = top.shape[-2:]
    top[...] = xpad[_win(0, kernel, out_hw, stride)]
    argk[...] = 0
    for k in range(1, kernel[0] * kernel[1]):
        v = xpad[_win(k, kernel, out_hw, stride)]
        xp.greater(v, top, out=gt)
        xp.maximum(top, v, out=top)
        # NOTE: offsets come in increasing order, so argk < k and "argk = k where v > top" is
        # max(argk, gt·k): arithmetic, ~10x faster than a masked copy (copyto/where) in NumPy.
        xp.multiply(gt, argk.dtype.type(k), out=kgt)
        xp.maximum(argk, kgt, out=argk)


def max_backward(xp: Any, dy: Any, argk: Any, dxpad: Any, eq: Any, tmp: Any,
                 kernel: Sequence[int], stride: Sequence[int]) -> None:
    """``dxpad`` (overwritten) = each window's top diff routed to its argmax offset.

    ``eq`` (bool) and ``tmp`` are scratch shaped like ``dy``.
    """
    out_hw = dy.shape[-2:]
    dxpad[...] = 0
    for k in range(kernel[0] * kernel[1]):
        xp.equal(argk, k, out=eq)
        xp.multiply(dy, eq, out=tmp)
        dxpad[_win(k, kernel, out_hw, stride)] += tmp


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


def ave_forward(xpad: Any, top: Any, inv_area: Any, kernel: Sequence[int],
                stride: Sequence[int]) -> None:
    """``top = (Σ over each window of xpad) · inv_area`` (``inv_area``: ``(OH, OW)``)."""
    out_hw = top.shape[-2:]
    top[...] = xpad[_win(0, kernel, out_hw, stride)]
    for k in range(1, kernel[0] * kernel[1]):
        top += xpad[_win(k, kernel, out_hw, stride)]
    top *= inv_area


def ave_backward(xp: Any, dy: Any, inv_area: Any, dxpad: Any, tmp: Any, kernel: Sequence[int],
                 stride: Sequence[int]) -> None:
    """``dxpad`` (overwritten) = Σ over the windows containing a cell of ``dy · inv_area``."""
    out_hw = dy.shape[-2:]
    xp.multiply(dy, inv_area, out=tmp)
    dxpad[...] = 0
    for k in range(kernel[0] * kernel[1]):
        dxpad[_win(k, kernel, out_hw, stride)] += tmp


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
