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


class _Buffers:
    """Scratch arrays kept between calls, reallocated only when their shape changes."""

    def __init__(self, xp: Any, dtype: Any) -> None:
        self.xp, self.dtype, self._arrays = xp, dtype, {}

    def get(self, name: str, shape: Sequence[int], fill: float | None = None,
            dtype: Any = None) -> Any:
        """The buffer ``name`` of ``shape``; a new one is filled with ``fill`` (or left empty)."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype or self.dtype)
        arr = self._arrays.get(name)
        if arr is None or arr.shape != shape or arr.dtype != dtype:
            arr = (self.xp.empty(shape, dtype) if fill is None
                   else self.xp.full(shape, fill, dtype))
            self._arrays[name] = arr
        return arr


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

    Forward (per group g, whole batch): ``cols = im2col(x)`` of shape ``(C·Πk, N·ΠOut)``,
    ``y_g = W_g @ cols_g + b_g``. A 1×1 kernel with stride 1 and pad 0 skips im2col:
    ``y[n]_g = W_g @ x[n]_g``.

    Backward: ``dW_g += dy_g @ cols_gᵀ`` (cols saved by forward); ``db += Σ_{n, positions} dy``;
    ``dx = col2im(W_gᵀ @ dy_g)`` (overlapping windows add up), or, for stride 1 when
    ``O ≤ C``, the equal and faster "full" convolution
    ``dx_g = rot180(W_g)ᵀ @ im2col(dy_g, pad = dil·(k−1) − pad)``.
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
        # col2im's strided adds when dy has no more channels than x (measured 24 → 17 ms on
        # CIFAR10-quick conv2; slower when num_output > channels).
        self.full_conv = (all(st == 1 for st in self.stride) and self.num_output <= self.channels
                          and all(d * (k - 1) >= p for k, d, p in
                                  zip(self.kernel, self.dilation, self.pad)))
        for t in top:
            t.reshape((*shape[: self.axis], self.num_output, *self.out))
        if not hasattr(self, "_bufs"):
            self._bufs = _Buffers(self.xp, self.dtype)

    # -- shapes as 2-D / 3-D matrices -------------------------------------------------------------
    def _dims(self) -> tuple[int, int, int, int, int, int]:
        """``(N, G, Cg·Πk, Og, ΠOut, ΠS)``."""
        g = self.group
        ckg = self.channels // g * math.prod(self.kernel)
        return self.num, g, ckg, self.num_output // g, math.prod(self.out), math.prod(self.spatial)

    def _cols(self, i: int, bottom: Blob) -> Any:
        """``cols`` ``(C·Πk, N·ΠOut)`` of bottom i, computed into a per-bottom buffer."""
        n, _, _, _, p, _ = self._dims()
        x = bottom.data.reshape(n, self.channels, *self.spatial)
        cols = self._bufs.get(f"cols{i}", (self.channels, *self.kernel, n, *self.out))
        xpad = self._bufs.get("xpad", im2col_k.padded_shape(x.shape, self.pad), fill=0.0)
        im2col_k.im2col(x, cols, xpad, self.kernel, self.stride, self.pad, self.dilation)
        return cols.reshape(self.channels * math.prod(self.kernel), n * p)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        n, g, ckg, og, p, s = self._dims()
        w = self.blobs[0].data.reshape(g, og, ckg)  # (G, Og, Cg·Πk)
        bias = self.blobs[1].data.reshape(-1, 1) if self.bias_term else None
        for i, (b, t) in enumerate(zip(bottom, top)):
            y = t.data.reshape(n, self.num_output, p)
            if self.is_1x1:
                # NOTE: one GEMM per image (broadcast over N), written straight into the top.
                self.xp.matmul(w, b.data.reshape(n, g, ckg, s),
                               out=y.reshape(n, g, og, p))
                if bias is not None:
                    y += bias
                continue
            cols = self._cols(i, b)
            out = self._bufs.get("o_np", (self.num_output, n * p))  # (O, N·ΠOut)
            for j in range(g):
                self.xp.matmul(w[j], cols[j * ckg:(j + 1) * ckg], out=out[j * og:(j + 1) * og])
            out3 = out.reshape(self.num_output, n, p).swapaxes(0, 1)
            if bias is not None:
                self.xp.add(out3, bias, out=y)
            else:
                y[...] = out3

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        n, g, ckg, og, p, s = self._dims()
        w = self.blobs[0].data.reshape(g, og, ckg)
        wdiff = self.blobs[0].diff.reshape(g, og, ckg)
        for i, (t, b) in enumerate(zip(top, bottom)):
            dy = t.diff.reshape(n, self.num_output, p)
            if self.is_1x1:
                dyg, x = dy.reshape(n, g, og, p), b.data.reshape(n, g, ckg, s)
                if self.bias_term:
                    self.blobs[1].diff[...] += dy.sum(axis=(0, 2))
                for j in range(g):
                    wdiff[j] += self.xp.tensordot(dyg[:, j], x[:, j], axes=((0, 2), (0, 2)))
                if propagate_down[i]:
                    self.xp.matmul(w.swapaxes(1, 2), dyg, out=b.diff.reshape(n, g, ckg, s))
                continue
            dy2 = self._bufs.get("o_np", (self.num_output, n * p))  # (O, N·ΠOut), reused
            dy2.reshape(self.num_output, n, p)[...] = dy.swapaxes(0, 1)
            if self.bias_term:
                self.blobs[1].diff[...] += dy2.sum(axis=1)
            # the cols saved by forward for this bottom
            cols = self._bufs.get(f"cols{i}", (self.channels, *self.kernel, n, *self.out))
            cols = cols.reshape(g, ckg, n * p)
            for j in range(g):
                # NOTE: (cols @ dyᵀ)ᵀ runs ~1.5x faster in OpenBLAS than dy @ colsᵀ here
                wdiff[j] += (cols[j] @ dy2[j * og:(j + 1) * og].T).T
            if propagate_down[i] and self.full_conv:
                self._backward_full_conv(dy2, b)
            elif propagate_down[i]:
                self._backward_col2im(w, dy2, b)

    def _backward_col2im(self, w: Any, dy2: Any, bottom: Blob) -> None:
        """``bottom.diff = col2im(W_gᵀ @ dy_g)``."""
        n, g, ckg, og, p, _ = self._dims()
        dcols = self._bufs.get("dcols", (g * ckg, n * p))
        for j in range(g):
            self.xp.matmul(w[j].T, dy2[j * og:(j + 1) * og], out=dcols[j * ckg:(j + 1) * ckg])
        dx = bottom.diff.reshape(n, self.channels, *self.spatial)
        dxpad = self._bufs.get("dxpad", im2col_k.padded_shape(dx.shape, self.pad))
        im2col_k.col2im(dcols.reshape(self.channels, *self.kernel, n, *self.out), dx, dxpad,
                        self.kernel, self.stride, self.pad, self.dilation)

    def _backward_full_conv(self, dy2: Any, bottom: Blob) -> None:
        """``bottom.diff`` as the stride-1 "full" convolution of dy with the flipped kernel:
        ``dx_g = rot180(W_g)ᵀ @ im2col(dy_g, pad = dil·(k−1) − pad)``, no col2im."""
        n, g, _, og, _, s = self._dims()
        cg, nk, nsp = self.channels // g, math.prod(self.kernel), len(self.kernel)
        q = tuple(d * (k - 1) - p for k, d, p in zip(self.kernel, self.dilation, self.pad))
        # rot180 of every kernel, (O, Cg, *k) → (G, Cg, Og·Πk)
        w = self.blobs[0].data.reshape(g, og, cg, *self.kernel)
        wr = w[(Ellipsis, *[slice(None, None, -1)] * nsp)].swapaxes(1, 2)
        wr = self.xp.ascontiguousarray(wr).reshape(g, cg, og * nk)
        dy = dy2.reshape(self.num_output, n, *self.out).swapaxes(0, 1)  # (N, O, *Out)
        cols = self._bufs.get("dcols", (self.num_output, *self.kernel, n, *self.spatial))
        dypad = self._bufs.get("dypad", im2col_k.padded_shape(dy.shape, q), fill=0.0)
        im2col_k.im2col(dy, cols, dypad, self.kernel, (1,) * nsp, q, self.dilation)
        cols = cols.reshape(g, og * nk, n * s)
        out = self._bufs.get("c_ns", (g, cg, n * s))  # (G, Cg, N·ΠS)
        for j in range(g):
            self.xp.matmul(wr[j], cols[j], out=out[j])
        bottom.diff.reshape(n, self.channels, s)[...] = (
            out.reshape(self.channels, n, s).swapaxes(0, 1))


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
        self.padded = tuple(pool_k.padded_extent(s, k, st, p, o) for s, k, st, p, o in
                            zip((h, w), self.kernel, self.stride, self.pad, self.out))
        # NOTE: a kernel covering the unpadded image is a reduction, not kh·kw window passes.
        self.whole = self.kernel == (h, w) and self.pad == (0, 0)
        for t in top:
            t.reshape(n, c, *self.out)
        if not hasattr(self, "_bufs"):
            self._bufs = _Buffers(self.xp, self.dtype)
        if self.pool == AVE:
            area = pool_k.ave_divisor((h, w), self.kernel, self.stride, self.pad, self.out)
            self.inv_area = self.xp.asarray(1.0 / area, dtype=self.dtype)
        nk = self.kernel[0] * self.kernel[1]
        self.arg_dtype = np.uint8 if nk <= 256 else np.int32

    def _xpad(self, x: Any) -> Any:
        """``x`` with Caffe's padding and ceil overhang (``-inf`` for MAX, 0 for AVE)."""
        if self.padded == tuple(x.shape[2:]):
            return x
        fill = -np.inf if self.pool == MAX else 0.0
        xpad = self._bufs.get("xpad", (*x.shape[:2], *self.padded), fill=fill)
        (ph, pw), (h, w) = self.pad, x.shape[2:]
        xpad[:, :, ph:ph + h, pw:pw + w] = x
        return xpad

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        n, c, h, w = x.shape
        if self.pool == MAX:
            self.argk = self._bufs.get("argk", y.shape, dtype=self.arg_dtype)
        if self.whole:
            xr = x.reshape(n, c, h * w)
            if self.pool == MAX:
                self.argk[..., 0, 0] = xr.argmax(axis=2)
                y[..., 0, 0] = xr.max(axis=2)
            else:
                y[..., 0, 0] = xr.sum(axis=2) * (1.0 / (h * w))
        elif self.pool == MAX:
            gt = self._bufs.get("mask", y.shape, dtype=bool)
            kgt = self._bufs.get("kgt", y.shape, dtype=self.arg_dtype)
            pool_k.max_forward(self.xp, self._xpad(x), y, self.argk, gt, kgt, self.kernel,
                               self.stride)
        else:
            pool_k.ave_forward(self._xpad(x), y, self.inv_area, self.kernel, self.stride)
        if len(top) > 1:
            top[1].data[...] = self._mask_index(w)

    def _mask_index(self, width: int) -> Any:
        """Caffe's mask: flat input index ``h·W + w`` of each window's argmax."""
        xp, kw = self.xp, self.kernel[1]
        rows = xp.arange(self.out[0]) * self.stride[0] - self.pad[0]
        cols = xp.arange(self.out[1]) * self.stride[1] - self.pad[1]
        k = self.argk.astype(np.int64)
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
            return
        copy = self.padded != (h, w)
        dxpad = self._bufs.get("dxpad", (n, c, *self.padded)) if copy else dx
        tmp = self._bufs.get("tmp", dy.shape)
        if self.pool == MAX:
            eq = self._bufs.get("mask", dy.shape, dtype=bool)
            pool_k.max_backward(self.xp, dy, self.argk, dxpad, eq, tmp, self.kernel, self.stride)
        else:
            pool_k.ave_backward(self.xp, dy, self.inv_area, dxpad, tmp, self.kernel, self.stride)
        if copy:
            (ph, pw) = self.pad
            dx[...] = dxpad[:, :, ph:ph + h, pw:pw + w]


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
