"""Layer cases for ContrastiveLoss, HingeLoss, InfogainLoss and SigmoidCrossEntropyLoss.

References are plain loops over examples, independent of the layers. The InfogainLoss cases that
read H from ``infogain_loss_param.source`` use small .binaryproto files written into a temporary
directory when this module is imported (removed at exit).
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import shutil
import tempfile

import numpy as np

from pycaffe_mpi import snapshot
from pycaffe_mpi.testing.cases.loss import labels
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

FULL, VALID, BATCH_SIZE, NONE = 0, 1, 2, 3


def _fixed(arr: np.ndarray):
    """A bottom spec that always gives ``arr`` (for bottoms that must fit together)."""
    return lambda rng: arr


# -- ContrastiveLoss ---------------------------------------------------------------------------


@functools.cache
def _pairs(n: int, c: int, margin: float, legacy: bool, seed: int):
    """Pairs (a, b) and similarities y whose distances stay clear of the loss's kink.

    The hinge of a dissimilar pair sits at ‖a − b‖ = margin (legacy: ‖a − b‖² = margin), so each
    distance is drawn in [0.2, 1.8]·kink but at least 0.1·kink away from it.
    """
    rng = np.random.default_rng(seed)
    kink = math.sqrt(margin) if legacy else margin
    a = 0.5 * rng.standard_normal((n, c))
    b = np.empty_like(a)
    for i in range(n):
        r = rng.uniform(0.2, 0.8) if i % 2 else rng.uniform(1.1, 1.8)
        u = rng.standard_normal(c)
        b[i] = a[i] + r * kink * u / np.linalg.norm(u)
    y = np.array([(i // 2) % 2 for i in range(n)], float)  # similar and dissimilar, near and far
    return a, b, y


def _contrastive_ref(margin: float = 1.0, legacy: bool = False):
    def ref(bottoms, layer):
        a, b, y = bottoms
        n = a.shape[0]
        loss = 0.0
        for i in range(n):
            d2 = sum((u - v) ** 2 for u, v in zip(a[i].ravel(), b[i].ravel()))
            if int(y.ravel()[i]):
                loss += d2
            elif legacy:
                loss += max(margin - d2, 0.0)
            else:
                loss += max(margin - math.sqrt(d2), 0.0) ** 2
        return [np.array(loss / (2 * n))]
    return ref


for _id, _proto, _n, _c, _margin, _legacy, _shape in (
    ("default", "", 8, 3, 1.0, False, None),
    ("margin2", "contrastive_loss_param { margin: 2 }", 8, 4, 2.0, False, None),
    ("legacy", "contrastive_loss_param { legacy_version: true }", 8, 3, 1.0, True, None),
    ("legacy_margin2_4d", "contrastive_loss_param { margin: 2 legacy_version: true }",
     8, 3, 2.0, True, (1, 1)),
):
    def _specs(n, c=_c, margin=_margin, legacy=_legacy, tail=_shape):
        a, b, y = _pairs(n, c, margin, legacy, 17 + n)
        if tail is not None:
            a, b, y = a.reshape(n, c, *tail), b.reshape(n, c, *tail), y.reshape(n, 1, *tail)
        return [_fixed(a), _fixed(b), _fixed(y)]

    # NOTE: Caffe divides by ‖a − b‖ + 1e-4 in the dissimilar gradient, a relative error of
    # at most 5e-4 at the distances drawn here; the legacy loss has no such term.
    add_case(LayerCase(
        type="ContrastiveLoss", id=_id, proto=_proto, bottoms=_specs(_n),
        reference=_contrastive_ref(_margin, _legacy), threshold=1e-5 if _legacy else 1e-3,
        reshape=_specs(_n + 2)))

# -- HingeLoss ---------------------------------------------------------------------------------


def _hinge_scores(shape: tuple[int, ...]):
    """Scores N(0, 4) kept 0.15 away from ±1, where the hinge of every entry may sit."""
    def draw(rng):
        x = 2 * rng.standard_normal(shape)
        near = np.abs(np.abs(x) - 1) < 0.15
        x[near] = np.sign(x[near]) * 1.3
        return x
    return draw


def _hinge_ref(norm: int = 1):
    def ref(bottoms, layer):
        x, lab = bottoms
        n = x.shape[0]
        rows = x.reshape(n, -1)
        total = 0.0
        for i in range(n):
            for k in range(rows.shape[1]):
                t = -1.0 if k == int(lab.ravel()[i]) else 1.0
                m = max(0.0, 1.0 + t * rows[i, k])
                total += m if norm == 1 else m * m
        return [np.array(total / n)]
    return ref


for _id, _proto, _shape, _lab_shape, _norm in (
    ("l1", "", (4, 5), (4,), 1),
    ("l1_explicit_4d", "hinge_loss_param { norm: L1 }", (4, 5, 1, 1), (4, 1, 1, 1), 1),
    ("l2", "hinge_loss_param { norm: L2 }", (4, 5), (4,), 2),
    ("l2_spatial", "hinge_loss_param { norm: L2 }", (3, 2, 2, 1), (3,), 2),
):
    _dim = math.prod(_shape[1:])
    add_case(LayerCase(
        type="HingeLoss", id=_id, proto=_proto,
        bottoms=[_hinge_scores(_shape), labels(_dim, _lab_shape)], reference=_hinge_ref(_norm),
        reshape=[_hinge_scores((_shape[0] + 1, *_shape[1:])),
                 labels(_dim, (_lab_shape[0] + 1, *_lab_shape[1:]))]))

# -- InfogainLoss ------------------------------------------------------------------------------

_DIR = tempfile.mkdtemp(prefix="pycaffe-infogain-case-")
atexit.register(shutil.rmtree, _DIR, True)


def _infogain_matrix(c: int, seed: int) -> np.ndarray:
    """A C×C gain matrix: a heavy diagonal plus small positive off-diagonal gains, rounded to
    float32 as a .binaryproto stores it."""
    rng = np.random.default_rng(seed)
    h = np.eye(c) * 2 + rng.uniform(0, 0.5, (c, c))
    return h.astype(np.float32).astype(np.float64)


_H = {c: _infogain_matrix(c, 40 + c) for c in (3, 5)}
_H_FILE = {c: os.path.join(_DIR, f"H{c}.binaryproto") for c in _H}
for _c, _h in _H.items():
    # one legacy (1, 1, C, C) blob, as Caffe users write H with the Python helpers
    snapshot.write_binaryproto(_H_FILE[_c], _h.reshape(1, 1, _c, _c), legacy=True)


def _softmax_rows(x3: np.ndarray) -> np.ndarray:
    prob = np.empty_like(x3)
    for o in range(x3.shape[0]):
        for i in range(x3.shape[2]):
            e = np.exp(x3[o, :, i] - x3[o, :, i].max())
            prob[o, :, i] = e / e.sum()
    return prob


def _infogain_ref(axis: int = 1, ignore: int | None = None, norm: int = VALID):
    def ref(bottoms, layer):
        x, lab = bottoms[:2]
        ax = axis % x.ndim
        outer, c, inner = math.prod(x.shape[:ax]), x.shape[ax], math.prod(x.shape[ax + 1:])
        h = bottoms[2].reshape(c, c) if len(bottoms) > 2 else _H[c]
        prob = _softmax_rows(x.reshape(outer, c, inner))
        lab2 = lab.reshape(outer, inner).astype(int)
        loss, count = 0.0, 0
        for o in range(outer):
            for i in range(inner):
                y = lab2[o, i]
                if y == ignore:
                    continue
                for k in range(c):
                    loss -= h[y, k] * math.log(max(prob[o, k, i], 1e-20))
                count += 1
        normalizer = {FULL: outer * inner, VALID: count, BATCH_SIZE: outer, NONE: 1}[norm]
        tops = [np.array(loss / max(1, normalizer))]
        if layer.layer_param.top[1:]:
            tops.append(prob.reshape(x.shape))
        return tops
    return ref


def _gain_bottom(c: int, shape: tuple[int, ...] | None = None):
    """H as a bottom: positive gains of ``shape`` (C·C values)."""
    return lambda rng: rng.uniform(0.1, 2.0, shape or (c, c))


def _src(c: int, extra: str = "") -> str:
    return f'infogain_loss_param {{ source: "{_H_FILE[c]}" {extra}}}'


for _id, _proto, _scores, _lab_shape, _h_bottom, _kw in (
    ("file_2d", _src(5), (4, 5), (4,), None, {}),
    ("file_4d_spatial", _src(3), (2, 3, 2, 3), (2, 1, 2, 3), None, {}),
    ("file_axis2", _src(3, "axis: 2 "), (2, 4, 3), (2, 4), None, {"axis": 2}),
    ("bottom_2d", "", (4, 5), (4,), (5, 5), {}),
    ("bottom_4d_h", "", (2, 3, 2, 3), (2, 1, 2, 3), (1, 1, 3, 3), {}),
    ("bottom_axis_minus1", "infogain_loss_param { axis: -1 }", (3, 2, 5), (3, 2), (5, 5),
     {"axis": -1}),
    ("ignore_valid", _src(3) + " loss_param { ignore_label: 1 }", (2, 3, 2, 3), (2, 1, 2, 3),
     None, {"ignore": 1}),
    ("ignore_full", _src(3) + " loss_param { ignore_label: 1 normalization: FULL }",
     (2, 3, 2, 3), (2, 1, 2, 3), None, {"ignore": 1, "norm": FULL}),
    ("ignore_batch_size_bottom", "loss_param { ignore_label: 2 normalization: BATCH_SIZE }",
     (2, 3, 2, 3), (2, 1, 2, 3), (3, 3), {"ignore": 2, "norm": BATCH_SIZE}),
    ("ignore_none", _src(3) + " loss_param { ignore_label: 0 normalization: NONE }",
     (2, 3, 2, 3), (2, 1, 2, 3), None, {"ignore": 0, "norm": NONE}),
):
    _c = _scores[_kw.get("axis", 1)]
    _extra = [] if _h_bottom is None else [_gain_bottom(_c, _h_bottom)]
    add_case(LayerCase(
        type="InfogainLoss", id=_id, proto=_proto,
        bottoms=[_scores, labels(_c, _lab_shape), *_extra], reference=_infogain_ref(**_kw),
        reshape=[(_scores[0] + 1, *_scores[1:]),
                 labels(_c, (_lab_shape[0] + 1, *_lab_shape[1:])), *_extra]))

# Scaled scores so some probabilities fall below 1e-20 (the clamp); the loss stays finite.
add_case(LayerCase(
    type="InfogainLoss", id="large_scores", proto=_src(5), grad=False,
    bottoms=[lambda rng: 60 * rng.standard_normal((4, 5)), labels(5, (4,))],
    reference=_infogain_ref(), rtol=1e-6,
    reshape=[lambda rng: 60 * rng.standard_normal((5, 5)), labels(5, (5,))]))

# The optional second top (probabilities). Caffe's backward ignores its diff, so the
# projection-objective gradient check does not apply.
add_case(LayerCase(
    type="InfogainLoss", id="prob_top", proto=_src(3), ntop=2, grad=False,
    bottoms=[(2, 3, 2, 2), labels(3, (2, 2, 2))], reference=_infogain_ref(),
    reshape=[(3, 3, 2, 2), labels(3, (3, 2, 2))]))

# -- SigmoidCrossEntropyLoss -------------------------------------------------------------------


def _targets(shape: tuple[int, ...], ignore: int | None = None):
    """Targets uniform in [0, 1]; with ``ignore``, about a third of them set to it."""
    def draw(rng):
        t = rng.uniform(0, 1, shape)
        if ignore is not None:
            t[rng.uniform(0, 1, shape) < 1 / 3] = ignore
        return t
    return draw


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid_ce_ref(ignore: int | None = None, norm: int = BATCH_SIZE):
    def ref(bottoms, layer):
        x, t = (b.ravel() for b in bottoms)
        loss, count = 0.0, 0
        for xk, tk in zip(x, t):
            if ignore is not None and int(tk) == ignore:
                continue
            # log(1 − σ(x)) = log σ(−x)
            loss -= tk * _log_sigmoid(xk) + (1 - tk) * _log_sigmoid(-xk)
            count += 1
        n = bottoms[0].shape[0]
        normalizer = {FULL: x.size, VALID: count, BATCH_SIZE: n, NONE: 1}[norm]
        return [np.array(loss / max(1, normalizer))]
    return ref


for _id, _proto, _shape, _kw in (
    ("default_batch_size", "", (4, 3), {}),
    ("4d", "", (2, 3, 2, 2), {}),
    ("valid_no_ignore", "loss_param { normalization: VALID }", (4, 3), {"norm": VALID}),
    ("ignore_default", "loss_param { ignore_label: -1 }", (2, 3, 2, 2), {"ignore": -1}),
    ("ignore_valid", "loss_param { ignore_label: -1 normalization: VALID }", (2, 3, 2, 2),
     {"ignore": -1, "norm": VALID}),
    ("ignore_full", "loss_param { ignore_label: -1 normalization: FULL }", (2, 3, 2, 2),
     {"ignore": -1, "norm": FULL}),
    ("ignore_none", "loss_param { ignore_label: -1 normalization: NONE }", (2, 3, 2, 2),
     {"ignore": -1, "norm": NONE}),
    ("normalize_true", "loss_param { ignore_label: -1 normalize: true }", (2, 3, 2, 2),
     {"ignore": -1, "norm": VALID}),
    ("normalize_false", "loss_param { ignore_label: -1 normalize: false }", (2, 3, 2, 2),
     {"ignore": -1, "norm": BATCH_SIZE}),
):
    _ign = _kw.get("ignore")
    add_case(LayerCase(
        type="SigmoidCrossEntropyLoss", id=_id, proto=_proto,
        bottoms=[_shape, _targets(_shape, _ign)], reference=_sigmoid_ce_ref(**_kw),
        reshape=[(_shape[0] + 1, *_shape[1:]), _targets((_shape[0] + 1, *_shape[1:]), _ign)]))

# Large scores: the stable formula keeps loss and gradient finite and exact.
add_case(LayerCase(
    type="SigmoidCrossEntropyLoss", id="large_scores",
    bottoms=[lambda rng: 40 * rng.standard_normal((4, 3)), _targets((4, 3))],
    reference=_sigmoid_ce_ref(), rtol=1e-6,
    reshape=[lambda rng: 40 * rng.standard_normal((5, 3)), _targets((5, 3))]))
