"""Loss and evaluation layers: SoftmaxWithLoss, Accuracy, EuclideanLoss, MultinomialLogisticLoss.

Caffe's ``LossLayer`` family (``is_loss = True``): top 0 is a scalar blob of shape ``()`` and
gets ``loss_weight`` 1 by default (the Net applies it; it arrives here as ``top[0].diff``, so
every backward scales by ``top[0].diff``). Label bottoms (bottom 1) never take a gradient:
``allow_force_backward(1)`` is False and backward with ``propagate_down[1]`` is an error, as in
Caffe ("cannot backpropagate to label inputs").

Labels are floats holding class indices; like Caffe's ``static_cast<int>`` they are truncated
toward zero. A label outside ``[0, C)`` (and not the ``ignore_label``) is a clear error here,
where Caffe only ``DCHECK``s it: a negative label would otherwise silently wrap around.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors
from pycaffe_mpi import layer as layer_mod
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import softmax as softmax_kernel
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

FLT_MIN = 1.17549435e-38
LOG_FLT_MIN = float(np.log(np.float64(FLT_MIN)))  # log(max(p, FLT_MIN)) = max(log p, this)
LOG_THRESHOLD = 1e-20  # MultinomialLogisticLoss's kLOG_THRESHOLD

_LOSS = caffe_pb2.LossParameter  # its NormalizationMode values: FULL, VALID, BATCH_SIZE, NONE

_count = layer_mod.count_of
_canonical_axis = layer_mod.canonical_axis


def no_label_backward(layer: Layer, propagate_down: Sequence[bool]) -> None:
    if len(propagate_down) > 1 and propagate_down[1]:
        where = errors.layer_where(layer.layer_param, layer.location)
        raise errors.NetError(f"{where} cannot backpropagate to label inputs (bottom 1); "
                              "set propagate_down: false for it")


def check_same_num(layer: Layer, bottom: Sequence[Blob]) -> None:
    """``LossLayer::Reshape``: data and label share their first dimension."""
    layer.require(bottom[0].num == bottom[1].num, "bottom",
                  f"the data and label should have the same first dimension, got data "
                  f"{bottom[0].shape} and label {bottom[1].shape}")


def labels(layer: Layer, label_blob: Blob, shape: tuple[int, ...], n_classes: int,
            ignore_label: int | None) -> tuple[Any, Any]:
    """Integer labels of ``shape`` (ignored ones replaced by 0) and the valid mask (or None).

    Raises a NetError naming the layer for a label outside ``[0, n_classes)``.
    """
    xp = layer.xp
    label = label_blob.data.reshape(shape).astype(xp.int64)  # truncation = static_cast<int>
    valid = None if ignore_label is None else label != ignore_label
    bad = (label < 0) | (label >= n_classes)
    if valid is not None:
        bad &= valid
    if backend_mod.is_cupy(xp):  # a GPU: read the check later instead of waiting for it now
        _late_label_check(layer, bad, n_classes)
    elif bool(bad.any()):
        value = int(label[bad].ravel()[0])
        where = errors.layer_where(layer.layer_param, layer.location)
        raise errors.NetError(
            f"{where}: label {value} is outside [0, {n_classes})"
            + ("" if ignore_label is None else f" and is not ignore_label {ignore_label}"))
    if valid is not None:
        label = xp.where(valid, label, 0)
    return label, valid


def _late_label_check(layer: Layer, bad: Any, n_classes: int) -> None:
    """Raise for a label outside ``[0, n_classes)`` of an earlier batch once its flag reached the
    host (a GPU runs an iteration or two behind), and queue this batch's flag."""
    flags = []
    for flag in [*getattr(layer, "_label_flags", ()), backend_mod.LateFlag(layer.xp, bad.any())]:
        seen = flag.value()
        if seen:
            where = errors.layer_where(layer.layer_param, layer.location)
            raise errors.NetError(f"{where}: a label outside [0, {n_classes}) (and not "
                                  "ignore_label) in a recent batch (found on the GPU, where the "
                                  "check runs behind the batch)")
        if seen is None:
            flags.append(flag)
    layer._label_flags = flags


def normalization(layer: Layer) -> int:
    """The effective ``LossParameter.NormalizationMode``: ``normalization`` if set, else the
    deprecated ``normalize`` (true → VALID, false → BATCH_SIZE)."""
    lp = layer.layer_param.loss_param
    if not lp.HasField("normalization") and lp.HasField("normalize"):
        return _LOSS.VALID if lp.normalize else _LOSS.BATCH_SIZE
    return int(lp.normalization)


def normalizer(mode: int, outer: int, inner: int, valid_count: int) -> float:
    """Caffe's ``LossLayer::GetNormalizer`` for a loss over outer·inner positions: FULL →
    outer·inner, VALID → ``valid_count``, BATCH_SIZE → outer, NONE → 1; clamped to ≥ 1."""
    n = {_LOSS.FULL: outer * inner, _LOSS.VALID: valid_count, _LOSS.BATCH_SIZE: outer,
         _LOSS.NONE: 1}[mode]
    return max(1.0, float(n))


def split_class_axis(layer: Layer, bottom: Sequence[Blob], axis_field: str) -> None:
    """Split bottom[0]'s shape at the class axis ``layer.axis_param`` into ``layer.outer``,
    ``layer.channels`` and ``layer.inner`` (setting ``layer.axis``), and check that bottom[1]
    holds one label per outer·inner position (its own shape does not matter)."""
    shape = bottom[0].shape
    layer.axis = _canonical_axis(layer, layer.axis_param, len(shape), axis_field)
    layer.outer, layer.inner = _count(shape, 0, layer.axis), _count(shape, layer.axis + 1)
    layer.channels = shape[layer.axis]
    want = layer.outer * layer.inner
    layer.require(want == bottom[1].count, "bottom[1]",
                  f"number of labels must match number of predictions: scores {shape} with "
                  f"axis {layer.axis} need {want} labels in [0, {layer.channels}), got "
                  f"{bottom[1].count} (label shape {bottom[1].shape})")


class LabelledLoss(Layer):
    """Base of losses over (predictions, labels): a loss (top 0 weighs 1 by default) whose
    label bottom takes no gradient."""

    exact_num_bottom = 2
    is_loss = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLoss(LabelledLoss):
    """Softmax over an axis followed by the multinomial logistic loss, computed stably.

    Params: ``softmax_param.axis`` (1); ``loss_param.ignore_label`` (unset = none),
    ``loss_param.normalization`` (VALID; FULL divides by outer·inner, VALID by the count of
    non-ignored positions, BATCH_SIZE by outer, NONE by 1; clamped to ≥ 1), deprecated
    ``loss_param.normalize`` (used only when ``normalization`` is unset: true → VALID,
    false → BATCH_SIZE).

    Shapes:
        bottom[0]: scores x, (d_0, …, C, …) with C on ``axis``; outer = Π dims before it,
            inner = Π dims after it.
        bottom[1]: labels, any shape with outer·inner elements (floats holding class indices).
        top[0]: loss, shape ().
        top[1] (optional): the probabilities p = softmax(x), bottom[0]'s shape. As in Caffe,
            its diff is ignored by backward (it is an output to look at, not to train through).

    Forward:  p = softmax(x); loss = −Σ_{valid (o,i)} log(max(p[o, y_oi, i], FLT_MIN)) / normalizer,
        evaluated as max(log_softmax(x), log FLT_MIN) so large scores never overflow.
    Backward: dx[o, c, i] = (p[o, c, i] − [c = y_oi]) · top[0].diff / normalizer, 0 where y_oi
        is ignored.
    """

    min_top = 1
    max_top = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        lp = self.layer_param.loss_param
        self.axis_param = int(self.layer_param.softmax_param.axis)
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.normalization = normalization(self)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        # NOTE: Caffe's LossLayer also requires equal first dimensions; only the label count
        # matters here, so a flattened label blob is accepted too.
        shape = bottom[0].shape
        split_class_axis(self, bottom, "softmax_param.axis")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(shape)

    def _normalizer(self, valid_count: int) -> float:
        return normalizer(self.normalization, self.outer, self.inner, valid_count)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        fused = softmax_kernel.loss_forward(  # CUDA only: one kernel, no host round-trip
            xp, x, bottom[1].data, self.ignore_label, LOG_FLT_MIN,
            None if self.normalization == _LOSS.VALID and self.ignore_label is not None
            else self._normalizer(self.outer * self.inner), top[0].data)
        if fused is not None:
            (self.prob, self.valid, self.normalizer), self.label = fused, bottom[1].data
            if len(top) > 1:
                top[1].data[...] = self.prob.reshape(bottom[0].shape)
            return
        logp = softmax_kernel.log_softmax(xp, x, 1)  # (outer, C, inner)
        self.prob = xp.exp(logp)
        self.label, self.valid = labels(self, bottom[1], (self.outer, self.inner),
                                         self.channels, self.ignore_label)
        picked = xp.take_along_axis(logp, self.label[:, None, :], axis=1)[:, 0, :]
        picked = xp.maximum(picked, LOG_FLT_MIN)  # Caffe's log(max(p, FLT_MIN))
        if self.valid is None:
            count = self.outer * self.inner
        else:
            picked = xp.where(self.valid, picked, 0)
            count = int(self.valid.sum())
        self.normalizer = self._normalizer(count)
        top[0].data[...] = -picked.sum() / self.normalizer
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(bottom[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        no_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        xp = self.xp
        if softmax_kernel.loss_backward(xp, self.prob, self.label, self.valid, top[0].diff,
                                        self.normalizer, bottom[0].diff):
            return
        onehot = xp.arange(self.channels)[None, :, None] == self.label[:, None, :]
        grad = self.prob - onehot  # (outer, C, inner)
        if self.valid is not None:
            grad *= self.valid[:, None, :]
        # NOTE: top[0].diff is a 0-d array of the layer's dtype, so float32 stays float32.
        grad *= top[0].diff / self.normalizer
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register_layer("Accuracy")
class Accuracy(Layer):
    """Top-k classification accuracy (an evaluation layer, never a loss).

    Params (``accuracy_param``): top_k (1), axis (1), ignore_label (unset = none).

    Shapes:
        bottom[0]: scores, (d_0, …, C, …) with C on ``axis``; outer/inner as SoftmaxWithLoss.
        bottom[1]: labels, any shape with outer·inner elements.
        top[0]: accuracy, shape ().
        top[1] (optional): per-class accuracy, (C,); 0 for a class with no (valid) example.

    Forward: example (o, i) with label y is correct iff fewer than top_k classes *other than y*
        have a score ≥ the true class score s_y (BVLC HEAD rule: ties count against the
        example; Caffe counts every class with s_k ≥ s_y, the true class included, minus one).
        accuracy = #correct / #valid (0 when no example is valid); ignored labels are skipped.
        An example whose C scores are not all finite (NaN or ±Inf anywhere) counts as wrong
        (still valid): Caffe counts it correct, since NaN ≥ s_y is false for every class, so a
        diverged net would report accuracy 1.0.
    Backward: none. ``propagate_down`` true for any bottom is an error (Caffe: NOT_IMPLEMENTED),
        and ``allow_force_backward`` is False for both bottoms so ``force_backward`` nets work.
    """

    exact_num_bottom = 2
    min_top = 1
    max_top = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        # NOTE: Caffe allows it for bottom 0 and then dies in Backward; we decline instead.
        return False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.accuracy_param
        self.top_k = int(p.top_k)
        self.axis_param = int(p.axis)
        self.ignore_label = int(p.ignore_label) if p.HasField("ignore_label") else None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        split_class_axis(self, bottom, "accuracy_param.axis")
        self.require(self.top_k <= self.channels, "accuracy_param.top_k",
                     f"top_k must be less than or equal to the number of classes "
                     f"({self.channels}), got {self.top_k}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        s = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        label, valid = labels(self, bottom[1], (self.outer, self.inner), self.channels,
                               self.ignore_label)
        true_score = xp.take_along_axis(s, label[:, None, :], axis=1)  # (outer, 1, inner)
        n_better = (s >= true_score).sum(axis=1) - 1  # the true class counts itself
        # NOTE: a NaN compares false everywhere, which Caffe's rule reads as "correct".
        correct = (n_better < self.top_k) & xp.isfinite(s).all(axis=1)  # (outer, inner)
        if valid is None:
            valid = xp.ones(correct.shape, dtype=bool)
        correct &= valid
        count = int(valid.sum())
        top[0].data[...] = float(correct.sum()) / count if count else 0.0
        if len(top) > 1:
            per_class = xp.bincount(label[valid], minlength=self.channels)
            hits = xp.bincount(label[correct], minlength=self.channels)
            top[1].data[...] = xp.where(per_class > 0, hits / xp.maximum(per_class, 1), 0)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if any(propagate_down):
            where = errors.layer_where(self.layer_param, self.location)
            raise errors.NetError(f"{where} has no backward (Accuracy is not differentiable); "
                                  "it must not feed a loss or be back-propagated through")


@register_layer("EuclideanLoss")
class EuclideanLoss(Layer):
    """Half the mean squared distance: loss = Σ (a − b)² / (2N), N = bottom[0].num.

    Params: none.

    Shapes:
        bottom[0]: a, (N, …). bottom[1]: b, (N, …) with the same count.
        top[0]: loss, shape ().

    Forward:  loss = Σ (a − b)² / (2N).
    Backward: da = (a − b) · top[0].diff / N; db = −(a − b) · top[0].diff / N. Both bottoms
        take a gradient (Caffe overrides ``AllowForceBackward`` to allow it).
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        check_same_num(self, bottom)
        self.require(bottom[0].count == bottom[1].count, "bottom",
                     f"inputs must have the same count, got {bottom[0].shape} "
                     f"({bottom[0].count}) and {bottom[1].shape} ({bottom[1].count})")
        top[0].reshape(())
        if getattr(self, "_diff", None) is None or self._diff.shape != bottom[0].shape:
            self._diff = self.xp.empty(bottom[0].shape, dtype=bottom[0].dtype)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.xp.subtract(bottom[0].data, bottom[1].data.reshape(bottom[0].shape), out=self._diff)
        flat = self._diff.reshape(-1)
        top[0].data[...] = (flat @ flat) / bottom[0].num / 2

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = top[0].diff * (sign / bottom[i].num)
                bottom[i].diff[...] = (alpha * self._diff).reshape(bottom[i].shape)


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLoss(LabelledLoss):
    """Negative log-likelihood of given probabilities: loss = −Σ_n log(max(p[n, y_n], 1e-20)) / N.

    Params: none (``loss_param`` is not read, as in Caffe).

    Shapes:
        bottom[0]: probabilities p, (N, C, 1, 1) or (N, C) (any (N, …), C = count / N).
        bottom[1]: labels, (N,) or (N, 1, 1, 1): channels, height and width must be 1.
        top[0]: loss, shape ().

    Forward:  loss = −Σ_n log(max(p[n, y_n], 1e-20)) / N.
    Backward: dp[n, y_n] = −top[0].diff / (N · max(p[n, y_n], 1e-20)), 0 elsewhere.
    """

    exact_num_top = 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        check_same_num(self, bottom)
        lab = bottom[1]
        self.require(lab.channels == 1 and lab.height == 1 and lab.width == 1, "bottom[1]",
                     f"labels must have channels, height and width 1, got shape {lab.shape}")
        self.num = bottom[0].num
        self.dim = bottom[0].count // max(self.num, 1)
        top[0].reshape(())

    def _picked(self, bottom: Sequence[Blob]) -> tuple[Any, Any, Any]:
        xp = self.xp
        p = bottom[0].data.reshape(self.num, self.dim)
        label, _ = labels(self, bottom[1], (self.num,), self.dim, None)
        rows = xp.arange(self.num)
        return rows, label, xp.maximum(p[rows, label], LOG_THRESHOLD)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _, _, prob = self._picked(bottom)
        top[0].data[...] = -self.xp.log(prob).sum() / self.num

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        no_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        rows, label, prob = self._picked(bottom)
        diff = bottom[0].diff.reshape(self.num, self.dim)
        diff[...] = 0
        diff[rows, label] = -(top[0].diff / self.num) / prob
