"""Neuron layers: elementwise maps with one bottom and one top of the same shape.

Every layer here but AbsVal (which Caffe refuses) may run in place (``top: "x"`` =
``bottom: "x"``), as Caffe nets do for ReLU and Dropout. So backward never reads the bottom data,
which in place has already been overwritten by the top: it uses the top data (Sigmoid, TanH,
ReLU, BNLL, Exp), a mask or sigmoid saved in forward (Dropout, leaky ReLU, Swish), or a copy of
the bottom taken in forward only when running in place (PReLU as in Caffe, and Clip, ELU, Log,
Power, whose Caffe backward would read the overwritten bottom).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors, fillers
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import threads
from pycaffe_mpi.layer import TRAIN, Layer
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

_BLOCK = 1 << 16  # elements per NumPy pass of ReLU (a block and its mask stay in the cache)
_LANE_BLOCKS: dict[tuple[int, Any], tuple[Any, Any]] = {}  # see ReLU._blocks


class Neuron(Layer):
    """Base of the elementwise layers: one bottom, one top shaped like it (Caffe's NeuronLayer).

    Shapes:
        bottom[0]: any shape. top[0]: the same shape (may be the very same blob: in place).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    _copy: Any = None  # the bottom data kept by forward for backward when in place

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _keep_input(self, bottom: Sequence[Blob], top: Sequence[Blob], need: bool = True) -> None:
        """Called first in forward: when in place (and backward ``need``s x), copy the bottom
        data before the top overwrites it."""
        x = bottom[0].data
        if not (need and top[0] is bottom[0]):
            self._copy = None
            return
        if self._copy is None or self._copy.shape != x.shape or self._copy.dtype != x.dtype:
            self._copy = self.xp.empty_like(x)
        self._copy[...] = x

    def _input(self, bottom: Sequence[Blob]) -> Any:
        """The bottom data of the last forward (its copy when the layer ran in place)."""
        return bottom[0].data if self._copy is None else self._copy


@register_layer("ReLU")
class ReLU(Neuron):
    """Rectified linear unit, optionally leaky.

    Params: ``relu_param.negative_slope`` (default 0).

    Forward:  y = x if x > 0 else negative_slope · x.
    Backward: dE/dx = dE/dy · (1 if x > 0 else negative_slope) (the slope at x = 0, as Caffe).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.negative_slope = float(self.layer_param.relu_param.negative_slope)
        self._positive = None  # saved x > 0, only needed when the slope flips signs

    @staticmethod
    def _blocks(lane: int, n: int, dtype: Any) -> tuple[Any, Any]:
        """Zeros and a bool mask of ``min(n, _BLOCK)`` elements for ``lane`` (NumPy only), one
        pair per lane and dtype for every ReLU (layers run one at a time)."""
        size = min(n, _BLOCK)
        have = _LANE_BLOCKS.get((lane, np.dtype(dtype)))
        if have is None or have[0].size < size:
            have = _LANE_BLOCKS[(lane, np.dtype(dtype))] = (np.zeros(size, dtype),
                                                            np.empty(size, bool))
        return have

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x, y = self.xp, bottom[0].data, top[0].data
        if self.negative_slope == 0.0:
            if xp is not np:
                xp.maximum(x, 0, out=y)
                return
            # NOTE: NumPy's maximum has a SIMD loop for two arrays only (3x faster than against
            # the scalar 0), so go block by block against a small cached array of zeros; the
            # blocks are split between the cores (kernels/threads.py).
            xf, yf = x.reshape(-1), y.reshape(-1)

            def part(lane: int, lo: int, hi: int) -> None:
                zeros, _ = self._blocks(lane, hi - lo, xf.dtype)
                for a in range(lo, hi, _BLOCK):
                    b = min(a + _BLOCK, hi)
                    np.maximum(xf[a:b], zeros[:b - a], out=yf[a:b])

            threads.run(part, xf.size, grain=_BLOCK)
            return
        positive = x > 0
        if self.negative_slope < 0.0:
            # NOTE: with a negative slope y > 0 no longer means x > 0, and in place x is gone
            # after this line, so keep the sign for backward.
            self._positive = positive
        y[...] = xp.where(positive, x, x * self.negative_slope)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        xp, y, dy, dx = self.xp, top[0].data, top[0].diff, bottom[0].diff
        if self.negative_slope == 0.0 and xp is np:
            # NOTE: y > 0 exactly where x > 0, and y survives in place; in blocks so that the
            # mask stays in the cache (no big temporary)
            yf, dyf, dxf = y.reshape(-1), dy.reshape(-1), dx.reshape(-1)

            def part(lane: int, lo: int, hi: int) -> None:
                _, mask = self._blocks(lane, hi - lo, yf.dtype)
                for a in range(lo, hi, _BLOCK):
                    b = min(a + _BLOCK, hi)
                    np.greater(yf[a:b], 0, out=mask[:b - a])
                    np.multiply(dyf[a:b], mask[:b - a], out=dxf[a:b])

            threads.run(part, yf.size, grain=_BLOCK)
            return
        # NOTE: for negative_slope >= 0, y > 0 exactly where x > 0, and y survives in place.
        positive = self._positive if self.negative_slope < 0.0 else y > 0
        if self.negative_slope == 0.0:
            xp.multiply(dy, positive, out=dx)
        else:
            dx[...] = xp.where(positive, dy, dy * self.negative_slope)


@register_layer("Sigmoid")
class Sigmoid(Neuron):
    """Logistic sigmoid.

    Forward:  y = 1 / (1 + exp(−x)), computed as 0.5 · tanh(0.5 · x) + 0.5 (no overflow).
    Backward: dE/dx = dE/dy · y · (1 − y) (from the top, so in place works).
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, y = self.xp, top[0].data
        xp.multiply(bottom[0].data, 0.5, out=y)
        xp.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * y * (1 - y)


@register_layer("TanH")
class TanH(Neuron):
    """Hyperbolic tangent.

    Forward:  y = tanh(x).
    Backward: dE/dx = dE/dy · (1 − y²) (from the top, so in place works).
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.xp.tanh(bottom[0].data, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * (1 - y * y)


@register_layer("Dropout")
class Dropout(Neuron):
    """Inverted dropout (Caffe's): drop in TRAIN and rescale, identity in TEST.

    Params: ``dropout_param.dropout_ratio`` r (default 0.5), 0 <= r < 1.

    Forward (TRAIN):  m = (u >= r) with u ~ U[0, 1) drawn from ``self.rng`` (keep with
    probability 1 − r); y = x · m / (1 − r).  (TEST): y = x.
    Backward (TRAIN): dE/dx = dE/dy · m / (1 − r), with the mask of the last forward.
    (TEST): dE/dx = dE/dy.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.ratio = float(self.layer_param.dropout_param.dropout_ratio)
        self.require(0.0 <= self.ratio < 1.0, "dropout_param.dropout_ratio",
                     f"expected a ratio in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self._mask = None  # m / (1 − r) in self.dtype, on the device

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                y[...] = x
            return
        keep = self.rng.random(x.shape) >= self.ratio  # host bool, drawn as the tests redraw it
        mask = self.xp.asarray(keep).astype(self.dtype)
        mask *= self.scale
        self._mask = mask
        self.xp.multiply(x, mask, out=y)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                dx[...] = dy
            return
        self.xp.multiply(dy, self._mask, out=dx)


def refuse_backward(layer: Layer, propagate_down: Sequence[bool]) -> None:
    """Caffe's ``NOT_IMPLEMENTED`` backward: refuse when a gradient is asked for."""
    if any(propagate_down):
        where = errors.layer_where(layer.layer_param, layer.location)
        raise NotImplementedError(f"{where} has no backward (not differentiable, as in Caffe); "
                                  "set propagate_down: false for its bottoms")


def _check_base(layer: Layer, base: float, field: str) -> float:
    """log(base) of Exp/Log: base −1 means e; otherwise it must be strictly positive."""
    if base == -1.0:
        return 1.0
    layer.require(base > 0, field, f"base must be strictly positive (or -1 for e), got {base}")
    log_base = float(np.log(base))
    layer.require(np.isfinite(log_base), field, f"log(base) = log({base}) is not finite")
    return log_base


@register_layer("AbsVal")
class AbsVal(Neuron):
    """Absolute value. Not in place (Caffe refuses it: backward needs the bottom's sign).

    Forward:  y = |x|.
    Backward: dE/dx = dE/dy · sign(x) (0 at x = 0).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.require(top[0] is not bottom[0], "top",
                     "AbsVal does not allow in-place computation; give the top its own name")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.xp.abs(bottom[0].data, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            self.xp.multiply(top[0].diff, self.xp.sign(bottom[0].data), out=bottom[0].diff)


@register_layer("BNLL")
class BNLL(Neuron):
    """Binomial normal log likelihood (softplus).

    Forward:  y = log(1 + exp(x)), computed as max(x, 0) + log(1 + exp(−|x|)) (no overflow).
    Backward: dE/dx = dE/dy · σ(x), with σ(x) = 1 − exp(−y) taken from the top, so in place
    works (Caffe reads the bottom and clamps x at 50 before the exp).
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x = self.xp, bottom[0].data
        soft = xp.log1p(xp.exp(-xp.abs(x)))
        xp.maximum(x, 0, out=top[0].data)
        top[0].data[...] += soft

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            xp = self.xp
            # NOTE: −expm1(−y) stays accurate where y ≈ exp(x) is tiny (x very negative).
            bottom[0].diff[...] = top[0].diff * -xp.expm1(-top[0].data)


@register_layer("Clip")
class Clip(Neuron):
    """Clip to an interval.

    Params (``clip_param``, both required): min, max.

    Forward:  y = max(min, min(x, max)).
    Backward: dE/dx = dE/dy · [min <= x <= max].
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.clip_param
        for field in ("min", "max"):
            self.require(p.HasField(field), f"clip_param.{field}", "required; not set")
        self.lo, self.hi = float(p.min), float(p.max)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._keep_input(bottom, top)
        xp, y = self.xp, top[0].data
        xp.minimum(bottom[0].data, self.hi, out=y)
        xp.maximum(y, self.lo, out=y)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            x = self._input(bottom)
            bottom[0].diff[...] = top[0].diff * ((x >= self.lo) & (x <= self.hi))


@register_layer("ELU")
class ELU(Neuron):
    """Exponential linear unit.

    Params: ``elu_param.alpha`` (default 1).

    Forward:  y = x if x > 0 else α · (exp(x) − 1).
    Backward: dE/dx = dE/dy if x > 0 else dE/dy · (y + α).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.alpha = float(self.layer_param.elu_param.alpha)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        # NOTE: for α >= 0, y > 0 exactly where x > 0, so only α < 0 in place needs x.
        self._keep_input(bottom, top, need=self.alpha < 0)
        xp, x = self.xp, bottom[0].data
        neg = xp.expm1(xp.minimum(x, 0))
        neg *= self.alpha
        xp.maximum(x, 0, out=top[0].data)
        top[0].data[...] += neg

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            y, dy = top[0].data, top[0].diff
            positive = self._input(bottom) > 0 if self.alpha < 0 else y > 0
            bottom[0].diff[...] = self.xp.where(positive, dy, dy * (y + self.alpha))


@register_layer("Exp")
class Exp(Neuron):
    """Exponential y = base^(shift + scale · x).

    Params (``exp_param``): base (−1 means e; otherwise > 0), scale (1), shift (0).

    Forward:  y = base^shift · exp(ln(base) · scale · x).
    Backward: dE/dx = dE/dy · y · ln(base) · scale (from the top, so in place works).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.exp_param
        log_base = _check_base(self, float(p.base), "exp_param.base")
        self.inner_scale = log_base * float(p.scale)
        self.outer_scale = float(np.exp(log_base * float(p.shift)))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = top[0].data
        self.xp.multiply(bottom[0].data, self.inner_scale, out=y)
        self.xp.exp(y, out=y)
        if self.outer_scale != 1.0:
            y *= self.outer_scale

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * top[0].data * self.inner_scale


@register_layer("Log")
class Log(Neuron):
    """Logarithm y = log_base(shift + scale · x).

    Params (``log_param``): base (−1 means e; otherwise > 0 and not 1), scale (1), shift (0).

    Forward:  y = ln(shift + scale · x) / ln(base).
    Backward: dE/dx = dE/dy · scale / (ln(base) · (shift + scale · x)).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.log_param
        log_base = _check_base(self, float(p.base), "log_param.base")
        self.require(log_base != 0.0, "log_param.base", "base 1 gives 1/log(base) = inf")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)

    def _inner(self, x: Any) -> Any:
        return x * self.scale + self.shift

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._keep_input(bottom, top)
        y = top[0].data
        self.xp.log(self._inner(bottom[0].data), out=y)
        if self.base_scale != 1.0:
            y *= self.base_scale

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            num = self.scale * self.base_scale
            bottom[0].diff[...] = top[0].diff * num / self._inner(self._input(bottom))


@register_layer("Power")
class Power(Neuron):
    """Power y = (shift + scale · x)^power.

    Params (``power_param``): power (1), scale (1), shift (0).

    Forward:  y = (shift + scale · x)^power; when power · scale = 0, y is the constant
    shift^power (1 for power 0).
    Backward: dE/dx = dE/dy · power · scale · (shift + scale · x)^(power − 1) (0 when
    power · scale = 0).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.diff_scale = self.power * self.scale

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = top[0].data
        if self.diff_scale == 0.0:
            y[...] = 1.0 if self.power == 0.0 else float(np.power(self.shift, self.power))
            return
        self._keep_input(bottom, top, need=self.power != 1.0)
        inner = bottom[0].data * self.scale + self.shift
        if self.power == 1.0:
            y[...] = inner
        else:
            self.xp.power(inner, self.power, out=y)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.diff_scale == 0.0:
            dx[...] = 0
        elif self.power == 1.0:
            self.xp.multiply(dy, self.diff_scale, out=dx)
        else:
            inner = self._input(bottom) * self.scale + self.shift
            dx[...] = dy * self.diff_scale * inner ** (self.power - 1.0)


@register_layer("PReLU")
class PReLU(Neuron):
    """Parametric ReLU: a learned negative slope per channel (or one for all).

    Params (``prelu_param``): channel_shared (false), filler (constant 0.25).

    Shapes:
        bottom[0]: (N, C, …), at least 2 axes. top[0]: the same.
        blobs[0]: slopes a, (C,), or () (one value) when channel_shared, as in Caffe.

    Forward:  y = max(x, 0) + a_c · min(x, 0), c the channel of x.
    Backward: dE/dx = dE/dy · (1 if x > 0 else a_c); dE/da_c += Σ_{x in c, x <= 0} dE/dy · x.
    In place, forward keeps a copy of the bottom (as Caffe's bottom_memory_).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.prelu_param
        self._check_axes(bottom)
        self.channel_shared = bool(p.channel_shared)
        channels = bottom[0].shape[1]
        if len(self.blobs) == 0:
            shape = () if self.channel_shared else (channels,)
            filler = p.filler if p.HasField("filler") else \
                caffe_pb2.FillerParameter(type="constant", value=0.25)
            blob = self.new_blob(shape)
            blob.data[...] = self.xp.asarray(fillers.fill(filler, shape, self.rng, self.dtype))
            self.blobs.append(blob)
        want = 1 if self.channel_shared else channels
        self.require(self.blobs[0].count == want, "prelu_param.channel_shared",
                     f"negative slope size is inconsistent with prototxt config: expected "
                     f"{want} value(s), got {self.blobs[0].count}")

    def _check_axes(self, bottom: Sequence[Blob]) -> None:
        self.require(bottom[0].num_axes >= 2, "bottom",
                     f"number of axes of bottom blob must be >= 2, got shape {bottom[0].shape}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._check_axes(bottom)
        super().reshape(bottom, top)

    def _slope(self, ndim: int) -> Any:
        """The slopes broadcastable against the bottom: (1, C, 1, …) or a scalar array."""
        a = self.blobs[0].data
        return a if self.channel_shared else a.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._keep_input(bottom, top)
        xp, x = self.xp, bottom[0].data
        neg = xp.minimum(x, 0)
        neg *= self._slope(x.ndim)
        xp.maximum(x, 0, out=top[0].data)
        top[0].data[...] += neg

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        xp, x, dy = self.xp, self._input(bottom), top[0].diff
        nonpos = x <= 0
        # dE/da: Σ over every axis but the channel (all axes when shared)
        g = xp.where(nonpos, dy * x, 0)
        axes = tuple(i for i in range(x.ndim) if self.channel_shared or i != 1)
        self.blobs[0].diff[...] += g.sum(axis=axes).reshape(self.blobs[0].shape)
        if propagate_down[0]:
            bottom[0].diff[...] = xp.where(nonpos, dy * self._slope(x.ndim), dy)


@register_layer("Swish")
class Swish(Neuron):
    """Swish (SiLU for β = 1).

    Params: ``swish_param.beta`` (default 1).

    Forward:  s = σ(β · x) (kept for backward); y = x · s.
    Backward: dE/dx = dE/dy · (β · y + s · (1 − β · y)) (top and s only, so in place works).
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.beta = float(self.layer_param.swish_param.beta)
        self._sig = None

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x = self.xp, bottom[0].data
        s = xp.multiply(x, 0.5 * self.beta)
        xp.tanh(s, out=s)  # σ(z) = 0.5 · tanh(z / 2) + 0.5, no overflow
        s *= 0.5
        s += 0.5
        self._sig = s
        xp.multiply(x, s, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        if propagate_down[0]:
            by = self.beta * top[0].data
            bottom[0].diff[...] = top[0].diff * (by + self._sig * (1 - by))


@register_layer("Threshold")
class Threshold(Neuron):
    """Step function. No backward in Caffe: asking for one raises ``NotImplementedError``.

    Params: ``threshold_param.threshold`` t (default 0).

    Forward:  y = 1 if x > t else 0.
    """

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.threshold = float(self.layer_param.threshold_param.threshold)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.xp.greater(bottom[0].data, self.threshold, out=top[0].data)

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        refuse_backward(self, propagate_down)
