"""Vision layers: Convolution, Pooling, LRN (Caffe's conv, pooling and lrn layers).

The heavy lifting lives in :mod:`pycaffe_mpi.kernels.im2col` and
:mod:`pycaffe_mpi.kernels.pooling`; these classes read the proto parameters, check shapes, own the
scratch buffers and call the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import im2col as im2col_k
from pycaffe_mpi.kernels import pooling as pool_k
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.registry import register_layer

MAX, AVE, STOCHASTIC = 0, 1, 2
CEIL, FLOOR = 0, 1
ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1


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
            self._bufs = im2col_k.Buffers(self.xp, self.dtype)
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
            self._bufs = im2col_k.Buffers(self.xp, self.dtype)

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
