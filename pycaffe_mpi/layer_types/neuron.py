"""Neuron layers: elementwise maps with one bottom and one top of the same shape.

Every layer here may run in place (``top: "x"`` = ``bottom: "x"``), as Caffe nets do for
ReLU and Dropout. So backward never reads the bottom data, which in place has already been
overwritten by the top: it uses the top data (Sigmoid, TanH, ReLU) or a mask saved in forward
(Dropout, leaky ReLU with a negative slope).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TRAIN, Layer
from pycaffe_mpi.registry import register_layer

_BLOCK = 1 << 16  # elements per NumPy pass of ReLU (a block and its mask stay in the cache)


class Neuron(Layer):
    """Base of the elementwise layers: one bottom, one top shaped like it (Caffe's NeuronLayer).

    Shapes:
        bottom[0]: any shape. top[0]: the same shape (may be the very same blob: in place).
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])


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
        self._scratch = None  # NumPy blocks: zeros, and the x > 0 mask

    def _blocks(self, n: int, dtype: Any) -> tuple[Any, Any]:
        """Zeros and a bool mask of ``min(n, _BLOCK)`` elements (NumPy only)."""
        size = min(n, _BLOCK)
        if self._scratch is None or self._scratch[0].size < size or \
                self._scratch[0].dtype != dtype:
            self._scratch = (np.zeros(size, dtype), np.empty(size, bool))
        return self._scratch

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x, y = self.xp, bottom[0].data, top[0].data
        if self.negative_slope == 0.0:
            if xp is not np:
                xp.maximum(x, 0, out=y)
                return
            # NOTE: NumPy's maximum has a SIMD loop for two arrays only (3x faster than against
            # the scalar 0), so go block by block against a small cached array of zeros.
            xf, yf = x.reshape(-1), y.reshape(-1)
            zeros, _ = self._blocks(xf.size, xf.dtype)
            for lo in range(0, xf.size, _BLOCK):
                hi = min(lo + _BLOCK, xf.size)
                np.maximum(xf[lo:hi], zeros[:hi - lo], out=yf[lo:hi])
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
            _, mask = self._blocks(yf.size, yf.dtype)
            for lo in range(0, yf.size, _BLOCK):
                hi = min(lo + _BLOCK, yf.size)
                np.greater(yf[lo:hi], 0, out=mask[:hi - lo])
                np.multiply(dyf[lo:hi], mask[:hi - lo], out=dxf[lo:hi])
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
