"""im2col / col2im for N-D grouped convolution, in two layouts, generic over ``xp``.

Notation: ``S`` input spatial dims, ``K`` kernel dims, ``O`` output spatial dims,
``Sp = S + 2·pad``, ``G`` groups of ``Cg = C / G`` channels, ``P = ΠO``.

Channels-last layout:

* ``xpad``: ``(N, *Sp, C)``, the input channels-last with a zero border.
* ``cols``: ``(G, N, *O, *K, Cg)``, per group the matrix ``(N·P, ΠK·Cg)``: one row per output
  position holding its window in ``(k1, k2, ..., c)`` order. The convolution is
  ``cols_g @ W_gᵀ`` ``(N·P, Og)`` with the weight's channel axis moved last.

Channels-first layout (Caffe's):

* ``xpad``: ``(C, N, *Sp)``.
* ``cols``: ``(G, Cg, *K, N, *O)``, per group the matrix ``(Cg·ΠK, N·P)``, one column per output
  position; the convolution is ``W_g @ cols_g`` ``(Og, N·P)``.

Image-major (channels-first per image, on the host):

* ``xpad``: ``(N, C, *Sp)``; ``cols``: ``(N, G, Cg, *K, *O)``, per image and group the matrix
  ``(Cg·ΠK, P)``. The convolution is one product per image, ``W_g @ cols[n]_g`` ``(Og, P)``,
  written straight into the ``(N, C, *O)`` blob, and the weight gradient reads the top diff as
  it is: no transposed copy on either side (see :meth:`ConvPlan.reshape`).

NOTE: im2col's cost is the number of contiguous runs it copies. Channels-last runs are ``kw·Cg``
values long (unit dilation), channels-first runs ``OW`` long (unit stride): with 32 channels and
a 5×5 kernel the channels-last copy measured 1.7x (16×16 outputs) to 5.7x (8×8) faster, with 3
channels and 32×32 outputs the channels-first one. Both layouts end with one transpose of the
product into the ``(N, C, *O)`` blob; channels-first keeps runs of ``P`` values there, too.

For kernel offset ``k`` (one index per spatial axis) and output position ``o``, the input position
is ``o·stride − pad + k·dilation``; in ``xpad`` coordinates ``o·stride + k·dilation``. col2im is
im2col's adjoint: window slices of ``cols`` added back (overlapping windows add up).

:class:`pycaffe_mpi.kernels.conv_plan.ConvPlan` puts these together for one convolution geometry
(layout, cache-sized chunks of images, scratch, the GEMMs of forward, input gradient and weight
gradient); the Convolution and Deconvolution layers both run on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib import stride_tricks

from pycaffe_mpi.kernels import cuda as cuda_k


def conv_output_shape(spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                      pad: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Caffe's ``(in + 2·pad − (dilation·(k−1) + 1)) // stride + 1`` per spatial axis."""
    return tuple((s + 2 * p - (d * (k - 1) + 1)) // st + 1
                 for s, k, st, p, d in zip(spatial, kernel, stride, pad, dilation))


def offsets(kernel: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every kernel offset tuple in row-major order (the order of the weight's kernel axes)."""
    return itertools.product(*(range(k) for k in kernel))


def window(offset: Sequence[int], out: Sequence[int], stride: Sequence[int],
           dilation: Sequence[int]) -> tuple[slice, ...]:
    """Per-axis slices of a padded array hit by kernel ``offset`` at every output position."""
    return tuple(slice(k * d, k * d + s * (o - 1) + 1, s)
                 for k, o, s, d in zip(offset, out, stride, dilation))


def padded_shape(x_shape: Sequence[int], pad: Sequence[int], channels_last: bool,
                 per_image: bool = False) -> tuple[int, ...]:
    """``xpad``'s shape for an input of shape ``(N, C, *S)``."""
    n, c, *spatial = x_shape
    sp = tuple(s + 2 * p for s, p in zip(spatial, pad))
    if per_image:
        return (n, c, *sp)
    return (n, *sp, c) if channels_last else (c, n, *sp)


def cols_shape(n: int, channels: int, out: Sequence[int], kernel: Sequence[int], group: int,
               channels_last: bool, per_image: bool = False) -> tuple[int, ...]:
    """``(G, N, *O, *K, Cg)``, ``(G, Cg, *K, N, *O)`` or (``per_image``) ``(N, G, Cg, *K,
    *O)``."""
    cg = channels // group
    if per_image:
        return (n, group, cg, *kernel, *out)
    return ((group, n, *out, *kernel, cg) if channels_last
            else (group, cg, *kernel, n, *out))


def _interior(pad: Sequence[int], spatial: Sequence[int]) -> tuple[slice, ...]:
    """Spatial slices selecting the unpadded input inside ``xpad``."""
    return tuple(slice(p, p + s) for p, s in zip(pad, spatial))


class Unfold:
    """im2col of inputs of one shape into fixed buffers (see :func:`im2col`): the strided views
    are built once, so a call is two copies (the per-call Python work matters for the small
    chunks a layer unfolds, ~15 µs a call)."""

    def __init__(self, xp: Any, cols: Any, xpad: Any, x_shape: Sequence[int],
                 kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                 dilation: Sequence[int], group: int, channels_last: bool,
                 per_image: bool = False) -> None:
        _, c, *spatial = x_shape
        nsp, cg = len(kernel), c // group
        self.xp, self.cols = xp, cols
        if per_image:  # host only: (N, C, *Sp) → (N, G, Cg, *K, *O), one strided copy
            self.cuda, self.view = None, None
            self.inner = xpad[(slice(None), slice(None), *_interior(pad, spatial))]
            self.axes = tuple(range(2 + nsp))
            src = xpad.reshape(xpad.shape[0], group, cg, *xpad.shape[2:])
            st, sp = src.strides, range(3, 3 + nsp)
            win = [st[a] * d for a, d in zip(sp, dilation)]
            pos = [st[a] * s for a, s in zip(sp, stride)]
            self.view = stride_tricks.as_strided(src, shape=cols.shape,
                                                 strides=(*st[:3], *win, *pos), writeable=False)
            return
        # on a GPU, one kernel reads x straight into cols (xpad stays unused)
        self.cuda = cuda_k.im2col_plan(xp, cols, x_shape, kernel, stride, pad, dilation,
                                       channels_last)
        if self.cuda is not None:
            return
        inner = _interior(pad, spatial)
        if channels_last:
            out = cols.shape[2:2 + nsp]
            self.inner = xpad[(slice(None), *inner)]
            self.axes = (0, *range(2, 2 + nsp), 1)  # (N, C, *S) → (N, *S, C)
            src = xpad.reshape(*xpad.shape[:-1], group, cg)  # (N, *Sp, G, Cg)
            src = src.transpose(nsp + 1, *range(nsp + 1), nsp + 2)  # (G, N, *Sp, Cg)
            lead = 2
        else:
            out = cols.shape[-nsp:]
            self.inner = xpad[(slice(None), slice(None), *inner)]
            self.axes = (1, 0, *range(2, 2 + nsp))  # (N, C, *S) → (C, N, *S)
            src = xpad.reshape(group, cg, *xpad.shape[1:])  # (G, Cg, N, *Sp)
            lead = 3
        self.view = None
        if xp is np:
            # every window at once through a strided view: one copy
            st, sp = src.strides, range(lead, lead + nsp)
            win = [st[a] * d for a, d in zip(sp, dilation)]  # kernel axes
            pos = [st[a] * s for a, s in zip(sp, stride)]  # output axes
            strides = ((st[0], st[1], *pos, *win, st[-1]) if channels_last  # (G, N, *O, *K, Cg)
                       else (st[0], st[1], *win, st[2], *pos))  # (G, Cg, *K, N, *O)
            self.view = stride_tricks.as_strided(src, shape=cols.shape, strides=strides,
                                                 writeable=False)
        else:  # one copy per kernel offset
            self.pairs = [((slice(None), slice(None), *(slice(None),) * nsp, *k)
                           if channels_last else (slice(None), slice(None), *k),
                           src[(*(slice(None),) * lead, *window(k, out, stride, dilation))])
                          for k in offsets(kernel)]

    def __call__(self, x: Any) -> Any:
        """``cols`` of ``x``."""
        if self.cuda is not None:
            return self.cuda(x)
        self.inner[...] = x.transpose(self.axes)
        if self.view is not None:
            np.copyto(self.cols, self.view)
        else:
            for dst, src in self.pairs:
                self.cols[dst] = src
        return self.cols


def im2col(xp: Any, x: Any, cols: Any, xpad: Any, kernel: Sequence[int], stride: Sequence[int],
           pad: Sequence[int], dilation: Sequence[int], group: int,
           channels_last: bool) -> Any:
    """Unfold the windows of ``x`` into ``cols``.

    Args:
        x: input ``(N, C, *S)``.
        cols: output (see :func:`cols_shape`).
        xpad: scratch (see :func:`padded_shape`) whose border is zero (its interior is written).
        kernel, stride, pad, dilation: one int per spatial axis.
        group: channel groups ``G``.
        channels_last: the layout of ``xpad`` and ``cols``.

    Returns:
        ``cols``.
    """
    return Unfold(xp, cols, xpad, x.shape, kernel, stride, pad, dilation, group,
                  channels_last)(x)


def col2im(xp: Any, cols: Any, dx: Any, dxpad: Any, kernel: Sequence[int],
           stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int], group: int,
           channels_last: bool) -> Any:
    """Adjoint of :func:`im2col`: ``dx = Σ_k`` (window k of ``cols`` scattered back), overwriting.

    Args:
        cols: gradient w.r.t. the unfolded input, laid out like :func:`im2col`'s.
        dx: output ``(N, C, *S)``, overwritten.
        dxpad: scratch shaped like ``xpad`` (fully overwritten here).

    Returns:
        ``dx``.
    """
    if cuda_k.col2im(xp, cols, dx, kernel, stride, pad, dilation, channels_last):
        return dx
    _, c, *spatial = dx.shape
    nsp, cg = len(kernel), c // group
    inner = _interior(pad, spatial)
    dxpad[...] = 0
    if channels_last:
        out = cols.shape[2:2 + nsp]
        dxg = dxpad.reshape(*dxpad.shape[:-1], group, cg)  # (N, *Sp, G, Cg)
        src = xp.moveaxis(cols, 0, -2)  # (N, *O, *K, G, Cg)
        for k in offsets(kernel):
            dxg[(slice(None), *window(k, out, stride, dilation))] += \
                src[(slice(None), *(slice(None),) * nsp, *k)]
        dx[...] = xp.moveaxis(dxpad[(slice(None), *inner)], -1, 1)
        return dx
    out = cols.shape[-nsp:]
    dxg = dxpad.reshape(group, cg, *dxpad.shape[1:])  # (G, Cg, N, *Sp)
    for k in offsets(kernel):
        dxg[(slice(None), slice(None), slice(None), *window(k, out, stride, dilation))] += \
            cols[(slice(None), slice(None), *k)]
    dx[...] = dxpad[(slice(None), slice(None), *inner)].swapaxes(0, 1)
    return dx


def _blob_view(mat: Any, n: int, channels_last: bool) -> Any:
    """A product ``(G, N·P, Og)`` (channels-last) or ``(G, Og, N·P)`` viewed ``(N, G, Og, P)``."""
    if channels_last:
        g, rows, og = mat.shape
        return mat.reshape(g, n, rows // n, og).transpose(1, 0, 3, 2)
    g, og, cols = mat.shape
    return mat.reshape(g, og, n, cols // n).transpose(2, 0, 1, 3)


def to_blob(xp: Any, mat: Any, dst: Any, bias: Any, channels_last: bool) -> Any:
    """``dst (N, G, Og, P)`` = the product ``mat`` in the blob layout, ``+ bias (G, Og, 1)``."""
    view = _blob_view(mat, dst.shape[0], channels_last)
    if bias is None:
        dst[...] = view
    else:
        xp.add(view, bias, out=dst)
    return dst


def from_blob(src: Any, mat: Any, channels_last: bool) -> Any:
    """Inverse of :func:`to_blob` without bias: ``mat`` = ``src (N, G, Og, P)`` in the layout
    of a product."""
    _blob_view(mat, src.shape[0], channels_last)[...] = src
    return mat
