"""The remaining BVLC losses: ContrastiveLoss, HingeLoss, InfogainLoss, SigmoidCrossEntropyLoss.

They follow the conventions of :mod:`pycaffe_mpi.layer_types.loss`: top 0 is a scalar of shape
``()`` with a default ``loss_weight`` of 1 (it arrives as ``top[0].diff``, so every backward
scales by it); label bottoms take no gradient; class labels are floats truncated toward zero,
and one outside the valid range (and not the ``ignore_label``) is a clear error where Caffe only
``DCHECK``s it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors
from pycaffe_mpi import layer as layer_mod
from pycaffe_mpi import snapshot as snapshot_mod
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import softmax as softmax_kernel
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.layer_types import loss as loss_mod
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer

_LOSS = caffe_pb2.LossParameter  # its NormalizationMode values
# log of Caffe's kLOG_THRESHOLD (1e-20): log(max(p, 1e-20)) = max(log p, this)
LOG_LOG_THRESHOLD = math.log(loss_mod.LOG_THRESHOLD)
# ContrastiveLoss's guard against dividing by a zero distance (Caffe's constant, kept so the
# gradients agree with Caffe's to the last digit).
DIST_EPS = 1e-4


def _refuse_backward(layer: Layer, index: int, what: str) -> None:
    where = errors.layer_where(layer.layer_param, layer.location)
    raise errors.NetError(f"{where} cannot backpropagate to {what} (bottom {index}); "
                          "set propagate_down: false for it")


# -- ContrastiveLoss ---------------------------------------------------------------------------


@register_layer("ContrastiveLoss")
class ContrastiveLoss(Layer):
    """Contrastive loss over pairs (Hadsell, Chopra and LeCun, 2006).

    Params (``contrastive_loss_param``): margin m (1.0), legacy_version (false).

    Shapes:
        bottom[0]: a, (N, C) or (N, C, 1, 1).
        bottom[1]: b, the same channels C, height and width 1.
        bottom[2]: similarity y, (N,) or (N, 1, 1, 1); truncated to an integer, non-zero =
            similar pair.
        top[0]: loss, shape ().

    Forward: d_n = ‖a_n − b_n‖² and
        loss = 1/(2N) Σ_n [ y_n · d_n + (1 − y_n) · max(m − √d_n, 0)² ]
        (legacy_version: (1 − y_n) · max(m − d_n, 0) instead).
    Backward, with α = top[0].diff / N and Δ_n = a_n − b_n:
        similar pairs:      da_n = α · Δ_n;
        dissimilar pairs:   da_n = −α · (m − √d_n) / (√d_n + 1e-4) · Δ_n where m > √d_n, else 0
                            (legacy: −α · Δ_n where m > d_n, else 0);
        db_n = −da_n. The 1e-4 is Caffe's guard against d_n = 0, so the gradient is that of
        the loss up to a relative 1e-4/√d_n. y takes no gradient (``allow_force_backward(2)``
        is False; as in Caffe, ``propagate_down`` for it is ignored).
    """

    exact_num_bottom = 3
    exact_num_top = 1
    is_loss = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.contrastive_loss_param
        self.margin = float(p.margin)
        self.legacy = bool(p.legacy_version)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        a, b, y = bottom
        loss_mod.check_same_num(self, bottom)
        self.require(a.channels == b.channels, "bottom",
                     f"a and b must have the same channels, got {a.shape} and {b.shape}")
        for i, blob in enumerate(bottom):
            flat = blob.num_axes <= 4 and blob.height == 1 and blob.width == 1
            self.require(flat and (i < 2 or blob.channels == 1), f"bottom[{i}]",
                         "must be (N, C, 1, 1), or (N, 1, 1, 1) for the similarity, got shape "
                         f"{blob.shape}")
        self.require(y.num == a.num, "bottom[2]",
                     f"needs one similarity per pair ({a.num}), got shape {y.shape}")
        top[0].reshape(())

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        n = bottom[0].num
        self.delta = bottom[0].data.reshape(n, -1) - bottom[1].data.reshape(n, -1)  # (N, C)
        self.dist_sq = (self.delta * self.delta).sum(axis=1)  # (N,)
        self.similar = bottom[2].data.reshape(n).astype(xp.int64) != 0  # static_cast<int>
        if self.legacy:
            away = xp.maximum(self.margin - self.dist_sq, 0)
        else:
            away = xp.maximum(self.margin - xp.sqrt(self.dist_sq), 0) ** 2
        per_pair = xp.where(self.similar, self.dist_sq, away)
        top[0].data[...] = per_pair.sum() / n / 2

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = self.xp
        if self.legacy:
            mdist = self.margin - self.dist_sq
            beta = -(mdist > 0).astype(mdist.dtype)
        else:
            dist = xp.sqrt(self.dist_sq)
            mdist = self.margin - dist
            beta = xp.where(mdist > 0, -mdist / (dist + DIST_EPS), 0.0)
        coef = xp.where(self.similar, 1.0, beta).astype(self.delta.dtype)  # (N,)
        grad = coef[:, None] * self.delta  # (N, C), d loss / d a per unit α
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = top[0].diff * (sign / bottom[i].num)
                bottom[i].diff[...] = (alpha * grad).reshape(bottom[i].shape)


# -- HingeLoss ---------------------------------------------------------------------------------


@register_layer("HingeLoss")
class HingeLoss(loss_mod.LabelledLoss):
    """One-versus-all hinge loss over C classes (L1 or squared L2).

    Params: ``hinge_loss_param.norm`` (L1; or L2). ``loss_param`` is not read (as in Caffe:
    always divided by N).

    Shapes:
        bottom[0]: scores x, (N, C) or (N, C, H, W); a row holds dim = count / N scores.
        bottom[1]: labels, N values in [0, dim) (one per row; Caffe reads only the first N).
        top[0]: loss, shape ().

    Forward: with t_nk = −1 if k = y_n else 1 and m_nk = max(0, 1 + t_nk · x_nk),
        L1: loss = Σ m_nk / N;   L2: loss = Σ m_nk² / N.
    Backward: L1: dx_nk = t_nk · [m_nk > 0] · top[0].diff / N;
        L2: dx_nk = 2 · t_nk · m_nk · top[0].diff / N. Labels take no gradient.
    """

    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.norm = int(self.layer_param.hinge_loss_param.norm)
        self.require(self.norm in (1, 2), "hinge_loss_param.norm",
                     f"unknown norm {self.norm} (L1 = 1 or L2 = 2)")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        loss_mod.check_same_num(self, bottom)
        self.num = bottom[0].num
        self.dim = bottom[0].count // max(self.num, 1)
        # NOTE: Caffe reads label[i] for i < N only; a label blob of another count is surely a
        # mistake, so it is an error here.
        self.require(bottom[1].count == self.num, "bottom[1]",
                     f"needs one label per example ({self.num}), got shape {bottom[1].shape}")
        top[0].reshape(())

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        label, _ = loss_mod.labels(self, bottom[1], (self.num,), self.dim, None)
        self.rows, self.label = xp.arange(self.num), label
        signed = bottom[0].data.reshape(self.num, self.dim).copy()
        signed[self.rows, label] *= -1
        self.margin = xp.maximum(signed + 1, 0)  # (N, dim)
        flat = self.margin.reshape(-1)
        total = flat.sum() if self.norm == 1 else flat @ flat
        top[0].data[...] = total / self.num

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        loss_mod.no_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        grad = self.margin.copy()
        grad[self.rows, self.label] *= -1
        if self.norm == 1:
            grad = self.xp.sign(grad)
        else:
            grad *= 2
        grad *= top[0].diff / self.num
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


# -- InfogainLoss ------------------------------------------------------------------------------


@register_layer("InfogainLoss")
class InfogainLoss(loss_mod.LabelledLoss):
    """Softmax followed by the infogain-weighted log loss (Caffe's current InfogainLossLayer).

    Params: ``infogain_loss_param.source`` (a .binaryproto holding H; required unless H is
    bottom 2), ``infogain_loss_param.axis`` (1); ``loss_param.ignore_label`` (unset = none),
    ``loss_param.normalization`` (VALID; FULL, BATCH_SIZE and NONE as SoftmaxWithLoss; clamped to
    ≥ 1). The deprecated ``loss_param.normalize`` is an error, as in Caffe.

    Shapes:
        bottom[0]: scores x, (d_0, …, C, …) with C on ``axis``; outer = Π dims before it,
            inner = Π dims after it.
        bottom[1]: labels, outer·inner values in [0, C).
        bottom[2] (optional): the infogain matrix H, any shape with C·C values (row-major).
        top[0]: loss, shape ().
        top[1] (optional): the probabilities p = softmax(x), bottom[0]'s shape; its diff is
            ignored by backward, as in Caffe.

    Forward:  p = softmax(x over axis);
        loss = −Σ_{valid (o,i)} Σ_l H[y_oi, l] · log(max(p[o, l, i], 1e-20)) / normalizer.
    Backward: dx[o, l, i] = (p[o, l, i] · Σ_k H[y_oi, k] − H[y_oi, l]) · top[0].diff / normalizer,
        0 where y_oi is ignored. Labels take no gradient, and neither does H: Caffe refuses
        backward to it, so ``propagate_down`` true for bottom 2 is an error and
        ``allow_force_backward(2)`` is False.
    """

    exact_num_bottom = None
    min_bottom = 2
    max_bottom = 3
    min_top = 1
    max_top = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        lp = self.layer_param.loss_param
        ip = self.layer_param.infogain_loss_param
        self.require(not lp.HasField("normalize"), "loss_param.normalize",
                     'normalize is deprecated; use "normalization"')
        self.axis_param = int(ip.axis)
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.normalization = int(lp.normalization)
        self.h_file = None
        if len(bottom) < 3:
            self.require(ip.HasField("source"), "infogain_loss_param.source",
                         "the infogain matrix source must be given (or H as a third bottom)")
            try:
                arr = snapshot_mod.read_binaryproto(ip.source)
            except errors.PycaffeError as e:
                self.require(False, "infogain_loss_param.source", str(e))
            self.h_file = self.backend.asarray(arr, dtype=self.dtype)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        loss_mod.check_same_num(self, bottom)
        loss_mod.split_class_axis(self, bottom, "infogain_loss_param.axis")
        h_count = self.h_file.size if self.h_file is not None else bottom[2].count
        self.require(h_count == self.channels ** 2,
                     "infogain_loss_param.source" if self.h_file is not None else "bottom[2]",
                     f"H must be {self.channels}x{self.channels} ({self.channels ** 2} values) "
                     f"for {self.channels} classes, got {h_count} values")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def _h(self, bottom: Sequence[Blob]) -> Any:
        h = self.h_file if self.h_file is not None else bottom[2].data
        return h.reshape(self.channels, self.channels)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        logp = softmax_kernel.log_softmax(xp, x, 1)  # (outer, C, inner)
        self.prob = xp.exp(logp)
        self.label, self.valid = loss_mod.labels(self, bottom[1], (self.outer, self.inner),
                                                  self.channels, self.ignore_label)
        # Caffe's log(max(p, kLOG_THRESHOLD)), evaluated from log p so it cannot underflow
        logp = xp.maximum(logp, LOG_LOG_THRESHOLD)
        h_rows = xp.moveaxis(self._h(bottom)[self.label], 2, 1)  # (outer, C, inner)
        per_pos = (h_rows * logp).sum(axis=1)  # (outer, inner)
        if self.valid is None:
            count = self.outer * self.inner
        else:
            per_pos = xp.where(self.valid, per_pos, 0)
            count = int(self.valid.sum())
        self.normalizer = loss_mod.normalizer(self.normalization, self.outer, self.inner, count)
        top[0].data[...] = -per_pos.sum() / self.normalizer
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(bottom[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        loss_mod.no_label_backward(self, propagate_down)
        if len(propagate_down) > 2 and propagate_down[2]:
            _refuse_backward(self, 2, "the infogain matrix H")
        if not propagate_down[0]:
            return
        xp = self.xp
        h = self._h(bottom)
        # H may be a bottom that changed since forward, so its row sums are taken here
        row_sum = h.sum(axis=1)[self.label]  # (outer, inner)
        h_rows = xp.moveaxis(h[self.label], 2, 1)  # (outer, C, inner)
        grad = self.prob * row_sum[:, None, :] - h_rows
        if self.valid is not None:
            grad *= self.valid[:, None, :]
        grad *= top[0].diff / self.normalizer
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


# -- SigmoidCrossEntropyLoss -------------------------------------------------------------------


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(loss_mod.LabelledLoss):
    """Cross-entropy between targets and the sigmoid of scores, computed stably from the scores.

    Params: ``loss_param.ignore_label`` (unset = none; compared with the target truncated to an
    integer), ``loss_param.normalization`` (FULL divides by the element count, VALID by the
    count of non-ignored targets, BATCH_SIZE by N, NONE by 1; clamped to ≥ 1), deprecated
    ``loss_param.normalize`` (true → VALID, false → BATCH_SIZE). NOTE: with neither field set
    Caffe's layer uses BATCH_SIZE, not the proto's VALID default, and so does this one.

    Shapes:
        bottom[0]: scores x, (N, …).
        bottom[1]: targets t in [0, 1], (N, …) with the same count.
        top[0]: loss, shape ().

    Forward:  loss = Σ_{valid k} [max(x_k, 0) − x_k · t_k + log(1 + exp(−|x_k|))] / normalizer,
        i.e. −Σ [t log σ(x) + (1 − t) log(1 − σ(x))] without overflow.
    Backward: dx_k = (σ(x_k) − t_k) · top[0].diff / normalizer, 0 where t_k is ignored. Targets
        take no gradient.
    """

    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        lp = self.layer_param.loss_param
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        if lp.HasField("normalization"):
            self.normalization = int(lp.normalization)
        elif lp.HasField("normalize"):
            self.normalization = _LOSS.VALID if lp.normalize else _LOSS.BATCH_SIZE
        else:
            self.normalization = _LOSS.BATCH_SIZE

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        loss_mod.check_same_num(self, bottom)
        self.require(bottom[0].count == bottom[1].count, "bottom",
                     f"scores and targets must have the same count, got {bottom[0].shape} "
                     f"and {bottom[1].shape}")
        self.outer = bottom[0].shape[0] if bottom[0].num_axes else 1
        self.inner = layer_mod.count_of(bottom[0].shape, 1)
        top[0].reshape(())

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data.reshape(-1)
        t = bottom[1].data.reshape(-1)
        # 0.5·(1 + tanh(x/2)) is σ(x) without overflow for either sign of x
        self.sigmoid = 0.5 * (1 + xp.tanh(0.5 * x))
        per_elem = xp.maximum(x, 0) - x * t + xp.log1p(xp.exp(-xp.abs(x)))
        if self.ignore_label is None:
            self.valid = None
            count = x.size
        else:
            self.valid = t.astype(xp.int64) != self.ignore_label  # static_cast<int>
            per_elem = xp.where(self.valid, per_elem, 0)
            count = int(self.valid.sum())
        self.normalizer = loss_mod.normalizer(self.normalization, self.outer, self.inner, count)
        top[0].data[...] = per_elem.sum() / self.normalizer

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        loss_mod.no_label_backward(self, propagate_down)
        if not propagate_down[0]:
            return
        grad = self.sigmoid - bottom[1].data.reshape(-1)
        if self.valid is not None:
            grad *= self.valid
        grad *= top[0].diff / self.normalizer
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)
