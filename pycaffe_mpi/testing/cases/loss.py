"""Layer cases for the loss family: SoftmaxWithLoss, Accuracy, EuclideanLoss,
MultinomialLogisticLoss. References are plain loops over examples, independent of the layers."""

from __future__ import annotations

import math

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

FLT_MIN = 1.17549435e-38
FULL, VALID, BATCH_SIZE, NONE = 0, 1, 2, 3


def labels(n_classes: int, shape: tuple[int, ...]):
    """A bottom spec drawing integer class labels (as floats) of ``shape``."""
    return lambda rng: rng.integers(0, n_classes, size=shape).astype(float)


def _split(x: np.ndarray, lab: np.ndarray, axis: int):
    """Scores as (outer, C, inner) and labels as (outer, inner) ints."""
    axis %= x.ndim
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    return x.reshape(outer, x.shape[axis], inner), lab.reshape(outer, inner).astype(int)


# -- SoftmaxWithLoss ---------------------------------------------------------------------------


def _softmax_loss_ref(axis: int = 1, ignore: int | None = None, norm: int = VALID):
    def ref(bottoms, layer):
        x, lab = bottoms
        x3, lab2 = _split(x, lab, axis)
        prob = np.empty_like(x3)
        loss, count = 0.0, 0
        for o in range(x3.shape[0]):
            for i in range(x3.shape[2]):
                e = np.exp(x3[o, :, i] - x3[o, :, i].max())
                prob[o, :, i] = e / e.sum()
                y = lab2[o, i]
                if y == ignore:
                    continue
                loss -= math.log(max(prob[o, y, i], FLT_MIN))
                count += 1
        total = x3.shape[0] * x3.shape[2]
        normalizer = {FULL: total, VALID: count, BATCH_SIZE: x3.shape[0], NONE: 1}[norm]
        tops = [np.array(loss / max(1, normalizer))]
        if layer.layer_param.top[1:]:
            tops.append(prob.reshape(x.shape))
        return tops
    return ref


for _id, _proto, _scores, _lab_shape, _kw in (
    ("2d", "", (4, 5), (4,), {}),
    ("4d_spatial", "", (2, 3, 2, 3), (2, 1, 2, 3), {}),
    ("axis2", "softmax_param { axis: 2 }", (2, 3, 4), (2, 3), {"axis": 2}),
    ("axis_minus1", "softmax_param { axis: -1 }", (3, 2, 4), (3, 2), {"axis": -1}),
    ("ignore_valid", "loss_param { ignore_label: 1 }", (2, 3, 2, 3), (2, 1, 2, 3),
     {"ignore": 1}),
    ("ignore_full", "loss_param { ignore_label: 1 normalization: FULL }", (2, 3, 2, 3),
     (2, 1, 2, 3), {"ignore": 1, "norm": FULL}),
    ("ignore_batch_size", "loss_param { ignore_label: 1 normalization: BATCH_SIZE }",
     (2, 3, 2, 3), (2, 1, 2, 3), {"ignore": 1, "norm": BATCH_SIZE}),
    ("ignore_none", "loss_param { ignore_label: 1 normalization: NONE }", (2, 3, 2, 3),
     (2, 1, 2, 3), {"ignore": 1, "norm": NONE}),
    ("normalize_false", "loss_param { ignore_label: 0 normalize: false }", (2, 3, 2, 3),
     (2, 1, 2, 3), {"ignore": 0, "norm": BATCH_SIZE}),
    ("normalize_true", "loss_param { ignore_label: 0 normalize: true }", (2, 3, 2, 3),
     (2, 1, 2, 3), {"ignore": 0, "norm": VALID}),
):
    _c = _scores[_kw.get("axis", 1)]
    add_case(LayerCase(
        type="SoftmaxWithLoss", id=_id, proto=_proto,
        bottoms=[_scores, labels(_c, _lab_shape)], reference=_softmax_loss_ref(**_kw),
        reshape=[(_scores[0] + 1, *_scores[1:]),
                 labels(_c, (_lab_shape[0] + 1, *_lab_shape[1:]))]))

# Scaled scores so some probabilities are tiny (loss and gradient stay finite).
add_case(LayerCase(
    type="SoftmaxWithLoss", id="large_scores",
    bottoms=[lambda rng: 30 * rng.standard_normal((4, 5)), labels(5, (4,))],
    reference=_softmax_loss_ref(), rtol=1e-6,
    reshape=[lambda rng: 30 * rng.standard_normal((5, 5)), labels(5, (5,))]))

# The optional second top (probabilities). Caffe's backward ignores its diff, so the
# projection-objective gradient check does not apply.
add_case(LayerCase(
    type="SoftmaxWithLoss", id="prob_top", bottoms=[(2, 3, 2, 2), labels(3, (2, 2, 2))],
    ntop=2, reference=_softmax_loss_ref(), grad=False,
    reshape=[(3, 3, 2, 2), labels(3, (3, 2, 2))]))

# -- Accuracy ----------------------------------------------------------------------------------


def _accuracy_ref(top_k: int = 1, axis: int = 1, ignore: int | None = None):
    def ref(bottoms, layer):
        x, lab = bottoms
        x3, lab2 = _split(x, lab, axis)
        n_classes = x3.shape[1]
        hits, seen = np.zeros(n_classes), np.zeros(n_classes)
        for o in range(x3.shape[0]):
            for i in range(x3.shape[2]):
                y = lab2[o, i]
                if y == ignore:
                    continue
                seen[y] += 1
                # BVLC HEAD: the other classes scoring >= the true class count against it
                others = sum(x3[o, k, i] >= x3[o, y, i] for k in range(n_classes) if k != y)
                hits[y] += others < top_k
        tops = [np.array(hits.sum() / seen.sum() if seen.sum() else 0.0)]
        if layer.layer_param.top[1:]:
            tops.append(np.array([h / s if s else 0.0 for h, s in zip(hits, seen)]))
        return tops
    return ref


for _id, _proto, _scores, _lab_shape, _kw, _ntop in (
    ("top1", "", (6, 5), (6,), {}, 1),
    ("top3", "accuracy_param { top_k: 3 }", (6, 5), (6,), {"top_k": 3}, 1),
    ("ignore", "accuracy_param { ignore_label: 2 }", (8, 4), (8,), {"ignore": 2}, 1),
    ("per_class", "", (10, 4), (10,), {}, 2),
    ("per_class_ignore_top2", "accuracy_param { top_k: 2 ignore_label: 0 }", (10, 4), (10,),
     {"top_k": 2, "ignore": 0}, 2),
    ("4d_spatial", "", (2, 4, 2, 3), (2, 1, 2, 3), {}, 2),
    ("axis2", "accuracy_param { axis: 2 }", (2, 3, 5), (2, 3), {"axis": 2}, 1),
):
    _c = _scores[_kw.get("axis", 1)]
    add_case(LayerCase(
        type="Accuracy", id=_id, proto=_proto, bottoms=[_scores, labels(_c, _lab_shape)],
        ntop=_ntop, reference=_accuracy_ref(**_kw), grad=False,
        reshape=[(_scores[0] + 1, *_scores[1:]),
                 labels(_c, (_lab_shape[0] + 1, *_lab_shape[1:]))]))

# -- EuclideanLoss -----------------------------------------------------------------------------


def _euclidean_ref(bottoms, layer):
    a, b = bottoms
    n = a.shape[0]
    total = sum((u - v) ** 2 for u, v in zip(a.ravel(), b.ravel()))
    return [np.array(total / (2 * n))]


add_case(LayerCase(type="EuclideanLoss", id="same_shape", bottoms=[(4, 5), (4, 5)],
                   reference=_euclidean_ref))
add_case(LayerCase(type="EuclideanLoss", id="4d_vs_2d", bottoms=[(3, 2, 2, 1), (3, 4)],
                   reference=_euclidean_ref))

# -- MultinomialLogisticLoss -------------------------------------------------------------------


def probabilities(shape: tuple[int, ...]):
    """A bottom spec drawing rows of positive probabilities (softmax of N(0, 1) scores)."""
    def draw(rng):
        e = np.exp(rng.standard_normal(shape))
        flat = e.reshape(shape[0], -1)
        return (flat / flat.sum(axis=1, keepdims=True)).reshape(shape)
    return draw


def _mlogistic_ref(bottoms, layer):
    p, lab = bottoms
    n = p.shape[0]
    rows = p.reshape(n, -1)
    loss = -sum(math.log(max(rows[i, int(lab.ravel()[i])], 1e-20)) for i in range(n))
    return [np.array(loss / n)]


for _id, _shape, _lab_shape in (("4d", (4, 5, 1, 1), (4, 1, 1, 1)), ("2d", (3, 6), (3,))):
    add_case(LayerCase(
        type="MultinomialLogisticLoss", id=_id,
        bottoms=[probabilities(_shape), labels(_shape[1], _lab_shape)], reference=_mlogistic_ref,
        reshape=[probabilities((_shape[0] + 1, *_shape[1:])),
                 labels(_shape[1], (_lab_shape[0] + 1, *_lab_shape[1:]))]))
