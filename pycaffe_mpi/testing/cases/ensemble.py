"""Layer cases for the ensemble family: MultipleChoiceLoss, ScoreAverageLoss,
ProbabilityAverageLoss, EnsembleAccuracy. References are plain loops over examples and members,
independent of the layers.

MultipleChoiceLoss assigns each example to its k best members; a finite-difference step that
changed an assignment would make the objective jump. Its gradient cases therefore draw member
scores whose per-member losses are at least 0.4 apart at every example (:class:`Separated`), so
no step of 1e-4 can reorder them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

FLT_MIN = 1.17549435e-38
FULL, VALID, BATCH_SIZE, NONE = 0, 1, 2, 3


def _labels(n_classes: int, n: int):
    return lambda rng: rng.integers(0, n_classes, size=n).astype(float)


def _members(m: int, shape: Sequence[int]) -> list:
    return [tuple(shape)] * m


def _scaled(scale: float, shape: Sequence[int]):
    return lambda rng: scale * rng.standard_normal(tuple(shape))


def _log_softmax_row(row: np.ndarray) -> list[float]:
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - lse for v in row]


def _split(bottoms: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Member scores as (N, C) arrays and the labels as ints."""
    *scores, lab = bottoms
    n = scores[0].shape[0]
    return [s.reshape(n, -1) for s in scores], [int(v) for v in lab.ravel()]


def _normalizer(norm: int, n: int, n_valid: int) -> float:
    return max(1.0, float({FULL: n, VALID: n_valid, BATCH_SIZE: n, NONE: 1}[norm]))


class Separated:
    """Bottom specs (M member score blobs, then labels) with well separated member losses.

    For each example the members get losses 0.3 + 0.5·r + U(0, 0.1) in a random order
    r = 0..M-1: the other classes' scores are N(0, 1) and the true-class score is solved for,
    s_y = log Σ_{c≠y} exp(s_c) − log(exp(ℓ) − 1). Member 0's spec draws everything; the others
    and the label spec return the stored arrays (``make_bottoms`` calls specs in order).
    """

    def __init__(self, n_members: int, n: int, n_classes: int, trailing: Sequence[int] = ()):
        self.m, self.n, self.c, self.trailing = n_members, n, n_classes, tuple(trailing)
        self.scores: list[np.ndarray] = []
        self.label = np.zeros(n)

    def _draw(self, rng: np.random.Generator) -> None:
        label = rng.integers(0, self.c, size=self.n)
        scores = rng.standard_normal((self.m, self.n, self.c))
        for i in range(self.n):
            y = label[i]
            for member, r in enumerate(rng.permutation(self.m)):
                loss = 0.3 + 0.5 * r + 0.1 * rng.random()
                others = [scores[member, i, c] for c in range(self.c) if c != y]
                lse = math.log(sum(math.exp(v) for v in others))
                scores[member, i, y] = lse - math.log(math.expm1(loss))
        shape = (self.n, self.c, *self.trailing)
        self.scores = [scores[j].reshape(shape) for j in range(self.m)]
        self.label = label.astype(float)

    def _member(self, j: int):
        def draw(rng: np.random.Generator) -> np.ndarray:
            if j == 0:
                self._draw(rng)
            return self.scores[j]
        return draw

    def specs(self) -> list:
        return [self._member(j) for j in range(self.m)] + [lambda rng: self.label]


def _tied(n_members: int, n: int, n_classes: int) -> list:
    """Specs of M identical members (every example ties between all of them)."""
    store: dict[str, np.ndarray] = {}

    def member(j: int):
        def draw(rng):
            if j == 0:
                store["s"] = rng.standard_normal((n, n_classes))
            return store["s"]
        return draw
    return [member(j) for j in range(n_members)] + [_labels(n_classes, n)]


# -- MultipleChoiceLoss ------------------------------------------------------------------------


def _mcl_ref(k: int = 1, ce_weight: float = 0.0, assigned: bool = False,
             ignore: int | None = None):
    def ref(bottoms, layer):
        scores, label = _split(bottoms)
        m, n = len(scores), len(label)
        sums, counts, ce, n_valid = [0.0] * m, [0] * m, 0.0, 0
        for i in range(n):
            y = label[i]
            if y == ignore:
                continue
            n_valid += 1
            losses = [min(-_log_softmax_row(scores[j][i])[y], -math.log(FLT_MIN))
                      for j in range(m)]
            ce += sum(losses)
            for j in sorted(range(m), key=lambda j: losses[j])[:k]:
                sums[j] += losses[j]
                counts[j] += 1
        n_valid = max(n_valid, 1)
        per = [sums[j] / (max(counts[j], 1) if assigned else n_valid) for j in range(m)]
        tops = [np.array(sum(per) + ce_weight * ce / n_valid)]
        ntop = len(layer.layer_param.top)
        if ntop > 1:
            tops.append(np.array(per))
        if ntop > 2:
            tops.append(np.array(counts, float))
        return tops
    return ref


def _mcl_proto(k: int, ce_weight: float, assigned: bool, ignore: int | None) -> str:
    text = (f"multiple_choice_loss_param {{ k: {k} ce_weight: {ce_weight} normalization: "
            f"{'ASSIGNED' if assigned else 'BATCH'} }}")
    return text + ("" if ignore is None else f" loss_param {{ ignore_label: {ignore} }}")


for _id, _m, _n, _c, _k, _lam, _assigned, _ignore, _trailing, _ntop in (
    ("m1_k1", 1, 4, 3, 1, 0.0, False, None, (), 1),
    ("m2_k1", 2, 6, 4, 1, 0.0, False, None, (), 1),
    ("m3_k1_4d", 3, 5, 4, 1, 0.0, False, None, (1, 1), 1),
    ("m3_k2", 3, 6, 3, 2, 0.0, False, None, (), 1),
    ("m3_k3_independent", 3, 4, 5, 3, 0.0, False, None, (), 1),
    ("m4_k1_assigned", 4, 8, 3, 1, 0.0, True, None, (), 1),
    ("m3_k2_assigned_ce", 3, 6, 4, 2, 0.5, True, None, (), 1),
    ("m3_k1_ce", 3, 6, 4, 1, 0.25, False, None, (), 1),
    ("m3_k1_ignore", 3, 8, 3, 1, 0.0, False, 1, (), 1),
    ("m2_k1_assigned_ignore_ce", 2, 8, 3, 1, 0.3, True, 0, (), 1),
    ("m3_k1_all_tops", 3, 6, 4, 1, 0.2, False, None, (), 3),
    ("m3_k2_assigned_member_top", 3, 6, 4, 2, 0.0, True, 2, (), 2),
):
    add_case(LayerCase(
        type="MultipleChoiceLoss", id=_id, proto=_mcl_proto(_k, _lam, _assigned, _ignore),
        bottoms=Separated(_m, _n, _c, _trailing).specs(), ntop=_ntop,
        reference=_mcl_ref(_k, _lam, _assigned, _ignore),
        # NOTE: tops 1 and 2 depend on the scores but take no gradient, so the projection
        # objective of the gradient check does not apply to cases that have them.
        grad=_ntop == 1,
        reshape=Separated(_m, _n + 1, _c, _trailing).specs()))

# Identical members: every example is a tie, broken by the layer's generator. The BATCH loss
# does not depend on who wins a tie; the gradient would jump, so it is not checked.
add_case(LayerCase(
    type="MultipleChoiceLoss", id="tied_members_batch",
    proto="multiple_choice_loss_param { k: 1 ce_weight: 0.1 }",
    bottoms=_tied(3, 8, 4), reference=_mcl_ref(1, 0.1), grad=False, stochastic=True,
    reshape=_tied(3, 9, 4)))

# -- ScoreAverageLoss --------------------------------------------------------------------------


def _averaged_ref(example_loss, ignore: int | None, norm: int):
    """Reference of an averaged loss: Σ over non-ignored examples of ``example_loss(member
    score rows, label)``, normalised as SoftmaxWithLoss."""
    def ref(bottoms, layer):
        scores, label = _split(bottoms)
        n = len(label)
        loss, n_valid = 0.0, 0
        for i in range(n):
            if label[i] == ignore:
                continue
            n_valid += 1
            loss += example_loss([s[i] for s in scores], label[i])
        return [np.array(loss / _normalizer(norm, n, n_valid))]
    return ref


def _score_average_ref(ignore: int | None = None, norm: int = VALID):
    def example_loss(rows, y):
        mean = [sum(r[c] for r in rows) / len(rows) for c in range(len(rows[0]))]
        return -max(_log_softmax_row(mean)[y], math.log(FLT_MIN))
    return _averaged_ref(example_loss, ignore, norm)


def _loss_proto(ignore: int | None, norm: str) -> str:
    inner = ("" if ignore is None else f"ignore_label: {ignore} ") + norm
    return f"loss_param {{ {inner} }}" if inner else ""


_AVERAGED = (
    # id, M, N, C, ignore, normalization text, normalization, trailing
    ("m1", 1, 4, 3, None, "", VALID, ()),
    ("m2", 2, 5, 4, None, "", VALID, ()),
    ("m3_4d", 3, 4, 5, None, "", VALID, (1, 1)),
    ("m4_full", 4, 3, 3, None, "normalization: FULL", FULL, ()),
    ("m3_ignore_valid", 3, 8, 3, 1, "", VALID, ()),
    ("m3_ignore_batch_size", 3, 8, 3, 0, "normalization: BATCH_SIZE", BATCH_SIZE, ()),
    ("m2_ignore_none", 2, 6, 3, 2, "normalization: NONE", NONE, ()),
    ("m2_normalize_false", 2, 6, 3, 2, "normalize: false", BATCH_SIZE, ()),
)


add_case(LayerCase(
    type="ScoreAverageLoss", id="large_scores",
    bottoms=[*[_scaled(30, (4, 5))] * 3, _labels(5, 4)],
    reference=_score_average_ref(), rtol=1e-6,
    reshape=[*[_scaled(30, (5, 5))] * 3, _labels(5, 5)]))

# -- ProbabilityAverageLoss --------------------------------------------------------------------


def _probability_average_ref(ignore: int | None = None, norm: int = VALID):
    def example_loss(rows, y):
        mean_p = sum(math.exp(_log_softmax_row(r)[y]) for r in rows) / len(rows)
        return -math.log(mean_p)
    return _averaged_ref(example_loss, ignore, norm)


for _type, _ref in (("ScoreAverageLoss", _score_average_ref),
                   ("ProbabilityAverageLoss", _probability_average_ref)):
    for _id, _m, _n, _c, _ignore, _ntext, _norm, _trailing in _AVERAGED:
        add_case(LayerCase(
            type=_type, id=_id, proto=_loss_proto(_ignore, _ntext),
            bottoms=[*_members(_m, (_n, _c, *_trailing)), _labels(_c, _n)],
            reference=_ref(_ignore, _norm),
            reshape=[*_members(_m, (_n + 1, _c, *_trailing)), _labels(_c, _n + 1)]))

add_case(LayerCase(
    type="ProbabilityAverageLoss", id="scaled_scores",
    bottoms=[*[_scaled(8, (4, 5))] * 3, _labels(5, 4)],
    reference=_probability_average_ref(), rtol=1e-6,
    reshape=[*[_scaled(8, (5, 5))] * 3, _labels(5, 5)]))

# -- EnsembleAccuracy --------------------------------------------------------------------------


def _top1(row: np.ndarray, y: int) -> bool:
    """Accuracy's rule: no other class scores >= the true class."""
    return not any(row[c] >= row[y] for c in range(len(row)) if c != y)


def _softmax_row(row: np.ndarray) -> list[float]:
    return [math.exp(v) for v in _log_softmax_row(row)]


def _ensemble_accuracy_ref(ignore: int | None = None):
    def ref(bottoms, layer):
        scores, label = _split(bottoms)
        m, n = len(scores), len(label)
        hits, member_hits, n_valid = [0, 0, 0, 0], [0] * m, 0
        for i in range(n):
            y = label[i]
            if y == ignore:
                continue
            n_valid += 1
            probs = [_softmax_row(scores[j][i]) for j in range(m)]
            ok = [_top1(scores[j][i], y) for j in range(m)]
            mean_p = np.array([sum(p[c] for p in probs) / m for c in range(len(probs[0]))])
            mean_s = np.array([sum(s[i][c] for s in scores) / m for c in range(len(probs[0]))])
            best = 0
            for j in range(1, m):  # strictly greater: ties keep the lowest index
                if probs[j][y] > probs[best][y]:
                    best = j
            hits[0] += _top1(mean_p, y)
            hits[1] += _top1(mean_s, y)
            hits[2] += any(ok)
            hits[3] += ok[best]
            for j in range(m):
                member_hits[j] += ok[j]
        d = n_valid or 1
        tops = [np.array(h / d) for h in hits] + [np.array(member_hits) / d]
        return tops[:len(layer.layer_param.top)]
    return ref


for _id, _m, _n, _c, _ignore, _trailing, _ntop in (
    ("m1_top1", 1, 6, 4, None, (), 1),
    ("m2_two_tops", 2, 10, 4, None, (), 2),
    ("m3_all_tops", 3, 12, 5, None, (), 5),
    ("m5_all_tops_4d", 5, 10, 3, None, (1, 1), 5),
    ("m3_ignore", 3, 12, 4, 2, (), 5),
    ("m4_four_tops", 4, 9, 6, None, (), 4),
):
    add_case(LayerCase(
        type="EnsembleAccuracy", id=_id,
        proto="" if _ignore is None else f"accuracy_param {{ ignore_label: {_ignore} }}",
        bottoms=[*_members(_m, (_n, _c, *_trailing)), _labels(_c, _n)], ntop=_ntop,
        reference=_ensemble_accuracy_ref(_ignore), grad=False, phase=caffe_pb2.TEST,
        reshape=[*_members(_m, (_n + 1, _c, *_trailing)), _labels(_c, _n + 1)]))
