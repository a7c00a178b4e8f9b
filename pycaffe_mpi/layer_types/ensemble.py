"""Ensemble layers: the multiple-choice (MCL) loss, score- and probability-averaged losses, and
ensemble accuracies with the oracle assignment matrix.

Every layer here takes M ≥ 1 member **score** blobs (before softmax) followed by the label blob
as the **last** bottom:

    bottom[0..M-1]: scores s_m, (N, C) or (N, C, 1, 1, …); all members the same shape.
    bottom[M]:      labels y, N elements (floats holding class indices).

The label bottom never takes a gradient (``allow_force_backward`` is False for it and backward
with its ``propagate_down`` set is an error). Log-probabilities are computed stably from the
scores, log p_m = log_softmax(s_m), so no member's loss overflows for large scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.kernels import cuda as cuda_k
from pycaffe_mpi.kernels import softmax as softmax_kernel
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.layer_types import loss as loss_mod
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.registry import register_layer
from pycaffe_mpi.reports import assignment as assignment_report

_MCL = caffe_pb2.MultipleChoiceLossParameter


class _MemberLayer(Layer):
    """Base of the ensemble layers: M member score blobs, then the label blob."""

    min_bottom = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.n_members = len(bottom) - 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index < self.n_members

    def _reshape_members(self, bottom: Sequence[Blob]) -> None:
        """Check the member and label shapes; set ``self.num`` (N) and ``self.channels`` (C)."""
        shape = bottom[0].shape
        self.require(len(shape) >= 2 and all(d == 1 for d in shape[2:]), "bottom[0]",
                     f"member scores must be (N, C) or (N, C, 1, 1, ...) with the classes on "
                     f"axis 1, got {shape}")
        for m in range(1, self.n_members):
            self.require(bottom[m].shape == shape, f"bottom[{m}]",
                         f"every member's scores must have the same shape: bottom[0] is "
                         f"{shape}, bottom[{m}] is {bottom[m].shape}")
        self.num, self.channels = shape[0], shape[1]
        label = bottom[self.n_members]
        self.require(label.count == self.num, f"bottom[{self.n_members}]",
                     f"the label blob (the last bottom) must hold one label per example: "
                     f"scores {shape} need {self.num} labels, got {label.count} "
                     f"(label shape {label.shape})")

    def _scores(self, bottom: Sequence[Blob]) -> Any:
        """The member scores stacked as (M, N, C)."""
        shape = (self.num, self.channels)
        return self.xp.stack([bottom[m].data.reshape(shape) for m in range(self.n_members)])

    def _labels(self, bottom: Sequence[Blob], ignore_label: int | None) -> tuple[Any, Any]:
        """Integer labels (N,) with ignored ones set to 0, and the valid mask (N,) bool."""
        label, valid = loss_mod.labels(self, bottom[self.n_members], (self.num,),
                                        self.channels, ignore_label)
        if valid is None:
            valid = self.xp.ones(self.num, dtype=bool)
        return label, valid

    def _no_label_backward(self, propagate_down: Sequence[bool]) -> None:
        if propagate_down[self.n_members]:
            where = errors.layer_where(self.layer_param, self.location)
            raise errors.NetError(f"{where} cannot backpropagate to label inputs (bottom "
                                  f"{self.n_members}, the last); set propagate_down: false "
                                  "for it")

    def _true_logp(self, logp: Any, label: Any) -> Any:
        """log p_m[i, y_i] as (M, N) from log-probabilities (M, N, C)."""
        return self.xp.take_along_axis(logp, label[None, :, None], axis=2)[:, :, 0]

    def _backward_members(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                          bottom: Sequence[Blob], coef: Any) -> None:
        """ds_m[i] = top[0].diff · coef[m, i] · (softmax(s_m)[i] − onehot(y_i)) into the member
        bottoms whose ``propagate_down`` is set; needs ``self.prob`` (M, N, C) and
        ``self.label`` from forward."""
        self._no_label_backward(propagate_down)
        if not any(propagate_down[:self.n_members]):
            return
        onehot = _onehot(self.xp, self.label, self.channels)
        grad = (self.prob - onehot[None]) * (coef[:, :, None] * top[0].diff)
        for m in range(self.n_members):
            if propagate_down[m]:
                bottom[m].diff[...] = grad[m].reshape(bottom[m].shape)


def _onehot(xp: Any, label: Any, channels: int) -> Any:
    """(N, C) bool, true at (i, y_i)."""
    return xp.arange(channels)[None, :] == label[:, None]


@register_layer("MultipleChoiceLoss")
class MultipleChoiceLoss(_MemberLayer):
    """Multiple-choice learning loss: each example trains only the k members that fit it best.

    Params: ``multiple_choice_loss_param`` k (1; 1 ≤ k ≤ M), ce_weight λ (0; ≥ 0),
    normalization (BATCH or ASSIGNED; BATCH); ``loss_param.ignore_label`` (unset = none).

    Shapes:
        bottom[0..M-1]: member scores s_m, (N, C) or (N, C, 1, 1, …).
        bottom[M]: labels, N elements.
        top[0]: loss L, shape ().
        top[1] (optional): (M,) each member's MCL term (1/norm_m) Σ_i α_mi ℓ_mi (no CE term).
        top[2] (optional): (M,) assignment counts c_m = Σ_i α_mi.
        Tops 1 and 2 are outputs to look at: backward ignores their diffs.

    Forward: ℓ_mi = −max(log_softmax(s_m)[i, y_i], log FLT_MIN) (SoftmaxWithLoss's clamp).
        Example i is assigned (α_mi = 1) to the k members with the smallest ℓ_mi; ties are
        broken by a random member order drawn from ``self.rng`` on every forward, so the result
        is reproducible for a given seed. Ignored examples are assigned to nobody. With
        N = max(#valid examples, 1) and norm_m = N (BATCH) or max(c_m, 1) (ASSIGNED, as the
        authors' MCL_Caffe normalises per member):
            L = Σ_m (1/norm_m) Σ_i α_mi ℓ_mi + λ (1/N) Σ_i Σ_m ℓ_mi.
        With k = M and λ = 0, BATCH equals the sum of M independent SoftmaxWithLoss layers.
    Backward: ds_m[i] = top[0].diff · (α_mi / norm_m + λ [i valid] / N) · (softmax(s_m)[i] −
        onehot(y_i)); the clamp of ℓ is ignored, as in SoftmaxWithLoss.
    """

    min_top = 1
    max_top = 3
    is_loss = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        p = self.layer_param.multiple_choice_loss_param
        self.k = int(p.k)
        self.ce_weight = float(p.ce_weight)
        self.per_member_norm = p.normalization == _MCL.ASSIGNED
        lp = self.layer_param.loss_param
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.require(1 <= self.k <= self.n_members, "multiple_choice_loss_param.k",
                     f"k (members trained on each example) must be between 1 and the number of "
                     f"members M = {self.n_members} (the bottoms before the label), got {self.k}")
        self.require(self.ce_weight >= 0, "multiple_choice_loss_param.ce_weight",
                     f"the cross-entropy weight must be >= 0, got {self.ce_weight}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._reshape_members(bottom)
        top[0].reshape(())
        for t in top[1:]:
            t.reshape((self.n_members,))

    def _assign(self, member_loss: Any, valid: Any) -> Any:
        """α (N, M) bool: the k smallest losses per example, random order among equal ones."""
        xp = self.xp
        n, m = member_loss.shape
        # NOTE: a random permutation per example is the secondary sort key: a member's rank is
        # the number of members with a smaller loss, or an equal loss and an earlier key.
        key = backend_mod.upload(xp, self.rng.random((n, m)).argsort(axis=1))
        if cuda_k.enabled(xp):  # one thread per example instead of the (N, M, M) comparison
            return cuda_k.mcl_assign(xp, member_loss, key, valid, self.k)
        lo, lk = member_loss[:, :, None], key[:, :, None]  # member m on axis 1
        other, ok = member_loss[:, None, :], key[:, None, :]  # member m' on axis 2
        ahead = (other < lo) | ((other == lo) & (ok < lk))  # (N, M, M): m' ranks before m
        return (ahead.sum(axis=2) < self.k) & valid[:, None]

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        logp = softmax_kernel.log_softmax(xp, self._scores(bottom), 2)  # (M, N, C)
        label, valid = self._labels(bottom, self.ignore_label)
        picked = xp.maximum(self._true_logp(logp, label), loss_mod.LOG_FLT_MIN)
        member_loss = xp.where(valid[None, :], -picked, 0).T  # ℓ (N, M)
        alpha = self._assign(member_loss, valid)
        counts = alpha.sum(axis=0)  # (M,)
        # NOTE: kept on the device (a 0-d array): int() here would wait for the GPU every step
        n_valid = xp.maximum(valid.sum(), 1).astype(member_loss.dtype)
        norm = xp.maximum(counts, 1) if self.per_member_norm else xp.broadcast_to(n_valid,
                                                                                  counts.shape)
        norm = norm.astype(member_loss.dtype)
        per_member = (alpha * member_loss).sum(axis=0) / norm  # (M,)
        ce = member_loss.sum() / n_valid
        top[0].data[...] = per_member.sum() + self.ce_weight * ce
        if len(top) > 1:
            top[1].data[...] = per_member
        if len(top) > 2:
            top[2].data[...] = counts
        self.prob, self.label, self.valid = xp.exp(logp), label, valid
        # (M, N): the factor of (p − onehot) in each member's gradient row
        self.coef = (alpha / norm).T + (self.ce_weight / n_valid) * valid[None, :]

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        self._backward_members(top, propagate_down, bottom, self.coef)


class _AveragedLoss(_MemberLayer):
    """Shared set-up of the averaged losses: one scalar top, SoftmaxWithLoss normalization."""

    exact_num_top = 1
    is_loss = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        lp = self.layer_param.loss_param
        self.ignore_label = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.normalization = loss_mod.normalization(self)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._reshape_members(bottom)
        top[0].reshape(())

    def _normalizer(self, valid: Any) -> Any:
        """SoftmaxWithLoss's normalizer for N examples (FULL = BATCH_SIZE = N), clamped ≥ 1;
        VALID's count stays on the device (reading it would wait for a GPU)."""
        if self.normalization == caffe_pb2.LossParameter.VALID:
            return self.xp.maximum(valid.sum(), 1).astype(self.dtype)
        return loss_mod.normalizer(self.normalization, self.num, 1, self.num)


@register_layer("ScoreAverageLoss")
class ScoreAverageLoss(_AveragedLoss):
    """Softmax loss of the members' mean score (what one score-averaged net is trained on).

    Params: ``loss_param`` ignore_label (unset = none), normalization (VALID; FULL and
    BATCH_SIZE divide by N, VALID by the number of non-ignored examples, NONE by 1; clamped
    ≥ 1), deprecated ``normalize`` (as SoftmaxWithLoss).

    Shapes: bottom[0..M-1] member scores (N, C[, 1, …]); bottom[M] labels (N); top[0] loss ().

    Forward:  s̄ = (1/M) Σ_m s_m; L = −Σ_{valid i} max(log_softmax(s̄)[i, y_i], log FLT_MIN)
        / normalizer.
    Backward: ds_m = (1/M) ds̄, ds̄[i] = top[0].diff · (softmax(s̄)[i] − onehot(y_i)) /
        normalizer (0 for ignored examples).
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        logp = softmax_kernel.log_softmax(xp, self._scores(bottom).mean(axis=0), 1)  # (N, C)
        label, valid = self._labels(bottom, self.ignore_label)
        picked = xp.take_along_axis(logp, label[:, None], axis=1)[:, 0]
        picked = xp.where(valid, xp.maximum(picked, loss_mod.LOG_FLT_MIN), 0)
        self.normalizer = self._normalizer(valid)
        top[0].data[...] = -picked.sum() / self.normalizer
        self.prob, self.label, self.valid = xp.exp(logp), label, valid

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        self._no_label_backward(propagate_down)
        if not any(propagate_down[:self.n_members]):
            return
        grad = self.prob - _onehot(self.xp, self.label, self.channels)  # (N, C)
        grad *= self.valid[:, None] * (top[0].diff / (self.normalizer * self.n_members))
        for m in range(self.n_members):
            if propagate_down[m]:
                bottom[m].diff[...] = grad.reshape(bottom[m].shape)


@register_layer("ProbabilityAverageLoss")
class ProbabilityAverageLoss(_AveragedLoss):
    """Negative log of the members' mean probability of the true class, computed stably.

    Params: as ScoreAverageLoss (``loss_param`` ignore_label, normalization, normalize).

    Shapes: bottom[0..M-1] member scores (N, C[, 1, …]); bottom[M] labels (N); top[0] loss ().

    Forward:  L = −(1/normalizer) Σ_{valid i} log((1/M) Σ_m softmax(s_m)[i, y_i]), evaluated as
        −(logsumexp_m(log_softmax(s_m)[i, y_i]) − log M), which stays finite however extreme
        the scores (the composed Softmax → Eltwise mean → MultinomialLogisticLoss saturates at
        −log 1e-20).
    Backward: ds_m[i] = top[0].diff · w_mi (softmax(s_m)[i] − onehot(y_i)) / normalizer with
        w_mi = p_m[i, y_i] / Σ_m' p_m'[i, y_i] (a softmax over members of the true-class
        log-probabilities); 0 for ignored examples.
    """

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        logp = softmax_kernel.log_softmax(xp, self._scores(bottom), 2)  # (M, N, C)
        label, valid = self._labels(bottom, self.ignore_label)
        true_logp = self._true_logp(logp, label)  # (M, N)
        # NOTE: log_softmax over the member axis gives both w and the log-sum-exp.
        log_w = softmax_kernel.log_softmax(xp, true_logp, 0)
        lse = true_logp[0] - log_w[0]  # logsumexp_m (N,)
        per_example = xp.where(valid, math.log(self.n_members) - lse, 0)
        self.normalizer = self._normalizer(valid)
        top[0].data[...] = per_example.sum() / self.normalizer
        self.prob, self.label = xp.exp(logp), label
        self.weight = xp.exp(log_w) * valid[None, :]  # (M, N)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        self._backward_members(top, propagate_down, bottom, self.weight / self.normalizer)


def _top1_correct(xp: Any, scores: Any, label: Any) -> Any:
    """Accuracy's top-1 rule on (..., N, C) scores: no other class scores ≥ the true class."""
    idx = xp.broadcast_to(label[:, None], (*scores.shape[:-1], 1))
    true = xp.take_along_axis(scores, idx, axis=-1)
    return (scores >= true).sum(axis=-1) == 1  # the true class counts itself


@register_layer("EnsembleAccuracy")
class EnsembleAccuracy(_MemberLayer):
    """Ensemble accuracies and, over a test pass, the oracle assignment matrix.

    Params: ``accuracy_param.ignore_label`` (unset = none; ``top_k`` must stay 1);
    ``ensemble_accuracy_param`` write_assignment (true), label_file (unset; one class name per
    line, exactly C of them).

    Shapes:
        bottom[0..M-1]: member scores s_m, (N, C) or (N, C, 1, 1, …); bottom[M]: labels (N).
        top[0]: ensemble-mean accuracy: argmax of (1/M) Σ_m softmax(s_m) is the label.
        top[1] (optional): mean-score accuracy: argmax of (1/M) Σ_m s_m is the label.
        top[2] (optional): oracle accuracy: some member's top-1 is the label.
        top[3] (optional): the authors' oracle: the member with the highest true-class
            probability (ties → lowest index) decides; correct iff its top-1 is the label.
        top[4] (optional): (M,) per-member accuracy (logged and recorded as ``<top>_0`` …
            ``<top>_{M-1}``).
        Tops 0–3 have shape (). "Top-1 is the label" is Accuracy's rule: no other class has a
        score ≥ the true class's score. Ignored examples are skipped; 0 when none is valid.

    Test pass: every forward adds won[m, c] (class-c examples whose highest true-class
    probability is member m's, as for top[3]) and the class totals; ``begin_test_pass`` resets
    them. :meth:`assignment_matrix` gives the shares won[m, c] / total[c]; ``end_test_pass``
    returns them as a :class:`~pycaffe_mpi.reports.assignment.Assignment` (with the label
    file's class names) when ``write_assignment`` is set and examples were seen, and the Net
    has it written as ``<prefix>_<name>_assignment.csv|.png`` (the layer writes no file).
    Backward: none; ``propagate_down`` on any bottom is an error.
    """

    min_top = 1
    max_top = 5

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        super().setup(bottom, top)
        p = self.layer_param.accuracy_param
        self.ignore_label = int(p.ignore_label) if p.HasField("ignore_label") else None
        self.require(p.top_k == 1, "accuracy_param.top_k",
                     f"EnsembleAccuracy measures top-1 accuracy only, got top_k {p.top_k}")
        ep = self.layer_param.ensemble_accuracy_param
        self.write_assignment = bool(ep.write_assignment)
        self.class_names: list[str] | None = None
        if ep.label_file:
            try:
                self.class_names = assignment_report.read_class_names(ep.label_file)
            except errors.DataError as e:
                self.require(False, "ensemble_accuracy_param.label_file", str(e))
        self.won: np.ndarray | None = None
        self.totals: np.ndarray | None = None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._reshape_members(bottom)
        if self.class_names is not None:
            self.require(len(self.class_names) == self.channels,
                         "ensemble_accuracy_param.label_file",
                         f"the label file must name each of the {self.channels} classes on "
                         f"its own line, got {len(self.class_names)} names")
        for t in top[:4]:
            t.reshape(())
        if len(top) > 4:
            top[4].reshape((self.n_members,))
        if self.won is None or self.won.shape[1] != self.channels:
            self.begin_test_pass()

    def begin_test_pass(self) -> None:
        channels = getattr(self, "channels", 0)
        self.won = np.zeros((self.n_members, channels), np.int64)
        self.totals = np.zeros(channels, np.int64)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        s = self._scores(bottom)  # (M, N, C)
        label, valid = self._labels(bottom, self.ignore_label)
        logp = softmax_kernel.log_softmax(xp, s, 2)
        member_ok = _top1_correct(xp, s, label) & valid[None, :]  # (M, N)
        winner = self._true_logp(logp, label).argmax(axis=0)  # first maximum: lowest index
        n = int(valid.sum())
        hits = [
            _top1_correct(xp, xp.exp(logp).mean(axis=0), label) & valid,
            _top1_correct(xp, s.mean(axis=0), label) & valid,
            member_ok.any(axis=0),
            member_ok[winner, xp.arange(self.num)],
        ]
        for t, h in zip(top[:4], hits):
            t.data[...] = float(h.sum()) / n if n else 0.0
        if len(top) > 4:
            top[4].data[...] = member_ok.sum(axis=1) / n if n else 0.0
        flat = (winner * self.channels + label)[valid]
        won = xp.bincount(flat, minlength=self.n_members * self.channels)
        self.won += self.backend.to_host(won).reshape(self.n_members, self.channels)
        self.totals += self.backend.to_host(xp.bincount(label[valid], minlength=self.channels))

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if any(propagate_down):
            where = errors.layer_where(self.layer_param, self.location)
            raise errors.NetError(f"{where} has no backward (EnsembleAccuracy is not "
                                  "differentiable); it must not feed a loss or be "
                                  "back-propagated through")

    def assignment_matrix(self) -> np.ndarray | None:
        """The (M, C) share of each class's examples won by each member since the test pass
        began (0 for a class never seen), float64 on the host; None before any example."""
        if self.won is None or self.totals is None or not self.totals.sum():
            return None
        return self.won / np.maximum(self.totals, 1)[None, :]

    def end_test_pass(self) -> assignment_report.Assignment | None:
        share = self.assignment_matrix()
        if not self.write_assignment or share is None:
            return None
        assert self.totals is not None
        return assignment_report.Assignment(share, int(self.totals.sum()), self.class_names)
