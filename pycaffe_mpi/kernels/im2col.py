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

:class:`ConvPlan` puts these together for one convolution geometry (layout, cache-sized chunks of
images, scratch :class:`Buffers`, the GEMMs of forward, input gradient and weight gradient); the
Convolution and Deconvolution layers both run on it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib import stride_tricks

from pycaffe_mpi import blob as blob_mod
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


# -- the convolution plan -------------------------------------------------------------------------

CHUNK_BYTES = 6 << 20  # see ConvPlan.reshape


class Buffers:
    """Scratch arrays kept between calls, reallocated only when their shape changes."""

    # NOTE: host buffers start on a cache line (NumPy's large arrays start 16 bytes past a page):
    # the im2col copy between two such buffers measured ~20% faster.
    ALIGN = 64

    def __init__(self, xp: Any, dtype: Any) -> None:
        self.xp, self.dtype, self._arrays = xp, dtype, {}

    def get(self, name: str, shape: Sequence[int], fill: float | None = None,
            dtype: Any = None) -> Any:
        """The buffer ``name`` of ``shape``; a new one is filled with ``fill`` (or left empty)."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype or self.dtype)
        arr = self._arrays.get(name)
        if arr is None or arr.shape != shape or arr.dtype != dtype:
            arr = self._empty(shape, dtype)
            if fill is not None:
                arr[...] = fill
            self._arrays[name] = arr
        return arr

    def _empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        # NOTE: Caffe's scratch memory is Blobs, so its INT_MAX check and our allocation error
        # (naming shape and bytes; the Net adds the layer) apply to these buffers too
        size = blob_mod._checked_count(shape, "work buffer") * dtype.itemsize
        try:
            if self.xp is not np:
                return self.xp.empty(shape, dtype)
            raw = np.empty(size + self.ALIGN, np.uint8)
        except MemoryError as e:
            raise blob_mod.BlobAllocationError(
                f"cannot allocate a work buffer of shape {shape} ({dtype.name}, {size} bytes, "
                f"{size / 2**30:.3g} GiB): {e}") from e
        start = -raw.ctypes.data % self.ALIGN
        return raw[start:start + size].view(dtype).reshape(shape)


class ConvPlan:
    """One N-D grouped convolution ``y = conv(x, W)``: its geometry, the layout and chunking chosen
    for it, its scratch buffers, and the products built on them.

    ``x`` is ``(N, C, *S)``, ``W`` ``(O, C/G, *K)``, ``y`` ``(N, O, *Out)`` (any arrays of those
    sizes, C-contiguous). Convolution runs :meth:`forward` and :meth:`backward`; Deconvolution is
    the same plan read backwards (its bottom is ``y``, its top ``x``): its forward is
    :meth:`backward`'s input gradient and its input gradient is :meth:`forward`.
    """

    def __init__(self, xp: Any, dtype: Any, channels: int, num_output: int, group: int,
                 kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                 dilation: Sequence[int]) -> None:
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.channels, self.num_output, self.group = channels, num_output, group
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.pad, self.dilation = tuple(pad), tuple(dilation)
        self.is_1x1 = all(k == 1 and s == 1 and q == 0
                          for k, s, q in zip(self.kernel, self.stride, self.pad))
        self._bufs = Buffers(xp, self.dtype)
        self._key: Any = None

    def reshape(self, num: int, spatial: Sequence[int]) -> None:
        """Plan for ``num`` images of ``spatial`` size (the caller checked ``Out > 0``)."""
        self.num, self.spatial = int(num), tuple(int(s) for s in spatial)
        self.out = conv_output_shape(self.spatial, self.kernel, self.stride, self.pad,
                                     self.dilation)
        # NOTE: for stride 1, dx is itself a convolution of dy; its im2col copy is cheaper than
        # col2im's strided adds, even with twice as many channels to copy (CIFAR10-quick conv3,
        # 32 → 64 channels: 7.3 → 5.8 ms backward).
        self.full_conv = (all(st == 1 for st in self.stride)
                          and self.num_output <= 2 * self.channels
                          and all(d * (k - 1) >= p for k, d, p in
                                  zip(self.kernel, self.dilation, self.pad)))
        # NOTE: the layout whose im2col copies the longer contiguous runs (see the module doc):
        # channels-last for 32 channels, channels-first for CIFAR10-quick's 3-channel conv1.
        cg = self.channels // self.group
        self.channels_last = (cg * (self.kernel[-1] if self.dilation[-1] == 1 else 1)
                              >= (self.out[-1] if self.stride[-1] == 1 else 1))
        # NOTE: on a GPU 2-D im2col/col2im are CUDA kernels over the channels-first layout
        # (kernels/cuda.py), and the whole batch is one chunk: no cache to fit.
        on_gpu = cuda_k.enabled(self.xp)
        if on_gpu and len(self.kernel) == 2:
            self.channels_last = False
        # NOTE: channels-first on the host goes image by image: the products then read and
        # write the blobs in place, where the batch-wide matrix needs a transposed copy of the
        # top (forward) and of its diff (weight gradient). CIFAR10-Quick conv1, batch 100,
        # one thread: those two copies were 5.3 of its 34 ms.
        self.per_image = not self.channels_last and self.xp is np and not on_gpu
        # NOTE: im2col writes ~Πk times the input, which the GEMM then reads back: over the whole
        # batch that streams through DRAM (82 MB for CIFAR10-quick conv2). In chunks of images
        # whose cols fit in the CPU cache the copy measured 3.5x faster and the GEMMs read cached
        # operands (conv2's forward: 11.2 → 5.8 ms). So the plan runs chunk by chunk, and
        # backward recomputes each chunk's cols instead of keeping them.
        image_bytes = self.dtype.itemsize * math.prod(self.kernel) * max(
            self.channels * math.prod(self.out),  # cols (and col2im's)
            self.num_output * math.prod(self.spatial) if self.full_conv else 0)
        self.chunk = (self.num if self.xp is not np or on_gpu
                      else max(1, min(self.num, CHUNK_BYTES // image_bytes)))
        key = (self.num, self.spatial, self.chunk)
        if self._key != key:
            self._key, self._views = key, {}  # im2col views of the buffers

    # -- shapes as 2-D / 3-D matrices -------------------------------------------------------------
    def _dims(self) -> tuple[int, int, int, int, int, int]:
        """``(N, G, ΠK·Cg, Og, ΠOut, ΠS)``."""
        g = self.group
        ckg = self.channels // g * math.prod(self.kernel)
        return self.num, g, ckg, self.num_output // g, math.prod(self.out), math.prod(self.spatial)

    def _chunks(self) -> list[tuple[int, int]]:
        """``(lo, hi)`` image ranges processed together (see :meth:`reshape`)."""
        return [(lo, min(lo + self.chunk, self.num)) for lo in range(0, self.num, self.chunk)]

    def _mat(self, name: str, m: int, rows: int, positions: int) -> Any:
        """Buffer ``name`` for the product of ``m`` images: ``(G, m·positions, rows)``
        channels-last, ``(G, rows, m·positions)`` channels-first."""
        g, n = self.group, self.chunk * positions
        if self.channels_last:
            return self._bufs.get(name, (g, n, rows))[:, :m * positions]
        return self._bufs.get(name, (g, rows, n))[:, :, :m * positions]

    def _w_cols(self, w: Any, flip: bool = False) -> Any:
        """The weights as ``(G, Og, ΠK·Cg)`` in the order of a ``cols`` row (flipped kernels as
        ``(G, Og·ΠK, Cg)`` for the full convolution)."""
        _, g, ckg, og, _, _ = self._dims()
        nsp, cg, xp = len(self.kernel), self.channels // g, self.xp
        w = w.reshape(g, og, cg, *self.kernel)
        if flip:  # rot180 of every kernel, rows (k, o) or (o, k) as dy's cols
            w = w[(Ellipsis, *[slice(None, None, -1)] * nsp)]
            w = w.transpose(0, *range(3, 3 + nsp), 1, 2) if self.channels_last else \
                w.transpose(0, 1, *range(3, 3 + nsp), 2)
            return xp.ascontiguousarray(w).reshape(g, og * (ckg // cg), cg)
        if self.channels_last:
            w = xp.ascontiguousarray(xp.moveaxis(w, 2, -1))
        return w.reshape(g, og, ckg)

    def _cols(self, x: Any, channels: int, spatial: Sequence[int], out: Sequence[int],
              pad: Sequence[int], stride: Sequence[int], tag: str, per_image: bool = False) -> Any:
        """The ``cols`` matrices ``(G, m·ΠOut, ΠK·Cg)`` (or transposed, channels-first; or
        ``(m, G, ΠK·Cg, ΠOut)`` ``per_image``) of the ``m`` images ``x`` ``(m, channels,
        *spatial)``, in buffers named after ``tag``."""
        m, g, cl = x.shape[0], self.group, self.channels_last
        view = self._views.get((tag, m))
        if view is None:  # the buffers' views for chunks of m images, made once
            cols = self._bufs.get(tag, cols_shape(self.chunk, channels, out, self.kernel, g, cl,
                                                  per_image))
            cols = cols[:m] if per_image else cols[:, :m] if cl else \
                cols[(Ellipsis, slice(0, m), *(slice(None),) * len(out))]
            xpad = self._bufs.get(tag + "_pad", padded_shape(
                (self.chunk, channels, *spatial), pad, cl, per_image), fill=0.0)
            xpad = xpad[:m] if cl or per_image else xpad[:, :m]
            unfold = Unfold(self.xp, cols, xpad, x.shape, self.kernel, stride, pad,
                            self.dilation, g, cl, per_image)
            rows, positions = channels // g * math.prod(self.kernel), m * math.prod(out)
            shape = ((m, g, rows, positions // m) if per_image
                     else (g, positions, rows) if cl else (g, rows, positions))
            view = (unfold, cols.reshape(shape))
            self._views[(tag, m)] = view
        view[0](x)
        return view[1]

    def _x_cols(self, x: Any) -> Any:
        """The ``cols`` of a chunk ``x`` of the input (see :meth:`_cols`)."""
        return self._cols(x, self.channels, self.spatial, self.out, self.pad, self.stride, "cols",
                          self.per_image)

    # -- the products -----------------------------------------------------------------------------
    def forward(self, x: Any, w: Any, y: Any, bias: Any = None, dy: Any = None,
                dw: Any = None) -> None:
        """``y = conv(x, W) + bias`` (``bias`` ``(O,)`` or None), overwriting ``y``; with ``dy``
        and ``dw`` also ``dW += ∂E/∂W`` for that ``dy = ∂E/∂y``, from the same cols
        (Deconvolution's backward: one im2col of its top diff for both of its gradients).

        Per group g: ``y_g = cols_g @ W_gᵀ`` over chunks of images (channels-first: ``W_g @
        cols_g``); a 1×1 kernel with stride 1 and pad 0 skips im2col: ``y[n]_g = W_g @ x[n]_g``.
        """
        n, g, ckg, og, p, s = self._dims()
        xp, cl = self.xp, self.channels_last
        bias = None if bias is None else bias.reshape(g, og, 1)
        if self.is_1x1:
            if dw is not None:
                self._backward_1x1(dy.reshape(n, g, og, p), x, w, dw, None)
            # NOTE: one GEMM per image (broadcast over N), written straight into the top.
            yv = xp.matmul(w.reshape(g, og, ckg), x.reshape(n, g, ckg, s),
                           out=y.reshape(n, g, og, p))
            if bias is not None:
                yv += bias
            return
        wc = self._w_cols(w)
        x, y = x.reshape(n, self.channels, *self.spatial), y.reshape(n, g, og, p)
        if dw is not None:
            dy, dwm = dy.reshape(n, g, og, p), self._dw_sum()
        for lo, hi in self._chunks():
            cols = self._x_cols(x[lo:hi])
            if self.per_image:  # cols (m, G, ΠK·Cg, P), products straight into the top
                if dw is not None:
                    self._dw_add_per_image(dwm, cols, dy[lo:hi])
                xp.matmul(wc, cols, out=y[lo:hi])
                if bias is not None:
                    y[lo:hi] += bias
                continue
            out = self._mat("out", hi - lo, og, p)
            if dw is not None:
                self._dw_add(dwm, cols, from_blob(dy[lo:hi], self._mat("dy", hi - lo, og, p), cl))
            if cl:
                xp.matmul(cols, wc.transpose(0, 2, 1), out=out)  # (G, m·P, Og)
            else:
                xp.matmul(wc, cols, out=out)  # (G, Og, m·P)
            to_blob(xp, out, y[lo:hi], bias, cl)
        if dw is not None:
            self._dw_finish(dwm, dw)

    def backward(self, dy: Any, x: Any, w: Any, dw: Any = None, dx: Any = None) -> None:
        """``dW += ∂E/∂W`` when ``dw`` is given (then ``x`` is needed) and ``dx = ∂E/∂x``
        (overwritten) when ``dx`` is given, from ``dy = ∂E/∂y``.

        ``dW_g += dy_gᵀ @ cols_g`` (cols recomputed per chunk) and ``dx = col2im(dy_g @ W_g)``
        (overlapping windows add up); or, for stride 1 when ``O ≤ 2·C``, the equal and faster
        "full" convolution: with ``dycols = im2col(dy, pad = dil·(k−1) − pad)``,
        ``dx_g = dycols_g @ rot180(W_g)`` and ``rot180(dW_g) += dycols_gᵀ @ x_g``.
        """
        n, g, _, og, p, _ = self._dims()
        dy = dy.reshape(n, g, og, p)
        if self.is_1x1:
            self._backward_1x1(dy, x, w, dw, dx)
        elif dx is not None and self.full_conv:
            self._backward_full_conv(dy, x, w, dw, dx)
        else:
            self._backward_x_cols(dy, x, w, dw, dx)

    def _backward_x_cols(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """``dW_g += dy_gᵀ @ cols_g`` (cols recomputed per chunk: cheaper than keeping them, see
        :meth:`reshape`) and ``dx = col2im(dy_g @ W_g)``, each if asked."""
        n, _, _, og, p, _ = self._dims()
        cl = self.channels_last
        wc = self._w_cols(w) if dx is not None else None
        if dw is not None:
            x, dwm = x.reshape(n, self.channels, *self.spatial), self._dw_sum()
        if dx is not None:
            dx = dx.reshape(n, self.channels, *self.spatial)
        for lo, hi in self._chunks():
            if dw is not None and self.per_image:
                self._dw_add_per_image(dwm, self._x_cols(x[lo:hi]), dy[lo:hi])
            if dx is None and self.per_image:
                continue
            dym = from_blob(dy[lo:hi], self._mat("out", hi - lo, og, p), cl)
            if dw is not None and not self.per_image:
                self._dw_add(dwm, self._x_cols(x[lo:hi]), dym)
            if dx is not None:
                self._col2im(wc, dym, dx[lo:hi])
        if dw is not None:
            self._dw_finish(dwm, dw)

    def _dw_sum(self) -> Any:
        """A zeroed ``(G, ΠK·Cg, Og)`` sum of ``cols_g · dy_g`` over chunks."""
        _, g, ckg, og, _, _ = self._dims()
        dwm = self._bufs.get("dw", (g, ckg, og))
        dwm[...] = 0
        return dwm

    def _dw_add(self, dwm: Any, cols: Any, dym: Any) -> None:
        """``dwm += cols_g · dy_g`` for one chunk (both in the product layout)."""
        if self.channels_last:
            dwm += self.xp.matmul(cols.transpose(0, 2, 1), dym)
        else:
            dwm += self.xp.matmul(cols, dym.transpose(0, 2, 1))

    def _dw_add_per_image(self, dwm: Any, cols: Any, dy: Any) -> None:
        """``dwm += Σ_n cols[n]_g · dy[n]_gᵀ`` for one chunk (``cols`` ``(m, G, ΠK·Cg, P)``,
        ``dy`` ``(m, G, Og, P)`` as the blob holds it)."""
        dwm += self.xp.matmul(cols, dy.transpose(0, 1, 3, 2)).sum(axis=0)

    def _dw_finish(self, dwm: Any, dw: Any) -> None:
        """``dw (O, Cg, *K) += dwm`` reordered."""
        _, g, _, og, _, _ = self._dims()
        cg, cl = self.channels // g, self.channels_last
        # rows of dwm: (*K, Cg) channels-last, (Cg, *K) channels-first → (G, Og, Cg, *K)
        dwm = dwm.reshape(g, *self.kernel, cg, og) if cl else \
            dwm.reshape(g, cg, *self.kernel, og)
        dw.reshape(g, og, cg, *self.kernel)[...] += \
            self.xp.moveaxis(dwm, (-1, -2), (1, 2)) if cl else self.xp.moveaxis(dwm, -1, 1)

    def _backward_1x1(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """1×1 kernel, stride 1, pad 0: ``dW_g += Σ_n dy[n]_g @ x[n]_gᵀ``,
        ``dx[n]_g = W_gᵀ @ dy[n]_g``."""
        n, g, ckg, og, _, s = self._dims()
        xp = self.xp
        if dw is not None:
            x = x.reshape(n, g, ckg, s)
            wdiff = dw.reshape(g, og, ckg)
            for j in range(g):
                wdiff[j] += xp.tensordot(dy[:, j], x[:, j], axes=((0, 2), (0, 2)))
        if dx is not None:
            w = w.reshape(g, og, ckg)
            xp.matmul(w.transpose(0, 2, 1), dy, out=dx.reshape(n, g, ckg, s))

    def _col2im(self, wc: Any, dym: Any, dx: Any) -> None:
        """``dx = col2im(dy_g @ W_g)`` for one chunk (``dym``: dy in the product layout, ``wc``:
        :meth:`_w_cols`)."""
        m, (_, g, ckg, _, p, _) = dx.shape[0], self._dims()
        cl, xp = self.channels_last, self.xp
        dcols = self._mat("dcols", m, ckg, p)
        if cl:
            xp.matmul(dym, wc, out=dcols)  # (G, m·P, ΠK·Cg)
        else:
            xp.matmul(wc.transpose(0, 2, 1), dym, out=dcols)  # (G, Cg·ΠK, m·P)
        dxpad = self._bufs.get("dxpad", padded_shape((self.chunk, *dx.shape[1:]), self.pad, cl))
        dxpad = dxpad[:m] if cl else dxpad[:, :m]
        shape = cols_shape(m, self.channels, self.out, self.kernel, g, cl)
        col2im(xp, dcols.reshape(shape), dx, dxpad, self.kernel, self.stride, self.pad,
               self.dilation, g, cl)

    def _backward_full_conv(self, dy: Any, x: Any, w: Any, dw: Any, dx: Any) -> None:
        """Stride 1: dx is the "full" convolution of dy with the flipped kernel, and the weight
        gradient a product with the same cols of dy, so x needs no im2col:

        ``dycols = im2col(dy, pad = dil·(k−1) − pad)``, ``dx_g = dycols_g @ rot180(W_g)``,
        ``rot180(dW_g) += dycols_gᵀ @ x_g`` (per chunk; ``x_g`` as an ``(m·ΠS, Cg)`` matrix).
        """
        n, g, _, og, _, s = self._dims()
        xp, cl, cg, nsp = self.xp, self.channels_last, self.channels // g, len(self.kernel)
        q = tuple(d * (k - 1) - p for k, d, p in zip(self.kernel, self.dilation, self.pad))
        wr = self._w_cols(w, flip=True)  # (G, Og·ΠK, Cg), rows ordered like dycols'
        if dw is not None:
            dwr = self._bufs.get("dwr", wr.shape)  # Σ over chunks of dycols_gᵀ @ x_g
            dwr[...] = 0
            x = x.reshape(n, g, cg, s)
        dx = dx.reshape(n, g, cg, s)
        dy = dy.reshape(n, self.num_output, *self.out)
        for lo, hi in self._chunks():
            m = hi - lo
            cols = self._cols(dy[lo:hi], self.num_output, self.out, self.spatial, q,
                              (1,) * nsp, "dycols")
            out = self._mat("dx_mat", m, cg, s)
            if dw is not None:
                xm = from_blob(x[lo:hi], self._mat("x_mat", m, cg, s), cl)
                # cols (G, m·S, ΠK·Og) and xm (G, m·S, Cg), or both transposed
                dwr += (xp.matmul(cols.transpose(0, 2, 1), xm) if cl
                        else xp.matmul(cols, xm.transpose(0, 2, 1)))
            if cl:
                xp.matmul(cols, wr, out=out)
            else:
                xp.matmul(wr.transpose(0, 2, 1), cols, out=out)
            to_blob(xp, out, dx[lo:hi], None, cl)
        if dw is None:
            return
        # rows of dwr: (*K, Og) channels-last, (Og, *K) channels-first, kernels flipped
        flip = (Ellipsis, *[slice(None, None, -1)] * nsp)
        if cl:
            dwr = dwr.reshape(g, *self.kernel, og, cg)[(*flip, slice(None), slice(None))]
        else:
            dwr = dwr.reshape(g, og, *self.kernel, cg)[(*flip, slice(None))]
        dw.reshape(g, og, cg, *self.kernel)[...] += \
            xp.moveaxis(dwr, (-2, -1), (1, 2)) if cl else xp.moveaxis(dwr, -1, 2)
