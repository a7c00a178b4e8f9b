"""Vision layers: Pooling, LRN, SPP, Crop (Caffe's pooling, lrn, spp and crop layers).

Convolution, Deconvolution and Im2col live in :mod:`pycaffe_mpi.layer_types.conv`. The heavy
lifting lives in :mod:`pycaffe_mpi.kernels.pooling` (and :mod:`~pycaffe_mpi.kernels.stochastic_pool`
for STOCHASTIC pooling); these classes read the proto parameters,
check shapes, own the scratch buffers and call the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import cuda as cuda_k
from pycaffe_mpi.kernels import pooling as pool_k
from pycaffe_mpi.kernels import scratch
from pycaffe_mpi.kernels import stochastic_pool as sto_k
from pycaffe_mpi.layer import TRAIN, Layer, canonical_axis
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

_POOL = caffe_pb2.PoolingParameter  # PoolMethod (MAX, AVE, STOCHASTIC), RoundMode (CEIL, FLOOR)
_SPP = caffe_pb2.SPPParameter  # its own PoolMethod enum
_LRN = caffe_pb2.LRNParameter  # NormRegion: ACROSS_CHANNELS, WITHIN_CHANNEL


@register_layer("Pooling")
class PoolingLayer(Layer):
    """2-D max, average or stochastic pooling (Caffe's ``Pooling``).

    Shapes:
        bottom: ``(N, C, H, W)``.
        top 0: ``(N, C, OH, OW)``, ``OH = ceil((H + 2·pad_h − k_h) / s_h) + 1`` (floor with
        ``round_mode: FLOOR``), minus one if ``pad_h > 0`` and ``(OH − 1)·s_h ≥ H + pad_h``.
        top 1 (MAX only, optional): the argmax mask, flat index ``h·W + w`` within the channel.

    Params (``pooling_param``): pool MAX (default) / AVE / STOCHASTIC, kernel_size or
    kernel_h/kernel_w (required unless global_pooling), stride (1) or stride_h/stride_w, pad (0)
    or pad_h/pad_w (must be 0 for STOCHASTIC, as in Caffe), global_pooling (false: kernel = H×W,
    pad 0, stride 1), round_mode CEIL (default) / FLOOR.

    Forward: window ``[o·s − pad, o·s − pad + k)`` per axis, clipped to the image. MAX: the
    maximum over the window (ties: the first in row-major order). AVE: the window sum divided by
    the window size clipped to ``[−pad, in + pad)`` (padded cells count in the divisor).
    STOCHASTIC (for non-negative inputs, e.g. after ReLU; Caffe has it on GPU only, we on both):
    TRAIN draws ``u`` uniform in ``(0, 1]`` per output from ``self.rng`` and outputs the first
    cell ``x_m`` (row-major) with ``Σ_{m' ≤ m} x_{m'} ≥ u · Σ_window x``, i.e. a cell picked with
    probability ``x_m / Σ x``; TEST outputs the probability-weighted average
    ``Σ x² / Σ x`` (0 where ``Σ x ≤ 0``).

    Backward: MAX routes ``dy`` to the argmax cell; AVE spreads ``dy / area`` over the window;
    STOCHASTIC (TRAIN) routes ``dy`` to the cell picked by the last forward (a window that picked
    none, possible only when it is empty or with negative inputs, outputs 0 and passes nothing);
    contributions of overlapping windows add up. STOCHASTIC in TEST has no backward (Caffe's
    backward reads a sample index that its TEST forward never draws): asking for one raises.
    """

    exact_num_bottom = 1
    min_top = 1
    max_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.pooling_param
        self.pool = int(p.pool)
        self.require(self.pool in (_POOL.MAX, _POOL.AVE, _POOL.STOCHASTIC), "pooling_param.pool",
                     f"unknown method {self.pool}")
        self.require(len(top) == 1 or self.pool == _POOL.MAX, "top",
                     "only MAX pooling has a second top (the argmax mask)")
        self.global_pooling = bool(p.global_pooling)
        self.ceil_mode = int(p.round_mode) == _POOL.CEIL
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
        self.require(self.pad == (0, 0) or self.pool != _POOL.STOCHASTIC, "pooling_param.pad",
                     "padding is implemented only for MAX and AVE pooling, as in Caffe; "
                     f"STOCHASTIC needs pad 0, got {self.pad}")

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
            self._bufs = scratch.Buffers(self.xp, self.dtype)
        if self.pool == _POOL.STOCHASTIC:
            self.geom = sto_k.geometry(shape, self.kernel, self.stride, self.out)
            return
        if self.pool == _POOL.AVE:
            area = pool_k.ave_divisor((h, w), self.kernel, self.stride, self.pad, self.out)
            self.inv_area = self.xp.asarray(1.0 / area, dtype=self.dtype)
        self.geom = pool_k.geometry(shape, self.kernel, self.stride, self.pad, self.out)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        n, c, h, w = x.shape
        if self.pool == _POOL.STOCHASTIC:
            self._stochastic_forward(x, y)
            return
        if self.whole:
            xr = x.reshape(n, c, h * w)
            if self.pool == _POOL.MAX:
                self.argk = self._bufs.get("argk", y.shape, dtype=np.int64)
                self.argk[..., 0, 0] = xr.argmax(axis=2)
                y[..., 0, 0] = xr.max(axis=2)
            else:
                y[..., 0, 0] = xr.sum(axis=2) * (1.0 / (h * w))
        elif self.pool == _POOL.MAX:
            pool_k.max_forward(self.xp, x, y, self.geom, self._bufs)
            if len(top) > 1:
                self.argk = pool_k.max_argk(self.xp, self.geom, self._bufs)
        else:
            pool_k.ave_forward(self.xp, x, y, self.inv_area, self.geom, self._bufs)
        if len(top) > 1:
            top[1].data[...] = self._mask_index(w).reshape(top[1].shape)

    def _stochastic_forward(self, x: Any, y: Any) -> None:
        if self.phase != TRAIN:
            sto_k.weighted_average(self.xp, x, y, self.geom, self._bufs)
            return
        # NOTE: drawn in float64 on the host whatever the dtype and device, so float32, float64
        # and GPU runs sample the same cells from the same seed; 1 − [0, 1) is Caffe's (0, 1].
        u = self.xp.asarray(1.0 - self.rng.random(y.shape), dtype=self.dtype)
        self.pick = sto_k.sample(self.xp, x, u, y, self.geom, self._bufs)

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
        if self.pool == _POOL.STOCHASTIC:
            if self.phase != TRAIN:
                raise NotImplementedError(
                    f"{errors.layer_where(self.layer_param, self.location)}: STOCHASTIC pooling "
                    "has no backward in the TEST phase (as in Caffe); set propagate_down: false "
                    "for its bottom, or run the net in the TRAIN phase")
            sto_k.sample_backward(self.xp, dy, dx, *self.pick, self.geom)
            return
        if self.whole:
            dxr = dx.reshape(n * c, h * w)
            if self.pool == _POOL.MAX:
                dxr[...] = 0
                rows = self.xp.arange(n * c)
                dxr[rows, self.argk.reshape(-1)] = dy.reshape(-1)
            else:
                dxr[...] = dy.reshape(n * c, 1) * (1.0 / (h * w))
        elif self.pool == _POOL.MAX:
            pool_k.max_backward(self.xp, dy, dx, self.geom, self._bufs)
        else:
            pool_k.ave_backward(self.xp, dy, dx, self.inv_area, self.geom, self._bufs)


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
        self.require(self.region in (_LRN.ACROSS_CHANNELS, _LRN.WITHIN_CHANNEL),
                     "lrn_param.norm_region", f"unknown norm_region {self.region}")
        across = self.region == _LRN.ACROSS_CHANNELS
        self.coef = self.alpha / (self.size if across else self.size**2)
        self.k = float(p.k) if across else 1.0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == 4, "bottom",
                     f"input must have 4 axes (num, channels, height, width), got {shape}")
        top[0].reshape(shape)
        if not hasattr(self, "_bufs"):
            self._bufs = scratch.Buffers(self.xp, self.dtype)

    def _summand(self, shape: Sequence[int]) -> Any:
        """Where to write the array whose local window sums :meth:`_local_sum` computes."""
        n, c, h, w = shape
        if self.region == _LRN.ACROSS_CHANNELS:
            buf = self._bufs.get("across", (n, c + self.size - 1, h, w), fill=0.0)
            return pool_k.pad_view(buf, self.size, 1)
        buf = self._bufs.get("rows", (n, c, h + self.size - 1, w), fill=0.0)
        return pool_k.pad_view(buf, self.size, 2)

    def _local_sum(self, out: Any) -> Any:
        """``out`` = window sums of what was last written into :meth:`_summand`."""
        n, c, h, w = out.shape
        if self.region == _LRN.ACROSS_CHANNELS:
            across = self._bufs.get("across", (n, c + self.size - 1, h, w), fill=0.0)
            return pool_k.window_sum(across, self.size, 1, out)
        rows = self._bufs.get("rows", (n, c, h + self.size - 1, w), fill=0.0)
        cols = self._bufs.get("cols", (n, c, h, w + self.size - 1), fill=0.0)
        pool_k.window_sum(rows, self.size, 2, pool_k.pad_view(cols, self.size, 3))
        return pool_k.window_sum(cols, self.size, 3, out)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x = self.xp, bottom[0].data
        if self.region == _LRN.ACROSS_CHANNELS and cuda_k.enabled(xp):
            cuda_k.lrn_forward(x, self._bufs.get("scale", x.shape), top[0].data, self.size,
                               self.coef, self.k, self.beta)
            return
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
        if self.region == _LRN.ACROSS_CHANNELS and cuda_k.enabled(xp):
            cuda_k.lrn_backward(x, y, self._bufs.get("scale", x.shape), dy, bottom[0].diff,
                                self.size, self.coef, self.beta)
            return
        scale, spow = self._bufs.get("scale", x.shape), self._bufs.get("spow", x.shape)
        r = xp.multiply(dy, y, out=self._summand(x.shape))
        r /= scale
        t = self._local_sum(self._bufs.get("tmp", x.shape))
        t *= x
        t *= -2.0 * self.beta * self.coef
        xp.multiply(dy, spow, out=bottom[0].diff)
        bottom[0].diff[...] += t


@register_layer("SPP")
class SPPLayer(Layer):
    """Spatial pyramid pooling (Caffe's ``SPP``): pooling over 1, 2×2, 4×4, … bins of the whole
    image, flattened and concatenated.

    Shapes:
        bottom: ``(N, C, H, W)``.
        top: ``(N, C·Σ_{l<L} 4^l)`` (level ``l``'s ``(N, C, 2^l, 2^l)`` pooled map flattened,
        levels in order), or ``(N, C, 1, 1)`` when ``L = 1`` (Caffe's plain pooling).

    Params (``spp_param``): pyramid_height L (required, ≥ 1), pool MAX (default) / AVE /
    STOCHASTIC.

    Level ``l`` is a Pooling with ``b = 2^l`` bins per axis: ``kernel = stride = ceil(H / b)``,
    ``pad = (kernel·b − H + 1) // 2`` (the same along W); Caffe requires ``pad < kernel``, so
    small images allow only a few levels. STOCHASTIC pooling cannot pad (Caffe's rule), so with
    it ``2^(L−1)`` must divide H and W.

    Forward / backward: the levels' Pooling forward and backward (see :class:`PoolingLayer`);
    ``dx`` is the sum of the levels' input gradients. STOCHASTIC levels draw from ``self.rng`` in
    level order.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.spp_param
        self.height = int(p.pyramid_height)
        self.require(self.height >= 1, "spp_param.pyramid_height",
                     f"pyramid_height must be at least 1, got {self.height}")
        pools = {_SPP.MAX: _POOL.MAX, _SPP.AVE: _POOL.AVE, _SPP.STOCHASTIC: _POOL.STOCHASTIC}
        self.require(int(p.pool) in pools, "spp_param.pool", f"unknown method {p.pool}")
        self.pool = pools[int(p.pool)]
        self._hw: tuple[int, int] | None = None
        self._dx = self.new_blob(())  # the levels' input gradients after the first

    def _level_param(self, level: int, h: int, w: int) -> Any:
        """The Pooling parameter of ``level`` for an ``h × w`` image, as Caffe computes it."""
        bins = 2**level
        lp = caffe_pb2.LayerParameter(name=f"{self.name}_level{level}", type="Pooling")
        pp = lp.pooling_param
        pp.pool = self.pool
        for axis, size in (("h", h), ("w", w)):
            k = -(-size // bins)
            pad = (k * bins - size + 1) // 2
            self.require(pad < k, "spp_param.pyramid_height",
                         f"a {h}×{w} input is too small for pyramid_height {self.height}: "
                         f"level {level} needs {bins} bins of {k} cells with pad {pad} "
                         "(Caffe's pooling needs pad < kernel)")
            self.require(pad == 0 or self.pool != _POOL.STOCHASTIC, "spp_param.pool",
                         f"STOCHASTIC pooling cannot pad (as in Caffe): a {h}×{w} input needs "
                         f"pad {pad} at level {level} ({bins} bins of {k} cells); give an input "
                         f"whose height and width {2**(self.height - 1)} divides, or use MAX or "
                         "AVE")
            setattr(pp, f"kernel_{axis}", k)
            setattr(pp, f"stride_{axis}", k)
            setattr(pp, f"pad_{axis}", pad)
        return lp

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = tuple(bottom[0].shape)
        self.require(len(shape) == 4, "bottom",
                     f"input must have 4 axes (num, channels, height, width), got {shape}")
        n, _, h, w = shape
        self.require(h > 0 and w > 0, "bottom", f"input dimensions cannot be zero, got {shape}")
        if self._hw != (h, w):  # Caffe rebuilds the levels when the image size changes
            self._hw = (h, w)
            self.levels = []
            for level in range(self.height):
                pool = PoolingLayer(self._level_param(level, h, w), phase=self.phase,
                                    backend=self.backend, dtype=self.dtype, rng=self.rng)
                pool.location = self.location
                pool.setup(bottom, [self.new_blob(())])
                self.levels.append((pool, self.new_blob(())))
        for pool, out in self.levels:
            pool.reshape(bottom, [out])
        if self.height == 1:
            top[0].reshape(self.levels[0][1].shape)
        else:
            top[0].reshape(n, sum(math.prod(out.shape[1:]) for _, out in self.levels))
        if self.height > 1:
            self._dx.reshape(shape)

    def _slices(self) -> list[slice]:
        """Columns of the top holding each level."""
        out, lo = [], 0
        for _, blob in self.levels:
            size = math.prod(blob.shape[1:])
            out.append(slice(lo, lo + size))
            lo += size
        return out

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        n = bottom[0].shape[0]
        y = top[0].data.reshape(n, -1)
        for (pool, out), cols in zip(self.levels, self._slices()):
            pool.rng = self.rng  # shared, so the levels draw in turn from the layer's generator
            pool.forward(bottom, [out])
            y[:, cols] = out.data.reshape(n, -1)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        n = bottom[0].shape[0]
        dy = top[0].diff.reshape(n, -1)
        for i, ((pool, out), cols) in enumerate(zip(self.levels, self._slices())):
            out.diff.reshape(n, -1)[...] = dy[:, cols]
            # NOTE: level 0 writes dx, the others write a scratch diff that is added to it
            pool.backward([out], [True], [bottom[0] if i == 0 else self._dx])
            if i > 0:
                bottom[0].diff[...] += self._dx.diff


@register_layer("Crop")
class CropLayer(Layer):
    """Crop bottom 0 to the shape of bottom 1 from the axis ``axis`` on (Caffe's ``Crop``).

    Shapes:
        bottom 0: ``(d_0, …, d_{A−1})``, the data.
        bottom 1: same number of axes; only its shape is read (axes ``≥ axis``).
        top: ``d_i`` for ``i < axis``, bottom 1's size for ``i ≥ axis``.

    Params (``crop_param``): axis (2; negative counts from the end), offset (repeated, default
    none = 0): one value for every cropped axis, or one per axis from ``axis`` on. Requires
    ``offset_i + top_i ≤ d_i``.

    Forward: ``y[i] = x[i + offset]`` (offset 0 on the axes before ``axis``).

    Backward: ``dx`` is ``dy`` at the cropped region and 0 elsewhere. Bottom 1 has no gradient
    (only its shape is used; Caffe writes none): it cannot be forced, and where propagate_down
    asks for it anyway its diff is set to zero.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.crop_param
        nd = bottom[0].num_axes
        self.axis = canonical_axis(self, p.axis, nd, "crop_param.axis")
        self.offsets = [int(v) for v in p.offset]
        self.require(len(self.offsets) <= 1 or self.axis + len(self.offsets) == nd,
                     "crop_param.offset",
                     f"give one offset, or one per axis from axis {self.axis} on "
                     f"({nd - self.axis}), got {len(self.offsets)}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        data, ref = tuple(bottom[0].shape), tuple(bottom[1].shape)
        self.require(len(ref) == len(data), "bottom",
                     f"bottom 1 must have as many axes as bottom 0 ({len(data)}), got {ref}")
        region, shape = [], list(data)
        for i in range(self.axis, len(data)):
            off = 0 if not self.offsets else self.offsets[
                0 if len(self.offsets) == 1 else i - self.axis]
            self.require(data[i] - off >= ref[i], "crop_param.offset",
                         f"the crop for axis {i} is out of bounds: size {ref[i]} at offset "
                         f"{off} does not fit bottom 0's {data[i]}")
            region.append(slice(off, off + ref[i]))
            shape[i] = ref[i]
        self.region = (*[slice(None)] * self.axis, *region)
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data[self.region]

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.region] = top[0].diff
        if len(propagate_down) > 1 and propagate_down[1]:
            bottom[1].diff[...] = 0
