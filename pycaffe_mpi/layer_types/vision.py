"""Vision layers: Convolution, Pooling, LRN (Caffe's conv, pooling and lrn layers).

The heavy lifting lives in :mod:`pycaffe_mpi.kernels.im2col` and
:mod:`pycaffe_mpi.kernels.pooling`; these classes read the proto parameters, check shapes, own the
scratch buffers and call the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import fillers
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import im2col as im2col_k
from pycaffe_mpi.kernels import pooling as pool_k
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.registry import register_layer

MAX, AVE, STOCHASTIC = 0, 1, 2
CEIL, FLOOR = 0, 1
ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1
CHUNK_BYTES = 6 << 20  # see ConvolutionLayer.reshape


class _Buffers:
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
        if self.xp is not np:
            return self.xp.empty(shape, dtype)
        size = math.prod(shape) * dtype.itemsize
        raw = np.empty(size + self.ALIGN, np.uint8)
        start = -raw.ctypes.data % self.ALIGN
        return raw[start:start + size].view(dtype).reshape(shape)


def _canonical_axis(layer: Layer, field: str, axis: int, num_axes: int) -> int:
    layer.require(-num_axes <= axis < num_axes, field,
                  f"axis {axis} out of range for a {num_axes}-axis bottom")
    return axis % num_axes


@register_layer("Convolution")
class ConvolutionLayer(Layer):
    """N-D convolution with groups, stride, padding and dilation (Caffe's ``Convolution``).

    Bottom i → top i (any number of pairs, all bottoms the same shape, shared weights).

    Shapes:
        bottom: ``(*lead, C, *S)``, ``C`` at ``axis`` (default 1), ``N = Π lead``.
        top: ``(*lead, O, *Out)``,
        ``Out_d = (S_d + 2·pad_d − (dil_d·(k_d−1) + 1)) // stride_d + 1``.
        blobs: weight ``(O, C/group, *k)``; bias ``(O,)`` when ``bias_term``.

    Params (``convolution_param``): num_output (required), bias_term (true), kernel_size (required;
    one value or one per spatial axis) or kernel_h/kernel_w (2-D), stride (1) or stride_h/stride_w,
    pad (0) or pad_h/pad_w, dilation (1), group (1), weight_filler / bias_filler (constant 0),
    axis (1). engine and force_nd_im2col are accepted and ignored.

    Forward (per group g): ``cols = im2col(x)``, the ``(N·ΠOut, Cg·Πk)`` matrix of windows,
    ``y_g = cols_g @ W_gᵀ + b_g`` (done in chunks of images; channels-last or channels-first
    layout, see :mod:`pycaffe_mpi.kernels.im2col`). A 1×1 kernel with stride 1 and pad 0 skips
    im2col: ``y[n]_g = W_g @ x[n]_g``.

    Backward: ``db += Σ_{n, positions} dy``; ``dW_g += dy_gᵀ @ cols_g`` (cols recomputed per
    chunk) and ``dx = col2im(dy_g @ W_g)`` (overlapping windows add up); or, for stride 1 when
    ``O ≤ 2·C``, the equal and faster "full" convolution: with
    ``dycols = im2col(dy, pad = dil·(k−1) − pad)``, ``dx_g = dycols_g @ rot180(W_g)`` and
    ``rot180(dW_g) += dycols_gᵀ @ x_g`` (``x_g`` as an ``(N·ΠS, Cg)`` matrix; no im2col of x).
    """

    min_bottom = 1
    min_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.convolution_param
        self.require(len(bottom) == len(top), "top",
                     f"Convolution needs one top per bottom, got {len(bottom)} bottom(s) "
                     f"and {len(top)} top(s)")
        shape = bottom[0].shape
        self.axis = _canonical_axis(self, "convolution_param.axis", p.axis, len(shape))
        self.num_axes = len(shape)
        nsp = len(shape) - self.axis - 1
        self.require(nsp >= 1, "convolution_param.axis",
                     f"needs at least one spatial axis after the channel axis {self.axis}; "
                     f"bottom shape is {shape}")
        self.kernel = self._spatial("kernel", list(p.kernel_size), p, nsp, None)
        self.stride = self._spatial("stride", list(p.stride), p, nsp, 1)
        self.pad = self._spatial("pad", list(p.pad), p, nsp, 0)
        self.dilation = self._spatial("dilation", list(p.dilation), p, nsp, 1)
        self.require(all(k > 0 for k in self.kernel), "convolution_param.kernel_size",
                     f"filter dimensions must be nonzero, got {self.kernel}")
        self.require(all(s > 0 for s in self.stride), "convolution_param.stride",
                     f"stride dimensions must be nonzero, got {self.stride}")
        self.require(all(d > 0 for d in self.dilation), "convolution_param.dilation",
                     f"dilation dimensions must be nonzero, got {self.dilation}")
        self.channels = shape[self.axis]
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        self.bias_term = bool(p.bias_term)
        self.require(self.num_output > 0, "convolution_param.num_output",
                     "num_output must be set to a positive number")
        self.require(self.group > 0 and self.channels % self.group == 0,
                     "convolution_param.group",
                     f"the {self.channels} input channels must be a multiple of group {self.group}")
        self.require(self.num_output % self.group == 0, "convolution_param.group",
                     f"num_output {self.num_output} must be a multiple of group {self.group}")
        self.is_1x1 = all(k == 1 and s == 1 and q == 0
                          for k, s, q in zip(self.kernel, self.stride, self.pad))
        wshape = (self.num_output, self.channels // self.group, *self.kernel)
        shapes = [wshape, (self.num_output,)][: 1 + self.bias_term]
        if len(self.blobs) > 0:
            self.require(len(self.blobs) == len(shapes), "blobs",
                         f"expected {len(shapes)} parameter blob(s) (bias_term: "
                         f"{str(self.bias_term).lower()}), got {len(self.blobs)}")
            for i, (b, want) in enumerate(zip(self.blobs, shapes)):
                self.require(tuple(b.shape) == want, "blobs",
                             f"parameter {i} has shape {tuple(b.shape)}, expected {want}; to "
                             "learn this layer from scratch, rename it")
            return
        fills = [p.weight_filler if p.HasField("weight_filler") else None,
                 p.bias_filler if p.HasField("bias_filler") else None]
        for s, f in zip(shapes, fills):
            blob = self.new_blob(s)
            blob.data[...] = self.xp.asarray(fillers.fill(f, s, self.rng, self.dtype))
            self.blobs.append(blob)

    def _spatial(self, name: str, values: list[int], p: Any, nsp: int,
                 default: int | None) -> tuple[int, ...]:
        """One value per spatial axis from ``name`` (repeated) or ``name_h``/``name_w``."""
        field = f"convolution_param.{name}" + ("_size" if name == "kernel" else "")
        hw = [f"{name}_h", f"{name}_w"] if name != "dilation" else []
        if any(p.HasField(f) for f in hw):
            self.require(nsp == 2, f"convolution_param.{hw[0]}",
                         f"{hw[0]}/{hw[1]} can only be used for 2-D convolution, "
                         f"the bottom has {nsp} spatial axes")
            self.require(not values, field,
                         f"either {name}{'_size' if name == 'kernel' else ''} or "
                         f"{hw[0]}/{hw[1]} should be specified, not both")
            if name == "pad":
                return (int(p.pad_h), int(p.pad_w))
            self.require(all(p.HasField(f) for f in hw), f"convolution_param.{hw[0]}",
                         f"give both {hw[0]} and {hw[1]}")
            return (int(getattr(p, hw[0])), int(getattr(p, hw[1])))
        if not values:
            self.require(default is not None, field,
                         "kernel_size (or kernel_h and kernel_w) is required")
            return (int(default),) * nsp
        self.require(len(values) in (1, nsp), field,
                     f"give one value or one per spatial axis ({nsp}), got {len(values)}")
        return tuple(int(v) for v in values) * (nsp if len(values) == 1 else 1)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == self.num_axes, "bottom",
                     f"bottom num_axes may not change (was {self.num_axes}, now {len(shape)})")
        self.require(shape[self.axis] == self.channels, "bottom",
                     f"input has {shape[self.axis]} channels, the weights expect {self.channels}")
        for i, b in enumerate(bottom[1:], 1):
            self.require(tuple(b.shape) == shape, "bottom",
                         f"all bottoms must have the same shape: bottom 0 is {shape}, "
                         f"bottom {i} is {tuple(b.shape)}")
        self.spatial = shape[self.axis + 1:]
        self.out = im2col_k.conv_output_shape(self.spatial, self.kernel, self.stride, self.pad,
                                              self.dilation)
        self.require(all(o > 0 for o in self.out), "convolution_param",
                     f"input spatial size {self.spatial} is smaller than the dilated kernel "
                     f"(kernel {self.kernel}, dilation {self.dilation}, pad {self.pad})")
        self.num = math.prod(shape[: self.axis])
        # NOTE: for stride 1, dx is itself a convolution of dy; its im2col copy is cheaper than
        # col2im's strided adds, even with twice as many channels to copy (CIFAR10-quick conv3,
        # 32 → 64 channels: 7.3 → 5.8 ms backward).
        self.full_conv = (all(st == 1 for st in self.stride)
                          and self.num_output <= 2 * self.channels
                          and all(d * (k - 1) >= p for k, d, p in
                                  zip(self.kernel, self.dilation, self.pad)))
        # NOTE: the layout whose im2col copies the longer contiguous runs (kernels/im2col.py):
        # channels-last for 32 channels, channels-first for CIFAR10-quick's 3-channel conv1.
        cg = self.channels // self.group
        self.channels_last = (cg * (self.kernel[-1] if self.dilation[-1] == 1 else 1)
                              >= (self.out[-1] if self.stride[-1] == 1 else 1))
        # NOTE: im2col writes ~Πk times the input, which the GEMM then reads back: over the whole
        # batch that streams through DRAM (82 MB for CIFAR10-quick conv2). In chunks of images
        # whose cols fit in the CPU cache the copy measured 3.5x faster and the GEMMs read cached
        # operands (conv2's forward: 11.2 → 5.8 ms). So the layer runs chunk by chunk, and
        # backward recomputes each chunk's cols instead of keeping them.
        image_bytes = self.dtype.itemsize * math.prod(self.kernel) * max(
            self.channels * math.prod(self.out),  # cols (and col2im's)
            self.num_output * math.prod(self.spatial) if self.full_conv else 0)
        self.chunk = (self.num if self.xp is not np
                      else max(1, min(self.num, CHUNK_BYTES // image_bytes)))
        for t in top:
            t.reshape((*shape[: self.axis], self.num_output, *self.out))
        if not hasattr(self, "_bufs"):
            self._bufs = _Buffers(self.xp, self.dtype)
        if getattr(self, "_plan_key", None) != (shape, self.chunk):
            self._plan_key, self._plans = (shape, self.chunk), {}  # im2col views of the buffers

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

    def _w_cols(self, flip: bool = False) -> Any:
        """The weights as ``(G, Og, ΠK·Cg)`` in the order of a ``cols`` row (flipped kernels as
        ``(G, Og·ΠK, Cg)`` for the full convolution)."""
        _, g, ckg, og, _, _ = self._dims()
        nsp, cg, xp = len(self.kernel), self.channels // g, self.xp
        w = self.blobs[0].data.reshape(g, og, cg, *self.kernel)
        if flip:  # rot180 of every kernel, rows (k, o) or (o, k) as dy's cols
            w = w[(Ellipsis, *[slice(None, None, -1)] * nsp)]
            w = w.transpose(0, *range(3, 3 + nsp), 1, 2) if self.channels_last else \
                w.transpose(0, 1, *range(3, 3 + nsp), 2)
            return xp.ascontiguousarray(w).reshape(g, og * (ckg // cg), cg)
        if self.channels_last:
            w = xp.ascontiguousarray(xp.moveaxis(w, 2, -1))
        return w.reshape(g, og, ckg)

    def _cols(self, x: Any, channels: int, spatial: Sequence[int], out: Sequence[int],
              pad: Sequence[int], stride: Sequence[int], tag: str) -> Any:
        """The ``cols`` matrices ``(G, m·ΠOut, ΠK·Cg)`` (or transposed, channels-first) of the
        ``m`` images ``x`` ``(m, channels, *spatial)``, in buffers named after ``tag``."""
        m, g, cl = x.shape[0], self.group, self.channels_last
        plan = self._plans.get((tag, m))
        if plan is None:  # the buffers' views for chunks of m images, made once
            cols = self._bufs.get(tag, im2col_k.cols_shape(self.chunk, channels, out,
                                                           self.kernel, g, cl))
            cols = cols[:, :m] if cl else \
                cols[(Ellipsis, slice(0, m), *(slice(None),) * len(out))]
            xpad = self._bufs.get(tag + "_pad", im2col_k.padded_shape(
                (self.chunk, channels, *spatial), pad, cl), fill=0.0)
            xpad = xpad[:m] if cl else xpad[:, :m]
            unfold = im2col_k.Unfold(self.xp, cols, xpad, x.shape, self.kernel, stride, pad,
                                     self.dilation, g, cl)
            rows, positions = channels // g * math.prod(self.kernel), m * math.prod(out)
            plan = (unfold, cols.reshape((g, positions, rows) if cl else (g, rows, positions)))
            self._plans[(tag, m)] = plan
        plan[0](x)
        return plan[1]

    def _x_cols(self, x: Any) -> Any:
        """The ``cols`` of a chunk ``x`` of the bottom (see :meth:`_cols`)."""
        return self._cols(x, self.channels, self.spatial, self.out, self.pad, self.stride, "cols")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        n, g, ckg, og, p, s = self._dims()
        xp = self.xp
        bias = self.blobs[1].data.reshape(g, og, 1) if self.bias_term else None
        if self.is_1x1:
            w = self.blobs[0].data.reshape(g, og, ckg)
            for b, t in zip(bottom, top):
                # NOTE: one GEMM per image (broadcast over N), written straight into the top.
                y = xp.matmul(w, b.data.reshape(n, g, ckg, s), out=t.data.reshape(n, g, og, p))
                if bias is not None:
                    y += bias
            return
        w = self._w_cols()
        for b, t in zip(bottom, top):
            x, y = b.data.reshape(n, self.channels, *self.spatial), t.data.reshape(n, g, og, p)
            for lo, hi in self._chunks():
                cols, out = self._x_cols(x[lo:hi]), self._mat("out", hi - lo, og, p)
                if self.channels_last:
                    xp.matmul(cols, w.transpose(0, 2, 1), out=out)  # (G, m·P, Og)
                else:
                    xp.matmul(w, cols, out=out)  # (G, Og, m·P)
                im2col_k.to_blob(xp, out, y[lo:hi], bias, self.channels_last)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        n, g, _, og, p, _ = self._dims()
        for i, (t, b) in enumerate(zip(top, bottom)):
            dy = t.diff.reshape(n, g, og, p)
            if self.bias_term:
                self.blobs[1].diff[...] += dy.sum(axis=(0, 3)).reshape(-1)
            if self.is_1x1:
                self._backward_1x1(dy, b, propagate_down[i])
            elif propagate_down[i] and self.full_conv:
                self._backward_full_conv(dy, b)
            else:
                self._backward_x_cols(dy, b, propagate_down[i])

    def _backward_x_cols(self, dy: Any, bottom: Blob, propagate_down: bool) -> None:
        """``dW_g += dy_gᵀ @ cols_g`` (cols recomputed per chunk: cheaper than keeping them, see
        reshape) and, if asked, ``dx = col2im(dy_g @ W_g)``."""
        n, g, ckg, og, p, _ = self._dims()
        xp, cl, cg = self.xp, self.channels_last, self.channels // g
        w = self._w_cols()
        x = bottom.data.reshape(n, self.channels, *self.spatial)
        dx = bottom.diff.reshape(n, self.channels, *self.spatial)
        dw = self._bufs.get("dw", (g, ckg, og))  # Σ over chunks of cols_g · dy_g
        dw[...] = 0
        for lo, hi in self._chunks():
            dym = im2col_k.from_blob(dy[lo:hi], self._mat("out", hi - lo, og, p), cl)
            cols = self._x_cols(x[lo:hi])
            if cl:
                dw += xp.matmul(cols.transpose(0, 2, 1), dym)
            else:
                dw += xp.matmul(cols, dym.transpose(0, 2, 1))
            if propagate_down:
                self._col2im(w, dym, dx[lo:hi])
        # rows of dw: (*K, Cg) channels-last, (Cg, *K) channels-first → (G, Og, Cg, *K)
        dw = dw.reshape(g, *self.kernel, cg, og) if cl else dw.reshape(g, cg, *self.kernel, og)
        self.blobs[0].diff.reshape(g, og, cg, *self.kernel)[...] += \
            xp.moveaxis(dw, (-1, -2), (1, 2)) if cl else xp.moveaxis(dw, -1, 1)

    def _backward_1x1(self, dy: Any, bottom: Blob, propagate_down: bool) -> None:
        """1×1 kernel, stride 1, pad 0: ``dW_g += Σ_n dy[n]_g @ x[n]_gᵀ``,
        ``dx[n]_g = W_gᵀ @ dy[n]_g``."""
        n, g, ckg, og, _, s = self._dims()
        xp = self.xp
        x = bottom.data.reshape(n, g, ckg, s)
        wdiff = self.blobs[0].diff.reshape(g, og, ckg)
        for j in range(g):
            wdiff[j] += xp.tensordot(dy[:, j], x[:, j], axes=((0, 2), (0, 2)))
        if propagate_down:
            w = self.blobs[0].data.reshape(g, og, ckg)
            xp.matmul(w.transpose(0, 2, 1), dy, out=bottom.diff.reshape(n, g, ckg, s))

    def _col2im(self, w: Any, dym: Any, dx: Any) -> None:
        """``dx = col2im(dy_g @ W_g)`` for one chunk (``dym``: dy in the product layout, ``w``:
        :meth:`_w_cols`)."""
        m, (_, g, ckg, _, p, _) = dx.shape[0], self._dims()
        cl, xp = self.channels_last, self.xp
        dcols = self._mat("dcols", m, ckg, p)
        if cl:
            xp.matmul(dym, w, out=dcols)  # (G, m·P, ΠK·Cg)
        else:
            xp.matmul(w.transpose(0, 2, 1), dym, out=dcols)  # (G, Cg·ΠK, m·P)
        dxpad = self._bufs.get("dxpad", im2col_k.padded_shape(
            (self.chunk, *dx.shape[1:]), self.pad, cl))
        dxpad = dxpad[:m] if cl else dxpad[:, :m]
        shape = im2col_k.cols_shape(m, self.channels, self.out, self.kernel, g, cl)
        im2col_k.col2im(xp, dcols.reshape(shape), dx, dxpad, self.kernel, self.stride,
                        self.pad, self.dilation, g, cl)

    def _backward_full_conv(self, dy: Any, bottom: Blob) -> None:
        """Stride 1: dx is the "full" convolution of dy with the flipped kernel, and the weight
        gradient a product with the same cols of dy, so x needs no im2col:

        ``dycols = im2col(dy, pad = dil·(k−1) − pad)``, ``dx_g = dycols_g @ rot180(W_g)``,
        ``rot180(dW_g) += dycols_gᵀ @ x_g`` (per chunk; ``x_g`` as an ``(m·ΠS, Cg)`` matrix).
        """
        n, g, _, og, _, s = self._dims()
        xp, cl, cg, nsp = self.xp, self.channels_last, self.channels // g, len(self.kernel)
        q = tuple(d * (k - 1) - p for k, d, p in zip(self.kernel, self.dilation, self.pad))
        wr = self._w_cols(flip=True)  # (G, Og·ΠK, Cg), rows ordered like dycols'
        dwr = self._bufs.get("dwr", wr.shape)  # Σ over chunks of dycols_gᵀ @ x_g
        dwr[...] = 0
        x = bottom.data.reshape(n, g, cg, s)
        dx = bottom.diff.reshape(n, g, cg, s)
        dy = dy.reshape(n, self.num_output, *self.out)
        for lo, hi in self._chunks():
            m = hi - lo
            cols = self._cols(dy[lo:hi], self.num_output, self.out, self.spatial, q,
                              (1,) * nsp, "dycols")
            xm = im2col_k.from_blob(x[lo:hi], self._mat("x_mat", m, cg, s), cl)
            out = self._mat("dx_mat", m, cg, s)
            if cl:  # cols (G, m·S, ΠK·Og), xm and out (G, m·S, Cg)
                dwr += xp.matmul(cols.transpose(0, 2, 1), xm)
                xp.matmul(cols, wr, out=out)
            else:  # cols (G, Og·ΠK, m·S), xm and out (G, Cg, m·S)
                dwr += xp.matmul(cols, xm.transpose(0, 2, 1))
                xp.matmul(wr.transpose(0, 2, 1), cols, out=out)
            im2col_k.to_blob(xp, out, dx[lo:hi], None, cl)
        # rows of dwr: (*K, Og) channels-last, (Og, *K) channels-first, kernels flipped
        dwr = dwr.reshape(g, *self.kernel, og, cg) if cl else dwr.reshape(g, og, *self.kernel, cg)
        dwr = dwr[(Ellipsis, *[slice(None, None, -1)] * nsp, slice(None), slice(None))] if cl \
            else dwr[(Ellipsis, *[slice(None, None, -1)] * nsp, slice(None))]
        self.blobs[0].diff.reshape(g, og, cg, *self.kernel)[...] += \
            xp.moveaxis(dwr, (-2, -1), (1, 2)) if cl else xp.moveaxis(dwr, -1, 2)


@register_layer("Pooling")
class PoolingLayer(Layer):
    """2-D max or average pooling (Caffe's ``Pooling``).

    Shapes:
        bottom: ``(N, C, H, W)``.
        top 0: ``(N, C, OH, OW)``, ``OH = ceil((H + 2·pad_h − k_h) / s_h) + 1`` (floor with
        ``round_mode: FLOOR``), minus one if ``pad_h > 0`` and ``(OH − 1)·s_h ≥ H + pad_h``.
        top 1 (MAX only, optional): the argmax mask, flat index ``h·W + w`` within the channel.

    Params (``pooling_param``): pool MAX (default) / AVE (STOCHASTIC is not supported),
    kernel_size or kernel_h/kernel_w (required unless global_pooling), stride (1) or
    stride_h/stride_w, pad (0) or pad_h/pad_w, global_pooling (false: kernel = H×W, pad 0,
    stride 1), round_mode CEIL (default) / FLOOR.

    Forward: window ``[o·s − pad, o·s − pad + k)`` per axis. MAX: the maximum over the window
    clipped to the image (ties: the first in row-major order). AVE: the sum over the window
    clipped to the image divided by the window size clipped to ``[−pad, in + pad)`` (padded cells
    count in the divisor).

    Backward: MAX routes ``dy`` to the argmax cell; AVE spreads ``dy / area`` over the window;
    contributions of overlapping windows add up.
    """

    exact_num_bottom = 1
    min_top = 1
    max_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.pooling_param
        self.pool = int(p.pool)
        self.require(self.pool != STOCHASTIC, "pooling_param.pool",
                     "STOCHASTIC pooling is not supported; use MAX or AVE")
        self.require(self.pool in (MAX, AVE), "pooling_param.pool", f"unknown method {self.pool}")
        self.require(len(top) == 1 or self.pool == MAX, "top",
                     "only MAX pooling has a second top (the argmax mask)")
        self.global_pooling = bool(p.global_pooling)
        self.ceil_mode = int(p.round_mode) == CEIL
        has_k, has_hw = p.HasField("kernel_size"), p.HasField("kernel_h") or p.HasField("kernel_w")
        if self.global_pooling:
            self.require(not (has_k or has_hw), "pooling_param.global_pooling",
                         "with global_pooling: true the kernel size cannot be specified")
            self.kernel = (0, 0)  # set from the bottom in reshape
        else:
            self.require(not (has_k and has_hw), "pooling_param.kernel_size",
                         "give kernel_size OR kernel_h and kernel_w, not both")
            self.require(has_k or (p.HasField("kernel_h") and p.HasField("kernel_w")),
                         "pooling_param.kernel_size",
                         "kernel_size is required (or both kernel_h and kernel_w)")
            self.kernel = ((p.kernel_size,) * 2 if has_k else (p.kernel_h, p.kernel_w))
            self.require(min(self.kernel) > 0, "pooling_param.kernel_size",
                         f"filter dimensions must be nonzero, got {self.kernel}")
        self.pad = self._pair(p, "pad")
        self.stride = self._pair(p, "stride")
        self.require(min(self.stride) > 0, "pooling_param.stride",
                     f"stride must be nonzero, got {self.stride}")
        if self.global_pooling:
            self.require(self.pad == (0, 0) and self.stride == (1, 1),
                         "pooling_param.global_pooling",
                         "with global_pooling: true only pad = 0 and stride = 1 are allowed")
        else:
            self.require(self.pad[0] < self.kernel[0] and self.pad[1] < self.kernel[1],
                         "pooling_param.pad", f"pad {self.pad} must be smaller than the kernel "
                         f"{self.kernel}")

    def _pair(self, p: Any, name: str) -> tuple[int, int]:
        has_h, has_w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        if not (has_h or has_w):
            return (int(getattr(p, name)),) * 2
        self.require(has_h and has_w and not p.HasField(name), f"pooling_param.{name}",
                     f"give {name} OR both {name}_h and {name}_w")
        return (int(getattr(p, f"{name}_h")), int(getattr(p, f"{name}_w")))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == 4, "bottom",
                     f"input must have 4 axes (num, channels, height, width), got {shape}")
        n, c, h, w = shape
        if self.global_pooling:
            self.kernel = (h, w)
        self.out = tuple(pool_k.pooled_size(s, k, st, p, self.ceil_mode) for s, k, st, p in
                         zip((h, w), self.kernel, self.stride, self.pad))
        self.require(min(self.out) > 0, "pooling_param.kernel_size",
                     f"kernel {self.kernel} (pad {self.pad}) does not fit the {h}×{w} input")
        # NOTE: a kernel covering the unpadded image is a reduction, not kh·kw window passes.
        self.whole = self.kernel == (h, w) and self.pad == (0, 0)
        for t in top:
            t.reshape(n, c, *self.out)
        if not hasattr(self, "_bufs"):
            self._bufs = _Buffers(self.xp, self.dtype)
        if self.pool == AVE:
            area = pool_k.ave_divisor((h, w), self.kernel, self.stride, self.pad, self.out)
            self.inv_area = self.xp.asarray(1.0 / area, dtype=self.dtype)
        self.arg_dtype = np.uint8 if max(self.kernel) <= 256 else np.int32
        self.phases = pool_k.phases(shape, self.kernel, self.stride, self.pad, self.out)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        n, c, h, w = x.shape
        if self.whole:
            xr = x.reshape(n, c, h * w)
            if self.pool == MAX:
                self.argk = self._bufs.get("argk", y.shape, dtype=np.int64)
                self.argk[..., 0, 0] = xr.argmax(axis=2)
                y[..., 0, 0] = xr.max(axis=2)
            else:
                y[..., 0, 0] = xr.sum(axis=2) * (1.0 / (h * w))
        elif self.pool == MAX:
            pool_k.max_forward(self.xp, x, y, self.phases, self._bufs, self.arg_dtype)
            if len(top) > 1:
                self.argk = pool_k.max_argk(self.xp, self.phases, self._bufs, self.arg_dtype)
        else:
            pool_k.ave_forward(self.xp, x, y, self.inv_area, self.phases, self._bufs)
        if len(top) > 1:
            top[1].data[...] = self._mask_index(w).reshape(top[1].shape)

    def _mask_index(self, width: int) -> Any:
        """Caffe's mask: flat input index ``h·W + w`` of each window's argmax."""
        xp, kw = self.xp, self.kernel[1]
        rows = xp.arange(self.out[0]) * self.stride[0] - self.pad[0]
        cols = xp.arange(self.out[1]) * self.stride[1] - self.pad[1]
        k = self.argk.reshape(-1, *self.out)
        return (rows[:, None] + k // kw) * width + (cols[None, :] + k % kw)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        n, c, h, w = dx.shape
        if self.whole:
            dxr = dx.reshape(n * c, h * w)
            if self.pool == MAX:
                dxr[...] = 0
                rows = self.xp.arange(n * c)
                dxr[rows, self.argk.reshape(-1)] = dy.reshape(-1)
            else:
                dxr[...] = dy.reshape(n * c, 1) * (1.0 / (h * w))
        elif self.pool == MAX:
            pool_k.max_backward(self.xp, dy, dx, self.phases, self._bufs, self.arg_dtype)
        else:
            pool_k.ave_backward(self.xp, dy, dx, self.inv_area, self.phases, self._bufs)


@register_layer("LRN")
class LRNLayer(Layer):
    """Local response normalisation (Caffe's ``LRN``).

    Shapes: bottom ``(N, C, H, W)`` → top of the same shape.

    Params (``lrn_param``): local_size n (5, odd), alpha (1), beta (0.75), k (1),
    norm_region ACROSS_CHANNELS (default) / WITHIN_CHANNEL.

    Forward: ``y = x · s^(−β)`` with, per region,
    ACROSS_CHANNELS: ``s_c = k + (α/n) · Σ_{|c'−c| ≤ (n−1)/2} x_{c'}²`` (channels clipped);
    WITHIN_CHANNEL (Caffe's square → AVE pool (kernel n, stride 1, pad (n−1)/2) → power
    composition, so the divisor is always n² and ``k`` is unused):
    ``s = 1 + (α/n²) · Σ_{n×n box clipped to the image} x²``.

    Backward (the window is symmetric, so the same window sum serves):
    ``dx = dy · s^(−β) − 2β·coef · x · Σ_window (dy · y / s)`` with ``coef = α/n`` (ACROSS) or
    ``α/n²`` (WITHIN).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.lrn_param
        self.size = int(p.local_size)
        self.require(self.size % 2 == 1, "lrn_param.local_size",
                     f"LRN only supports odd values for local_size, got {self.size}")
        self.alpha, self.beta = float(p.alpha), float(p.beta)
        self.region = int(p.norm_region)
        self.require(self.region in (ACROSS_CHANNELS, WITHIN_CHANNEL), "lrn_param.norm_region",
                     f"unknown norm_region {self.region}")
        across = self.region == ACROSS_CHANNELS
        self.coef = self.alpha / (self.size if across else self.size**2)
        self.k = float(p.k) if across else 1.0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == 4, "bottom",
                     f"input must have 4 axes (num, channels, height, width), got {shape}")
        top[0].reshape(shape)
        if not hasattr(self, "_bufs"):
            self._bufs = _Buffers(self.xp, self.dtype)

    def _summand(self, shape: Sequence[int]) -> Any:
        """Where to write the array whose local window sums :meth:`_local_sum` computes."""
        n, c, h, w = shape
        if self.region == ACROSS_CHANNELS:
            buf = self._bufs.get("across", (n, c + self.size - 1, h, w), fill=0.0)
            return pool_k.pad_view(buf, self.size, 1)
        buf = self._bufs.get("rows", (n, c, h + self.size - 1, w), fill=0.0)
        return pool_k.pad_view(buf, self.size, 2)

    def _local_sum(self, out: Any) -> Any:
        """``out`` = window sums of what was last written into :meth:`_summand`."""
        n, c, h, w = out.shape
        if self.region == ACROSS_CHANNELS:
            across = self._bufs.get("across", (n, c + self.size - 1, h, w), fill=0.0)
            return pool_k.window_sum(across, self.size, 1, out)
        rows = self._bufs.get("rows", (n, c, h + self.size - 1, w), fill=0.0)
        cols = self._bufs.get("cols", (n, c, h, w + self.size - 1), fill=0.0)
        pool_k.window_sum(rows, self.size, 2, pool_k.pad_view(cols, self.size, 3))
        return pool_k.window_sum(cols, self.size, 3, out)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x = self.xp, bottom[0].data
        xp.multiply(x, x, out=self._summand(x.shape))
        scale = self._local_sum(self._bufs.get("scale", x.shape))
        scale *= self.coef
        scale += self.k
        spow = xp.power(scale, -self.beta, out=self._bufs.get("spow", x.shape))
        xp.multiply(x, spow, out=top[0].data)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        xp, x, dy, y = self.xp, bottom[0].data, top[0].diff, top[0].data
        scale, spow = self._bufs.get("scale", x.shape), self._bufs.get("spow", x.shape)
        r = xp.multiply(dy, y, out=self._summand(x.shape))
        r /= scale
        t = self._local_sum(self._bufs.get("tmp", x.shape))
        t *= x
        t *= -2.0 * self.beta * self.coef
        xp.multiply(dy, spow, out=bottom[0].diff)
        bottom[0].diff[...] += t
