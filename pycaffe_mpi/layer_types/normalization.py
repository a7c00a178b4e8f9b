"""Normalization and affine layers: BatchNorm, MVN, Bias, Scale (Caffe's semantics).

BatchNorm keeps only the statistics; the learned per-channel scale and shift of the paper are a
``Scale`` layer with ``bias_term: true`` after it, as in Caffe's ResNet prototxts. All four run
in place (``top: "x"`` = ``bottom: "x"``): whatever backward needs from the forward and cannot
read from the bottom is kept aside (BatchNorm's and MVN's normalized output, Scale's input), so
a later in-place layer that overwrites the top cannot corrupt the gradient.

On the host BatchNorm, Scale and Bias run the numba kernels of
:mod:`pycaffe_mpi.kernels.norm_cpu`. There BatchNorm keeps per-channel μ and 1/sqrt(σ² + ε) and
recomputes x̂ from its bottom; only in place does it keep x̂ (one full-size copy), and an
in-place Scale after it reads x̂ from the BatchNorm (copy or bottom) instead of keeping a copy of
its own: one copy for a BatchNorm + Scale pair in place (ResNet-50, MobileNet), none when
BatchNorm has a top of its own (DenseNet). On a GPU the NumPy/CuPy code keeps both copies.
Such an in-place pair also takes its gradient in one backward when a Net runs both layers'
backward in one call (``Scale.backward_with``, asked by ``Net.backward_from_to`` through
``Scale.backward_partner``).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import layer as layer_mod
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TEST, Layer
from pycaffe_mpi.registry import register_layer

_count = layer_mod.count_of
_canonical_axis = layer_mod.canonical_axis


@dataclasses.dataclass(frozen=True)
class _XHat:
    """Where a host BatchNorm's output x̂ (or a Scale's input) can be read back in backward:
    ``kept`` (a copy), or ``(bottom − mean)·inv_std`` recomputed from the BatchNorm's bottom
    ``(N, C, S)``."""

    kept: Any = None
    bottom: Any = None
    mean: Any = None
    inv_std: Any = None

    def scale_in_place(self, x: Any, scale: Any, bias: Any) -> bool:
        """``x = x·scale + bias`` in place (``x``: a blob's data ``(outer, dim, inner)``) if
        ``x`` still holds x̂, value for value; whether it did."""
        norm_cpu = _norm_cpu()
        if self.kept is not None:
            return (self.kept.size == x.size and self.kept.dtype == x.dtype
                    and norm_cpu.affine_in_place_checked(x, scale, bias,
                                                         kept=self.kept.reshape(x.shape)))
        return (self.bottom.shape == x.shape and self.bottom.dtype == x.dtype
                and norm_cpu.affine_in_place_checked(x, scale, bias, bottom=self.bottom,
                                                     mean=self.mean, inv_std=self.inv_std))


# NOTE: blob → the _XHat of the BatchNorm whose forward last wrote it. An in-place Scale right
# after it needs x̂ in its backward: it reads x̂ from there if its forward finds the blob
# unchanged (a layer in between may have written it), instead of keeping a full-size copy.
_XHATS: weakref.WeakKeyDictionary[Blob, _XHat] = weakref.WeakKeyDictionary()


def _norm_cpu() -> Any:
    # NOTE: imported on first use, so that importing the package does not import numba
    from pycaffe_mpi.kernels import norm_cpu

    return norm_cpu


def _reuse(xp: Any, buf: Any, like: Any) -> Any:
    """``buf`` when it has ``like``'s shape and dtype, else a new array for it (a buffer kept
    for backward is rewritten by every forward, not reallocated and faulted in again)."""
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
        return xp.empty_like(like)
    return buf


def _param_shape(layer: Layer, shape: Sequence[int], axis_param: int, num_axes: int,
                 msg: str, what: str) -> tuple[int, ...]:
    """The shape of a learned Bias/Scale blob: ``shape[axis : axis + num_axes]`` (to the end
    when num_axes is −1), with Caffe's checks."""
    axis = _canonical_axis(layer, axis_param, len(shape), f"{msg}.axis")
    layer.require(num_axes >= -1, f"{msg}.num_axes",
                  f"num_axes must be non-negative, or -1 to extend to the end of bottom[0]; "
                  f"got {num_axes}")
    if num_axes >= 0:
        layer.require(len(shape) >= axis + num_axes, f"{msg}.num_axes",
                      f"{what} blob's shape extends past bottom[0]'s shape {tuple(shape)} when "
                      f"applied starting with bottom[0] axis = {axis} (num_axes {num_axes})")
    end = len(shape) if num_axes == -1 else axis + num_axes
    return tuple(shape[axis:end])


def _broadcast_dims(layer: Layer, shape: Sequence[int], pshape: Sequence[int], axis_param: int,
                    msg: str, what: str) -> tuple[int, int, int]:
    """(outer, dim, inner): bottom[0] viewed as (outer, dim, inner) with the Bias/Scale operand
    of shape ``pshape`` (a blob or bottom[1]) lined up on the middle axis."""
    # NOTE: a scalar operand is placed at axis 0 whatever the axis parameter says (Caffe does
    # the same: the result is identical and the view is the simplest).
    axis = 0 if len(pshape) == 0 else _canonical_axis(layer, axis_param, len(shape),
                                                      f"{msg}.axis")
    layer.require(len(shape) >= axis + len(pshape), f"{msg}.axis",
                  f"{what} blob's shape {tuple(pshape)} extends past bottom[0]'s shape "
                  f"{tuple(shape)} when applied starting with bottom[0] axis = {axis}")
    for i, d in enumerate(pshape):
        layer.require(shape[axis + i] == d, f"{msg}.axis",
                      f"dimension mismatch between bottom[0]->shape({axis + i}) = "
                      f"{shape[axis + i]} and {what}->shape({i}) = {d}")
    return _count(shape, 0, axis), _count(pshape), _count(shape, axis + len(pshape))


@register_layer("BatchNorm")
class BatchNorm(Layer):
    """Batch normalization of each channel (axis 1) over the batch and spatial axes.

    Params (``batch_norm_param``): use_global_stats (default true in TEST, false in TRAIN),
    moving_average_fraction λ (0.999), eps ε (1e-5).

    Shapes:
        bottom[0]: (N, C, ...) or (N,) (then C = 1). top[0]: the same.
        blobs[0]: running mean sum, (C,). blobs[1]: running variance sum, (C,).
        blobs[2]: the scale factor s, (1,). All start at 0.

    The statistics are not learned: setup appends a ``param { lr_mult: 0 }`` for each blob the
    prototxt leaves out, and a given ``param`` with a nonzero lr_mult is an error (as Caffe).

    Forward: with batch statistics (use_global_stats false), per channel over the
    m = N·H·W values: μ = mean(x), σ² = mean((x − μ)²); the running sums become
    s ← λ·s + 1, mean ← λ·mean + μ, var ← λ·var + m/(m−1)·σ² (unbiased; factor 1 when m = 1).
    With global statistics: μ = mean/s, σ² = var/s (both 0 when s = 0).
    Then y = (x − μ) / sqrt(σ² + ε).
    Backward (batch statistics):
    dE/dx = (dE/dy − mean(dE/dy) − y · mean(dE/dy · y)) / sqrt(σ² + ε), means per channel.
    (global statistics): dE/dx = dE/dy / sqrt(σ² + ε). The statistics get no gradient.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.batch_norm_param
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.use_global_stats = (bool(p.use_global_stats) if p.HasField("use_global_stats")
                                 else self.phase == TEST)
        self.eps = float(p.eps)
        self.channels = 1 if bottom[0].num_axes == 1 else int(bottom[0].shape[1])
        shapes = [(self.channels,), (self.channels,), (1,)]
        self.init_param_blobs(shapes, "batch_norm_param", [None] * len(shapes))  # zeros
        specs = self.layer_param.param
        for i in range(len(self.blobs)):
            if len(specs) == i:
                specs.add().lr_mult = 0.0
            else:
                self.require(specs[i].lr_mult == 0.0, f"param[{i}].lr_mult",
                             f"cannot configure batch normalization statistics as layer "
                             f"parameters: lr_mult must be 0 (or the param block left out), "
                             f"got {specs[i].lr_mult}")
        self._x_norm = None  # x̂ of the last forward, when backward cannot recompute it
        self._kept = None  # the buffer that holds it on the host, reused between forwards
        self._std = None  # sqrt(σ² + ε), (1, C, 1) (GPU)
        self._mean = self._inv_std = None  # μ and 1/sqrt(σ² + ε), float64 (C,) (host)
        self._offered = None  # the _XHat of its last host forward in place with batch stats

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) > 1:
            self.require(shape[1] == self.channels, "bottom",
                         f"expected {self.channels} channels on axis 1 (fixed at setup), "
                         f"got bottom shape {shape}")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _view(self, a: Any) -> Any:
        """``a`` as (N, C, spatial)."""
        return a.reshape(a.shape[0] if a.ndim else 1, self.channels, -1)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.backend.is_gpu:
            self._forward_xp(bottom, top)
            return
        norm_cpu = _norm_cpu()
        x, y = self._view(bottom[0].data), self._view(top[0].data)
        # NOTE: backward recomputes x̂ = (x − μ)·inv_std from the bottom; in place the bottom
        # is gone (and later in-place layers overwrite the top), so x̂ is kept, once. Either
        # way x̂ is offered to an in-place Scale after this layer, which needs it too.
        self._x_norm = None
        if self.use_global_stats:
            mean, var = self._global_stats()
            inv_std = 1.0 / self.xp.sqrt(var + self.eps)
            norm_cpu.normalize(x, mean, inv_std, y)
        else:
            if top[0] is bottom[0]:
                self._x_norm = self._kept = _reuse(self.xp, self._kept, y)
            mean, var, inv_std = norm_cpu.batch_norm_forward(x, y, self.eps, self._x_norm)
            self._update_running_sums(mean, var, x.shape[0] * x.shape[2])
        self._mean, self._inv_std = mean, inv_std  # float64 (C,)
        self._offered = None
        if top[0] is not bottom[0]:
            _XHATS[top[0]] = _XHat(bottom=x, mean=mean, inv_std=inv_std)
        elif self._x_norm is not None:
            _XHATS[top[0]] = self._offered = _XHat(kept=self._x_norm)

    def _global_stats(self) -> tuple[Any, Any]:
        """μ = mean/s and σ² = var/s from the running sums (both 0 when s = 0), float64."""
        xp = self.xp
        s = float(self.blobs[2].data[0])
        factor = 0.0 if s == 0 else 1.0 / s
        return (xp.asarray(self.blobs[0].data, xp.float64) * factor,
                xp.asarray(self.blobs[1].data, xp.float64) * factor)

    def _forward_xp(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = self._view(bottom[0].data)
        if self.use_global_stats:
            s = self.blobs[2].data
            factor = (s != 0) / xp.where(s == 0, 1, s)  # 1/s, or 0 when s = 0
            mean = (self.blobs[0].data * factor).reshape(1, -1, 1)
            var = (self.blobs[1].data * factor).reshape(1, -1, 1)
            centered = x - mean
        else:
            mean = x.mean(axis=(0, 2), keepdims=True)  # (1, C, 1)
            centered = x - mean
            var = (centered * centered).mean(axis=(0, 2), keepdims=True)
            self._update_running_sums(mean, var, x.shape[0] * x.shape[2])
        std = xp.sqrt(var + self.eps)
        y = self._view(top[0].data)
        xp.divide(centered, std, out=y)
        self._std = std
        # NOTE: backward needs y, and a later in-place layer may overwrite the top: keep a copy
        self._x_norm = None if self.use_global_stats else y.copy()

    def _update_running_sums(self, mean: Any, var: Any, m: int) -> None:
        lam = self.moving_average_fraction
        mean_sum, var_sum, s = (b.data for b in self.blobs)
        s *= lam
        s += 1
        mean_sum *= lam
        mean_sum += mean.reshape(-1)
        correction = m / (m - 1) if m > 1 else 1.0
        var_sum *= lam
        var_sum += correction * var.reshape(-1)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dy = self._view(top[0].diff)
        dx = self._view(bottom[0].diff)
        if self.backend.is_gpu:
            self._backward_xp(dy, dx)
        elif self.use_global_stats:
            _norm_cpu().affine_backward(dy, scale=self._inv_std.astype(dy.dtype), dx=dx)
        else:
            x = None if self._x_norm is not None else self._view(bottom[0].data)
            _norm_cpu().batch_norm_backward(dy, self._mean, self._inv_std, dx,
                                            x_norm=self._x_norm, x=x)

    def _backward_xp(self, dy: Any, dx: Any) -> None:
        if self.use_global_stats:
            self.xp.divide(dy, self._std, out=dx)
            return
        y = self._x_norm
        mean_dy = dy.mean(axis=(0, 2), keepdims=True)
        mean_dy_y = (dy * y).mean(axis=(0, 2), keepdims=True)
        # NOTE: in place dx and dy are one buffer; the right side is complete before the write
        dx[...] = (dy - mean_dy - y * mean_dy_y) / self._std


@register_layer("MVN")
class MVN(Layer):
    """Mean-variance normalization of each (image, channel), or of each image.

    Params (``mvn_param``): normalize_variance (true), across_channels (false), eps ε (1e-9).

    Shapes:
        bottom[0]: up to 4 axes, read as Caffe's legacy (N, C, H, W) (missing axes are 1).
        top[0]: (N, C, H, W): 4 axes, as Caffe's MVN reshapes its top (a (N, D) bottom gives a
        (N, D, 1, 1) top).

    Each row, (n, c) or with across_channels n, of D values is normalized on its own:
    Forward:  y = x − mean(x); with normalize_variance, y = (x − mean(x)) / (σ + ε) where
    σ = sqrt(mean((x − mean(x))²)): ε is added to the standard deviation, not the variance.
    Backward (normalize_variance):
    dE/dx = (dE/dy − mean(dE/dy) − y · mean(dE/dy · y)) / (σ + ε), Caffe's formula (it leaves
    out a factor (σ + ε)/σ of the last term, immaterial for the default ε).
    (mean only): dE/dx = dE/dy − mean(dE/dy). Means are over the row.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        self._y = None  # normalized output of the last forward
        self._std = None  # σ + ε per row, (rows, 1)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shape = bottom[0].shape
        self.require(len(shape) <= 4, "bottom",
                     f"MVN reads its bottom as (N, C, H, W): at most 4 axes, got {shape}")
        legacy = (*shape, 1, 1, 1, 1)[:4]
        self.rows = legacy[0] if self.across_channels else legacy[0] * legacy[1]
        self.dim = _count(legacy) // self.rows if self.rows else 0
        # NOTE: in place this reshapes the bottom too (same count, data kept), as in Caffe
        top[0].reshape(legacy)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(self.rows, self.dim)
        y = top[0].data.reshape(self.rows, self.dim)
        centered = x - x.mean(axis=1, keepdims=True)
        if not self.normalize_variance:
            y[...] = centered
            return
        std = xp.sqrt((centered * centered).mean(axis=1, keepdims=True))
        std += self.eps
        xp.divide(centered, std, out=y)
        self._std = std
        self._y = y.copy()  # a later in-place layer may overwrite the top

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self.rows, self.dim)
        dx = bottom[0].diff.reshape(self.rows, self.dim)
        mean_dy = dy.mean(axis=1, keepdims=True)
        if not self.normalize_variance:
            self.xp.subtract(dy, mean_dy, out=dx)
            return
        y = self._y
        mean_dy_y = (dy * y).mean(axis=1, keepdims=True)
        dx[...] = (dy - mean_dy - y * mean_dy_y) / self._std


@register_layer("Bias")
class Bias(Layer):
    """Adds a bias, broadcast along the axes it does not cover.

    Params (``bias_param``): axis (1; negative counts from the end), num_axes (1; −1 = to the
    end of bottom[0]; ignored with two bottoms), filler (constant 0).

    Shapes:
        bottom[0]: x, any shape. bottom[1] (optional): the bias b, shaped like
            ``x.shape[axis : axis + b.ndim]`` (a scalar () applies everywhere).
        top[0]: like bottom[0] (may be bottom[0]: in place).
        blobs[0] (one bottom only): b, ``x.shape[axis : axis + num_axes]``.

    Forward:  y = x + b, b lined up with x from ``axis`` on.
    Backward: dE/dx = dE/dy; dE/db = Σ dE/dy over the axes b does not cover (added into
    blobs[0].diff; written into bottom[1].diff).
    """

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.bias_param
        self.axis_param = int(p.axis)
        if len(bottom) == 1 and not len(self.blobs):
            shape = _param_shape(self, bottom[0].shape, self.axis_param, int(p.num_axes),
                                 "bias_param", "bias")
            self.init_param_blobs([shape], "bias_param", ["filler"])

    def _operand(self, bottom: Sequence[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.outer, self.dim, self.inner = _broadcast_dims(
            self, bottom[0].shape, self._operand(bottom).shape, self.axis_param, "bias_param",
            "bias")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _view(self, a: Any) -> Any:
        return a.reshape(self.outer, self.dim, self.inner)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        b = self._operand(bottom).data
        x, y = self._view(bottom[0].data), self._view(top[0].data)
        if self.backend.is_gpu:
            self.xp.add(x, b.reshape(1, self.dim, 1), out=y)
        else:
            _norm_cpu().affine_forward(x, y, bias=b)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        dy = top[0].diff
        copy_dx = propagate_down[0] and bottom[0] is not top[0]
        if self.backend.is_gpu:
            db = self._view(dy).sum(axis=(0, 2))
            if copy_dx:
                bottom[0].diff[...] = dy
        else:
            dx = self._view(bottom[0].diff) if copy_dx else None
            _, db = _norm_cpu().affine_backward(self._view(dy), dx=dx, want_dbias=True)
        db = db.reshape(self._operand(bottom).shape)
        if len(bottom) == 1:
            self.blobs[0].diff[...] += db
        elif propagate_down[1]:
            bottom[1].diff[...] = db


@register_layer("Scale")
class Scale(Layer):
    """Multiplies by a scale (and optionally adds a bias), broadcast like :class:`Bias`.

    Params (``scale_param``): axis (1; negative counts from the end), num_axes (1; −1 = to the
    end; ignored with two bottoms), filler (constant 1), bias_term (false), bias_filler
    (constant 0).

    Shapes:
        bottom[0]: x, any shape. bottom[1] (optional): the scale s, shaped like
            ``x.shape[axis : axis + s.ndim]``.
        top[0]: like bottom[0] (may be bottom[0]: in place).
        blobs (Caffe's order): [s (one bottom only), ``x.shape[axis : axis + num_axes]``;
            b (bias_term only), shaped like s].

    Forward:  y = x · s (+ b), s and b lined up with x from ``axis`` on.
    Backward: dE/dx = dE/dy · s; dE/ds = Σ dE/dy · x and dE/db = Σ dE/dy over the axes s does
    not cover (added into the blobs' diffs; dE/ds written into bottom[1].diff).
    """

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1
    #: in place right after an in-place BatchNorm, backward_with takes both gradients at once
    backward_partner = "BatchNorm"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        from pycaffe_mpi.proto import caffe_pb2

        p = self.layer_param.scale_param
        self.axis_param = int(p.axis)
        if len(bottom) == 1 and not len(self.blobs):
            shape = _param_shape(self, bottom[0].shape, self.axis_param, int(p.num_axes),
                                 "scale_param", "scale")
            self.init_param_blobs([shape], "scale_param", ["filler"],
                                  default=caffe_pb2.FillerParameter(type="constant", value=1.0))
        self._bias = None
        if p.bias_term:
            self._setup_bias(bottom, top, p)
        self._x = None  # the input of the last in-place forward (GPU)
        self._xhat = None  # where it is on the host (_XHat)
        self._kept = None  # the host buffer that holds a copy of it, when none is shared

    def _setup_bias(self, bottom: Sequence[Blob], top: Sequence[Blob], p: Any) -> None:
        """Caffe's ScaleLayer runs an internal Bias layer on its top; so does this one."""
        from pycaffe_mpi.proto import caffe_pb2

        lp = caffe_pb2.LayerParameter()
        lp.CopyFrom(self.layer_param)
        lp.type = "Bias"
        bp = lp.bias_param
        bp.axis = p.axis
        bp.num_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
        bp.filler.CopyFrom(p.bias_filler)
        self._bias = Bias(lp, phase=self.phase, backend=self.backend, dtype=self.dtype,
                          rng=self.rng, ctx=self.ctx)
        self._bias.location = self.location
        self._bias.setup([bottom[0]], top)
        if len(self.blobs) + len(bottom) < 3:
            self.blobs.append(self._bias.blobs[0])
        else:  # the bias blob was given (loaded or shared) with the scale
            self._bias.blobs[0] = self.blobs[-1]

    def _operand(self, bottom: Sequence[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.outer, self.dim, self.inner = _broadcast_dims(
            self, bottom[0].shape, self._operand(bottom).shape, self.axis_param, "scale_param",
            "scale")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])
        if self._bias is not None:
            self._bias.reshape([top[0]], top)

    def _view(self, a: Any) -> Any:
        return a.reshape(self.outer, self.dim, self.inner)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.backend.is_gpu:
            self._forward_xp(bottom, top)
            return
        x, y = self._view(bottom[0].data), self._view(top[0].data)
        bias = self._bias.blobs[0].data if self._bias is not None else None
        # NOTE: in place the input is gone after the multiply, and dE/ds needs it: read it
        # where the BatchNorm that wrote it can give it back, else keep a copy
        scale, self._xhat, kept = self._operand(bottom).data, None, None
        if top[0] is bottom[0]:
            self._xhat = _XHATS.get(bottom[0])
            if self._xhat is not None and self._xhat.scale_in_place(x, scale, bias):
                return
            kept = self._kept = _reuse(self.xp, self._kept, x)
            self._xhat = _XHat(kept=kept)
        _norm_cpu().affine_forward(x, y, scale, bias, kept)

    def _forward_xp(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = self._view(bottom[0].data)
        # NOTE: in place the input is gone after the multiply, and dE/ds needs it
        self._x = x.copy() if top[0] is bottom[0] else None
        s = self._operand(bottom).data.reshape(1, self.dim, 1)
        self.xp.multiply(x, s, out=self._view(top[0].data))
        if self._bias is not None:
            self._bias.forward([top[0]], top)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if self.backend.is_gpu:
            self._backward_xp(top, propagate_down, bottom)
            return
        scale = self._operand(bottom)
        want_ds = len(bottom) == 1 or propagate_down[1]
        src = self._xhat if self._xhat is not None else _XHat(kept=bottom[0].data)
        x, mean, inv_std = src.bottom, src.mean, src.inv_std
        if src.kept is not None:
            x = self._view(src.kept)
        dx = self._view(bottom[0].diff) if propagate_down[0] else None
        ds, db = _norm_cpu().affine_backward(
            self._view(top[0].diff), x if want_ds else None, scale.data, dx,
            want_dscale=want_ds, want_dbias=self._bias is not None, mean=mean, inv_std=inv_std)
        if db is not None:
            self._bias.blobs[0].diff[...] += db.reshape(self._bias.blobs[0].shape)
        if len(bottom) == 1:
            scale.diff[...] += ds.reshape(scale.shape)
        elif want_ds:
            scale.diff[...] = ds.reshape(scale.shape)

    def backward_with(self, bn: BatchNorm, top: Sequence[Blob], propagate_down: Sequence[bool],
                      bottom: Sequence[Blob], bn_propagate_down: Sequence[bool]) -> bool:
        """This layer's backward and that of ``bn``, the BatchNorm right before it, in one
        (the Net asks when both run in place on one blob); whether it could, else nothing ran.

        It can on the host when ``bn`` used batch statistics, its x̂ is what this layer's last
        forward scaled in place, and this layer scales along ``bn``'s channels. dE/ds = Σ dy·x̂
        and dE/db = Σ dy are the sums BatchNorm's backward makes anyway, and
        dx = s·(dy − mean(dy) − x̂·mean(dy·x̂))·inv_std (``norm_cpu.batch_norm_backward`` with a
        scale): one read of dy and x̂ for the sums and one to write dx, where the two layers
        read and wrote the blob twice each (``bench/bench_backward_pairs.py``, the backward
        with the pairs together / apart in one run: ResNet-50 b8 0.97-1.00x, MobileNet b16
        0.93-0.95x).
        """
        xhat = self._xhat
        if (self.backend.is_gpu or bn.use_global_stats or not propagate_down[0]
                or not bn_propagate_down[0] or xhat is None or xhat is not bn._offered):
            return False
        dy = self._view(top[0].diff)
        kept = xhat.kept
        if dy.shape != kept.shape:  # a Scale along other axes than the channels
            return False
        scale = self.blobs[0]
        sums = _norm_cpu().batch_norm_backward(dy, bn._mean, bn._inv_std, dy, x_norm=kept,
                                               scale=scale.data)
        scale.diff[...] += sums[1].reshape(scale.shape)
        if self._bias is not None:
            bias = self._bias.blobs[0]
            bias.diff[...] += sums[0].reshape(bias.shape)
        return True

    def _backward_xp(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if self._bias is not None:
            self._bias.backward(top, [False], [top[0]])
        dy = self._view(top[0].diff)
        scale = self._operand(bottom)
        if len(bottom) == 1 or propagate_down[1]:
            x = self._x if self._x is not None else self._view(bottom[0].data)
            ds = (dy * x).sum(axis=(0, 2)).reshape(scale.shape)
            if len(bottom) == 1:
                scale.diff[...] += ds
            else:
                scale.diff[...] = ds
        if propagate_down[0]:
            s = scale.data.reshape(1, self.dim, 1)
            # NOTE: in place dx is dy's buffer; dE/ds above has already read dy
            self.xp.multiply(dy, s, out=self._view(bottom[0].diff))
