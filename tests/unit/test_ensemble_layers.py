"""Ensemble layers: MultipleChoiceLoss against independent losses and hand-computed values,
seeded tie-breaking, the averaged losses against their composed forms, EnsembleAccuracy on
hand-made score tables, its assignment matrix and the report the Net writes from it (CSV +
matplotlib figure), and the per-member outputs named member_<what>_<i> in the solver's log."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import errors
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.reports import assignment
from pycaffe_mpi.testing import gradient_check
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer

PIL_Image = pytest.importorskip("PIL.Image")


def _layer(type_: str, proto: str, bottoms: list[np.ndarray], ntop: int = 1,
           dtype=np.float64, seed: int = 1701):
    case = LayerCase(type=type_, id="unit", proto=proto, ntop=ntop)
    return build_layer(case, [np.asarray(b, np.float64) for b in bottoms], dtype, seed=seed)


def _forward_backward(layer, bb, tb, top_diff: float = 1.0) -> list[np.ndarray]:
    """Forward, then backward with top[0].diff = top_diff into every member bottom."""
    layer.forward(bb, tb)
    tb[0].diff[...] = top_diff
    for t in tb[1:]:
        t.diff[...] = 0
    layer.backward(tb, [True] * (len(bb) - 1) + [False], bb)
    return [np.array(b.diff) for b in bb[:-1]]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _random_members(rng, m: int, n: int, c: int) -> list[np.ndarray]:
    return [rng.standard_normal((n, c)) for _ in range(m)]


# -- MultipleChoiceLoss ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ignore", [None, 2])
def test_mcl_with_k_equal_m_is_the_sum_of_independent_softmax_losses(dtype, ignore):
    rng = np.random.default_rng(5)
    m, n, c = 3, 9, 4
    scores = _random_members(rng, m, n, c)
    label = rng.integers(0, c, size=n).astype(float)
    loss_param = "" if ignore is None else f"loss_param {{ ignore_label: {ignore} }}"
    layer, bb, tb = _layer("MultipleChoiceLoss",
                           f"multiple_choice_loss_param {{ k: {m} }} {loss_param}",
                           [*scores, label], dtype=dtype)
    got = _forward_backward(layer, bb, tb, 0.7)
    want_loss = 0.0
    for j in range(m):
        sl, sb, st = _layer("SoftmaxWithLoss", loss_param, [scores[j], label], dtype=dtype)
        (want_diff,) = _forward_backward(sl, sb, st, 0.7)
        want_loss += float(st[0].data)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got[j], want_diff, rtol=tol, atol=tol)
    assert float(tb[0].data) == pytest.approx(want_loss, rel=1e-5 if dtype == np.float32
                                              else 1e-12)


def test_mcl_k1_gives_a_gradient_only_to_each_examples_winner():
    rng = np.random.default_rng(11)
    m, n, c = 4, 12, 5
    scores = _random_members(rng, m, n, c)
    label = rng.integers(0, c, size=n)
    layer, bb, tb = _layer("MultipleChoiceLoss", "", [*scores, label.astype(float)])
    diffs = _forward_backward(layer, bb, tb)
    losses = np.stack([-_log_softmax(s)[np.arange(n), label] for s in scores], axis=1)  # (N, M)
    winner = losses.argmin(axis=1)
    for j in range(m):
        for i in range(n):
            row = diffs[j][i]
            if winner[i] == j:
                p = np.exp(_log_softmax(scores[j][i:i + 1]))[0]
                p[label[i]] -= 1
                np.testing.assert_allclose(row, p / n, rtol=1e-12)
            else:
                assert not row.any(), f"member {j} got a gradient for example {i}"
    assert float(tb[0].data) == pytest.approx(losses.min(axis=1).mean(), rel=1e-12)


# Hand-computed: N = 3, C = 2, labels (0, 0, 1). Rows (log 3, 0) give p = (3/4, 1/4), rows (0, 0)
# give p = (1/2, 1/2). With a = log 4/3 and b = log 2 the member losses ℓ_mi are
#   member 0: a, b, b      member 1: b, a, a
# so with k = 1 example 0 goes to member 0 and examples 1, 2 to member 1 (counts 1, 2).
_L3 = math.log(3)
_HAND = [np.array([[_L3, 0], [0, 0], [0, 0]]), np.array([[0, 0], [_L3, 0], [0, _L3]]),
         np.array([0.0, 0.0, 1.0])]
_A, _B = math.log(4 / 3), math.log(2)


@pytest.mark.parametrize(("proto", "loss", "per_member"), [
    ("", _A, [_A / 3, 2 * _A / 3]),
    ("normalization: ASSIGNED", 2 * _A, [_A, _A]),
    ("ce_weight: 0.5", _A + 0.5 * (_A + _B), [_A / 3, 2 * _A / 3]),
    ("normalization: ASSIGNED ce_weight: 2", 2 * _A + 2 * (_A + _B), [_A, _A]),
    ("k: 2", (3 * _A + 3 * _B) / 3, [(_A + 2 * _B) / 3, (_B + 2 * _A) / 3]),
])
def test_mcl_hand_computed_values(proto, loss, per_member):
    layer, bb, tb = _layer("MultipleChoiceLoss", f"multiple_choice_loss_param {{ {proto} }}",
                           _HAND, ntop=3)
    layer.forward(bb, tb)
    assert float(tb[0].data) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(tb[1].data, per_member, rtol=1e-12)
    k2 = "k: 2" in proto
    np.testing.assert_array_equal(tb[2].data, [3, 3] if k2 else [1, 2])


def test_mcl_assigned_gradient_divides_by_the_members_count():
    layer, bb, tb = _layer("MultipleChoiceLoss",
                           "multiple_choice_loss_param { normalization: ASSIGNED }", _HAND)
    d0, d1 = _forward_backward(layer, bb, tb, 2.0)
    # member 0 owns example 0 alone: 2 · (p − onehot) = 2 · (3/4 − 1, 1/4)
    np.testing.assert_allclose(d0, [[-0.5, 0.5], [0, 0], [0, 0]], atol=1e-15)
    # member 1 owns examples 1 and 2: 2 · (p − onehot) / 2
    np.testing.assert_allclose(d1, [[0, 0], [-0.25, 0.25], [0.25, -0.25]], atol=1e-15)


def test_mcl_gradient_with_ce_and_assigned_normalisation_float64():
    # Losses far from ties: member j's true-class score is raised by 3·j at example j mod M.
    rng = np.random.default_rng(2)
    m, n, c = 3, 6, 4
    scores = _random_members(rng, m, n, c)
    label = rng.integers(0, c, size=n)
    for i in range(n):
        scores[i % m][i, label[i]] += 6
    layer, bb, tb = _layer(
        "MultipleChoiceLoss",
        "multiple_choice_loss_param { k: 1 ce_weight: 0.3 normalization: ASSIGNED }",
        [*scores, label.astype(float)])
    fails = gradient_check.check_gradient(layer, bb, tb, list(range(m)))
    assert not fails, "\n".join(fails)


def _assignment(scores: list[np.ndarray], label: np.ndarray, seed: int, k: int = 1):
    """(N, M) bool: which members got a gradient row (λ = 0: exactly the assigned ones)."""
    layer, bb, tb = _layer("MultipleChoiceLoss", f"multiple_choice_loss_param {{ k: {k} }}",
                           [*scores, label.astype(float)], ntop=3, seed=seed)
    diffs = _forward_backward(layer, bb, tb)
    got = np.stack([np.abs(d).sum(axis=1) > 0 for d in diffs], axis=1)
    np.testing.assert_array_equal(got.sum(axis=0), tb[2].data)
    return got


def test_mcl_ties_are_broken_by_the_seed_alone():
    rng = np.random.default_rng(0)
    m, n, c = 3, 3000, 5
    same = rng.standard_normal((n, c))
    other = rng.standard_normal((n, c))
    label = rng.integers(0, c, size=n)
    a = _assignment([same] * m, label, seed=1)
    assert (a.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(_assignment([same] * m, label, seed=1), a)
    # other (still tied) scores, same seed: the same draw decides
    np.testing.assert_array_equal(_assignment([other] * m, label, seed=1), a)
    assert (_assignment([same] * m, label, seed=2) != a).any()
    # each tied member wins about n/m times (binomial sd ≈ 26; allow 6 sd)
    assert np.all(np.abs(a.sum(axis=0) - n / m) < 160), a.sum(axis=0)


def test_mcl_tie_breaking_only_among_the_tied_members():
    rng = np.random.default_rng(4)
    n, c = 2000, 4
    good = rng.standard_normal((n, c))
    label = rng.integers(0, c, size=n)
    bad = good.copy()
    bad[np.arange(n), label] -= 1.0  # member 2 always has the larger loss
    a = _assignment([good, good, bad], label, seed=9)
    assert not a[:, 2].any()
    assert abs(a[:, 0].sum() - n / 2) < 140  # sd ≈ 22
    a2 = _assignment([good, good, bad], label, seed=9, k=2)
    assert a2[:, :2].all() and not a2[:, 2].any()


@pytest.mark.parametrize(("proto", "field"), [
    ("multiple_choice_loss_param { k: 0 }", "multiple_choice_loss_param.k"),
    ("multiple_choice_loss_param { k: 4 }", "multiple_choice_loss_param.k"),
    ("multiple_choice_loss_param { ce_weight: -1 }", "multiple_choice_loss_param.ce_weight"),
])
def test_mcl_bad_params_name_the_field(proto, field):
    b = [np.zeros((2, 3))] * 3 + [np.zeros(2)]
    with pytest.raises(errors.NetError, match=rf'"multiplechoiceloss_under_test".*{field}'):
        _layer("MultipleChoiceLoss", proto, b)


@pytest.mark.parametrize("type_", ["MultipleChoiceLoss", "ScoreAverageLoss",
                                   "ProbabilityAverageLoss", "EnsembleAccuracy"])
@pytest.mark.parametrize(("bottoms", "field"), [
    ([(2, 3), (2, 4), (2,)], r"bottom\[1\]"),  # members differ
    ([(2, 3), (2, 3), (3,)], r"bottom\[2\]"),  # one label per example
    ([(2, 3, 2, 2), (2, 3, 2, 2), (2,)], r"bottom\[0\]"),  # spatial scores
])
def test_bad_shapes_are_clear_errors(type_, bottoms, field):
    with pytest.raises(errors.NetError, match=field):
        _layer(type_, "", [np.zeros(s) for s in bottoms])


@pytest.mark.parametrize("type_", ["MultipleChoiceLoss", "ScoreAverageLoss",
                                   "ProbabilityAverageLoss"])
def test_losses_refuse_label_gradients(type_):
    b = [np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2)]
    layer, bb, tb = _layer(type_, "", b)
    assert [layer.allow_force_backward(i) for i in range(3)] == [True, True, False]
    layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match="label"):
        layer.backward(tb, [True, True, True], bb)


def test_mcl_in_a_net_only_top0_is_a_loss():
    text = """
    layer { name: 'in' type: 'Input' top: 's0' top: 's1' top: 'y'
            input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 3 } shape { dim: 4 } } }
    layer { name: 'mcl' type: 'MultipleChoiceLoss' bottom: 's0' bottom: 's1' bottom: 'y'
            top: 'loss' top: 'member_loss' top: 'count' }
    """
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), pycaffe_mpi.TRAIN,
              dtype=np.float64)
    rng = np.random.default_rng(0)
    out = net.forward(s0=rng.standard_normal((4, 3)), s1=rng.standard_normal((4, 3)),
                      y=np.array([0.0, 1, 2, 1]))
    weights = net.blob_loss_weights
    assert (weights["loss"], weights["member_loss"], weights["count"]) == (1.0, 0.0, 0.0)
    assert net.forward_loss() == pytest.approx(float(out["loss"]))
    assert float(out["count"].sum()) == 4
    assert float(out["member_loss"].sum()) == pytest.approx(float(out["loss"]))


# -- ScoreAverageLoss --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [1, 3])
def test_score_average_is_softmax_loss_of_the_mean_score(dtype, m):
    rng = np.random.default_rng(3)
    scores = _random_members(rng, m, 7, 4)
    label = rng.integers(0, 4, size=7).astype(float)
    proto = "loss_param { ignore_label: 1 normalization: BATCH_SIZE }"
    layer, bb, tb = _layer("ScoreAverageLoss", proto, [*scores, label], dtype=dtype)
    got = _forward_backward(layer, bb, tb, 1.5)
    sl, sb, st = _layer("SoftmaxWithLoss", proto, [sum(scores) / m, label], dtype=dtype)
    (want,) = _forward_backward(sl, sb, st, 1.5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert float(tb[0].data) == pytest.approx(float(st[0].data), rel=tol)
    for d in got:
        np.testing.assert_allclose(d, want / m, rtol=tol, atol=tol)


# -- ProbabilityAverageLoss --------------------------------------------------------------------

_COMPOSED = """
force_backward: true
layer { name: 'in' type: 'Input' top: 's0' top: 's1' top: 's2' top: 's3' top: 'y'
        input_param { shape { dim: 5 dim: 4 } shape { dim: 5 dim: 4 } shape { dim: 5 dim: 4 }
                      shape { dim: 5 dim: 4 } shape { dim: 5 } } }
layer { name: 'p0' type: 'Softmax' bottom: 's0' top: 'p0' }
layer { name: 'p1' type: 'Softmax' bottom: 's1' top: 'p1' }
layer { name: 'p2' type: 'Softmax' bottom: 's2' top: 'p2' }
layer { name: 'p3' type: 'Softmax' bottom: 's3' top: 'p3' }
layer { name: 'mean' type: 'Eltwise' bottom: 'p0' bottom: 'p1' bottom: 'p2' bottom: 'p3'
        top: 'p' eltwise_param { operation: SUM coeff: 0.25 coeff: 0.25 coeff: 0.25
                                 coeff: 0.25 } }
layer { name: 'loss' type: 'MultinomialLogisticLoss' bottom: 'p' bottom: 'y' top: 'loss' }
"""
_FUSED = """
force_backward: true
layer { name: 'in' type: 'Input' top: 's0' top: 's1' top: 's2' top: 's3' top: 'y'
        input_param { shape { dim: 5 dim: 4 } shape { dim: 5 dim: 4 } shape { dim: 5 dim: 4 }
                      shape { dim: 5 dim: 4 } shape { dim: 5 } } }
layer { name: 'loss' type: 'ProbabilityAverageLoss' bottom: 's0' bottom: 's1' bottom: 's2'
        bottom: 's3' bottom: 'y' top: 'loss' propagate_down: true propagate_down: true
        propagate_down: true propagate_down: true propagate_down: false }
"""


def _run_net(text: str, scores: list[np.ndarray], label: np.ndarray, dtype=np.float64):
    net = Net(text_format.Merge(text, caffe_pb2.NetParameter()), pycaffe_mpi.TRAIN,
              dtype=dtype)
    inputs = {f"s{j}": s for j, s in enumerate(scores)}
    loss = float(net.forward(y=label, **inputs)["loss"])
    diffs = net.backward(diffs=list(inputs))
    return loss, [np.array(diffs[f"s{j}"]) for j in range(len(scores))]


def test_probability_average_equals_the_composed_caffe_net():
    rng = np.random.default_rng(8)
    scores = [2 * s for s in _random_members(rng, 4, 5, 4)]
    label = rng.integers(0, 4, size=5).astype(float)
    want_loss, want = _run_net(_COMPOSED, scores, label)
    got_loss, got = _run_net(_FUSED, scores, label)
    assert math.isfinite(want_loss)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_average_stays_exact_for_extreme_scores(dtype):
    # member j scores (0, 1e4 + j, 0, 0) with label 0: p_j[y] ≈ exp(−(1e4 + j)), far below
    # what the composed net can represent (it clamps the mean at 1e-20).
    n, m = 5, 4
    scores = []
    for j in range(m):
        s = np.zeros((n, 4))
        s[:, 1] = 1e4 + j
        scores.append(s)
    label = np.zeros(n)
    lse = -1e4 + math.log(sum(math.exp(-j) for j in range(m)))
    want = -(lse - math.log(m))  # ≈ 1e4
    got_loss, got = _run_net(_FUSED, scores, label, dtype)
    assert got_loss == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-12)
    w = np.exp(-np.arange(m)) / np.exp(-np.arange(m)).sum()
    for j, g in enumerate(got):
        assert np.isfinite(g).all()
        # w_j (p − onehot) / N: −w_j at the label, +w_j at the winning class, 0 elsewhere
        np.testing.assert_allclose(g[:, 0], -w[j] / n, rtol=1e-5)
        np.testing.assert_allclose(g[:, 1], w[j] / n, rtol=1e-5)
    composed_loss, _ = _run_net(_COMPOSED, scores, label)
    assert composed_loss == pytest.approx(-math.log(1e-20))  # saturated


# -- EnsembleAccuracy --------------------------------------------------------------------------
#
# Two members, three classes; rows given as probabilities (scores = log p).
#   A, label 0: member 0 (0.4, 0.3, 0.3) right; member 1 (0.45, 0.54, 0.01) wrong but with the
#      higher true-class probability: any-member oracle right, the authors' oracle wrong.
#   B, label 0: member 0 (0.3, 0.7, 1e-6), member 1 (0.29, 0.11, 0.6), both wrong. Mean
#      probability (0.295, 0.405, 0.3) is wrong; the mean score (a geometric mean) is right:
#      sqrt(0.3·0.29) ≈ 0.295 > sqrt(0.7·0.11) ≈ 0.277 > sqrt(1e-6·0.6).
#   C, label 2: member 0 scores (0, 0, 5), member 1 (0, 1, 4): all right; member 0 wins.
#   D, label 1: member 0 scores (5, 0, 0), member 1 (0, 0, 3): all wrong; member 1 wins
#      (true-class probability 0.045 against 0.0066).
_ROWS = {
    "A": (np.log([0.4, 0.3, 0.3]), np.log([0.45, 0.54, 0.01]), 0),
    "B": (np.log([0.3, 0.7 - 1e-6, 1e-6]), np.log([0.29, 0.11, 0.6]), 0),
    "C": (np.array([0.0, 0, 5]), np.array([0.0, 1, 4]), 2),
    "D": (np.array([5.0, 0, 0]), np.array([0.0, 0, 3]), 1),
    "E": (np.array([0.0, 0, 9]), np.array([9.0, 0, 0]), 1),  # label 1 is ignored below
}


def _table(keys: str) -> list[np.ndarray]:
    rows = [_ROWS[k] for k in keys]
    return [np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
            np.array([float(r[2]) for r in rows])]


@pytest.mark.parametrize(("keys", "want"), [
    ("A", [1, 1, 1, 0, [1, 0]]),
    ("B", [0, 1, 0, 0, [0, 0]]),
    ("C", [1, 1, 1, 1, [1, 1]]),
    ("D", [0, 0, 0, 0, [0, 0]]),
    ("ABCD", [0.5, 0.75, 0.5, 0.25, [0.5, 0.25]]),
])
def test_ensemble_accuracy_hand_made_tables(keys, want):
    layer, bb, tb = _layer("EnsembleAccuracy", "", _table(keys), ntop=5)
    layer.forward(bb, tb)
    for i in range(4):
        assert float(tb[i].data) == pytest.approx(want[i]), f"top {i}"
    np.testing.assert_allclose(tb[4].data, want[4])


def test_ensemble_accuracy_fewer_tops_and_ignore_label():
    layer, bb, tb = _layer("EnsembleAccuracy", "accuracy_param { ignore_label: 1 }",
                           _table("ACE"), ntop=2)
    layer.forward(bb, tb)
    # D would count (label 1) but is not in the table; E has label 1 and is skipped
    assert [float(t.data) for t in tb] == [1.0, 1.0]
    layer, bb, tb = _layer("EnsembleAccuracy", "accuracy_param { ignore_label: 0 }",
                           _table("AB"), ntop=5)
    layer.forward(bb, tb)  # nothing valid: every accuracy 0
    assert [float(t.data) for t in tb[:4]] == [0.0] * 4 and not tb[4].data.any()


def test_ensemble_accuracy_has_no_backward():
    layer, bb, tb = _layer("EnsembleAccuracy", "", _table("AB"))
    assert not any(layer.allow_force_backward(i) for i in range(3))
    layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match="no backward"):
        layer.backward(tb, [True, False, False], bb)
    with pytest.raises(errors.NetError, match=r"accuracy_param\.top_k"):
        _layer("EnsembleAccuracy", "accuracy_param { top_k: 2 }", _table("AB"))


_CSV = "member,0,1,2\n0,0.5000,0.0000,1.0000\n1,0.5000,1.0000,0.0000\n"


def _feed(layer, bb, tb, keys: str) -> None:
    arrays = _table(keys)
    for b, a in zip(bb, arrays):
        b.reshape(a.shape)
        b.data[...] = a
    layer.reshape(bb, tb)
    layer.forward(bb, tb)


def test_assignment_matrix_over_a_two_batch_pass():
    layer, bb, tb = _layer("EnsembleAccuracy", "", _table("AB"))
    layer.begin_test_pass()
    assert layer.assignment_matrix() is None and layer.end_test_pass() is None
    _feed(layer, bb, tb, "AB")
    _feed(layer, bb, tb, "CD")
    want = [[0.5, 0.0, 1.0], [0.5, 1.0, 0.0]]
    np.testing.assert_array_equal(layer.assignment_matrix(), want)
    report = layer.end_test_pass()
    assert isinstance(report, assignment.Assignment)
    np.testing.assert_array_equal(report.share, want)
    assert report.examples == 4 and report.class_names is None
    # a new pass starts from zero
    layer.begin_test_pass()
    _feed(layer, bb, tb, "C")
    np.testing.assert_array_equal(layer.assignment_matrix(), [[0, 0, 1], [0, 0, 0]])


def test_assignment_skips_ignored_examples():
    layer, bb, tb = _layer("EnsembleAccuracy", "accuracy_param { ignore_label: 1 }",
                           _table("CE"))
    layer.begin_test_pass()
    layer.forward(bb, tb)
    np.testing.assert_array_equal(layer.won, [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(layer.totals, [0, 0, 1])


def test_assignment_report_can_be_switched_off():
    layer, bb, tb = _layer("EnsembleAccuracy",
                           "ensemble_accuracy_param { write_assignment: false }", _table("AB"))
    layer.begin_test_pass()
    layer.forward(bb, tb)
    assert layer.assignment_matrix() is not None  # still measured, only not reported
    assert layer.end_test_pass() is None


def test_assignment_label_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nship\n\n")
    layer, bb, tb = _layer("EnsembleAccuracy",
                           f"ensemble_accuracy_param {{ label_file: '{labels}' }}", _table("AB"))
    assert layer.class_names == ["cat", "dog", "ship"]
    layer.begin_test_pass()
    layer.forward(bb, tb)
    assert layer.end_test_pass().class_names == ["cat", "dog", "ship"]
    labels.write_text("cat\ndog\n")
    with pytest.raises(errors.NetError, match=r"ensemble_accuracy_param\.label_file.*3 classes"):
        _layer("EnsembleAccuracy", f"ensemble_accuracy_param {{ label_file: '{labels}' }}",
               _table("AB"))
    with pytest.raises(errors.NetError, match=r"label_file.*cannot read"):
        _layer("EnsembleAccuracy",
               f"ensemble_accuracy_param {{ label_file: '{tmp_path / 'missing.txt'}' }}",
               _table("AB"))


_NET = """
layer { name: 'in' type: 'Input' top: 's0' top: 's1' top: 'y'
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: 'ens/acc' type: 'EnsembleAccuracy' bottom: 's0' bottom: 's1' bottom: 'y'
        top: 'mean_acc' top: 'score_acc' top: 'oracle' top: 'authors' top: 'member'
        %s }
"""


def _net_pass(param: str = "") -> Net:
    net = Net(text_format.Merge(_NET % param, caffe_pb2.NetParameter()), pycaffe_mpi.TEST,
              dtype=np.float32)
    net.begin_test_pass()
    for keys in ("AB", "CD"):
        s0, s1, y = _table(keys)
        net.forward(s0=s0, s1=s1, y=y)
    return net


def test_assignment_report_written_by_the_net_hook(tmp_path, caplog):
    net = _net_pass()
    prefix = tmp_path / "sub" / "run_iter_10"
    with caplog.at_level("INFO", logger="pycaffe_mpi"):
        paths = net.end_test_pass(str(prefix), 10)
    assert paths == [f"{prefix}_ens_acc_assignment.csv", f"{prefix}_ens_acc_assignment.png"]
    assert (tmp_path / "sub" / "run_iter_10_ens_acc_assignment.csv").read_text() == _CSV
    with PIL_Image.open(paths[1]) as img:
        assert img.width >= 500 and img.height >= 300  # a readable figure, not a thumbnail
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is not None and len(colours) > 50  # not blank: cells, text, colour bar
    assert "ens/acc: member 1: 0.50 1.00 0.00" in caplog.text
    # no examples, or the report switched off: nothing written
    net.begin_test_pass()
    assert net.end_test_pass(str(tmp_path / "empty"), 11) == []
    off = _net_pass("ensemble_accuracy_param { write_assignment: false }")
    assert off.end_test_pass(str(tmp_path / "off"), 12) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_assignment_report_with_class_names(tmp_path, monkeypatch):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nship\n")
    figures = []
    draw = assignment.assignment_figure
    monkeypatch.setattr(assignment, "assignment_figure",
                        lambda *a, **k: figures.append(draw(*a, **k)) or figures[-1])
    net = _net_pass(f"ensemble_accuracy_param {{ label_file: '{labels}' }}")
    csv_path, _ = net.end_test_pass(str(tmp_path / "t"), 3)
    with open(csv_path) as f:
        assert f.readline() == "member,cat,dog,ship\n"
    (fig,) = figures
    assert fig.axes[0].get_title() == "Oracle assignment at iteration 3"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["cat", "dog", "ship"]
    assert len(fig.axes) == 2  # the matrix and its colour bar


def test_heatmap_module_is_gone():
    with pytest.raises(ImportError):
        __import__("pycaffe_mpi.heatmap")


# -- through the solver and `pycaffe-mpi test`: per-member names and the report ----------------
_SOLVER_NET = """
layer { name: 'data' type: 'DummyData' top: 'x' top: 'y'
        dummy_data_param { shape { dim: 6 dim: 4 } shape { dim: 6 }
                           data_filler { type: 'gaussian' std: 1 }
                           data_filler { type: 'uniform' min: 0 max: 2.99 } } }
layer { name: 's0' type: 'InnerProduct' bottom: 'x' top: 's0'
        inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 1 } } }
layer { name: 's1' type: 'InnerProduct' bottom: 'x' top: 's1'
        inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 1 } } }
layer { name: 'mcl' type: 'MultipleChoiceLoss' bottom: 's0' bottom: 's1' bottom: 'y'
        top: 'loss' top: 'member_loss' top: 'member_assigned' }
layer { name: 'acc' type: 'EnsembleAccuracy' bottom: 's0' bottom: 's1' bottom: 'y'
        top: 'ensemble_accuracy' top: 'score_mean_accuracy' top: 'oracle_accuracy'
        top: 'oracle_accuracy_authors' top: 'member_accuracy'
        include { phase: TEST } }
"""


def test_solver_names_every_member_and_writes_the_report(tmp_path, caplog):
    from pycaffe_mpi import solvers
    from pycaffe_mpi.reports import parse_log, results

    p = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", max_iter=2, display=1,
                                  test_iter=[2], test_interval=2, random_seed=3,
                                  snapshot_prefix=str(tmp_path / "run"))
    text_format.Merge(_SOLVER_NET, p.net_param)
    solver = solvers.Solver(p)
    with caplog.at_level("INFO", logger="pycaffe_mpi"):
        solver.solve()
    solver.close()
    lines = [r.getMessage() for r in caplog.records]
    for name in ("member_loss_0", "member_loss_1", "member_assigned_0", "member_assigned_1"):
        assert any("Train net output #" in ln and f": {name} = " in ln for ln in lines), name
    for name in ("member_accuracy_0", "member_accuracy_1"):
        assert any("Test net output #" in ln and f": {name} = " in ln for ln in lines), name
    assert not any(ln.endswith(("member_accuracy", "member_loss")) for ln in lines)
    # Caffe's parse_log keys its rows by name: both members survive
    log = tmp_path / "run.log"
    log.write_text("".join(f"I1206 08:00:00.000000 1 solver.py:1] {ln}\n" for ln in lines))
    _, test_rows = parse_log.parse_log(log)
    assert {"member_accuracy_0", "member_accuracy_1"} <= set(test_rows[-1])
    last = [r for r in results.read_results(tmp_path / "run_results.jsonl")
            if r["kind"] == "test"][-1]
    assert {"member_accuracy_0", "member_accuracy_1"} <= set(last["outputs"])
    for n in (0, 2):  # test_initialization, then test_interval
        csv_path = tmp_path / f"run_iter_{n}_acc_assignment.csv"
        assert csv_path.read_text().startswith("member,0,1,2\n")
        assert (tmp_path / f"run_iter_{n}_acc_assignment.png").stat().st_size > 1000


def test_cli_test_names_members_and_writes_the_report(tmp_path, capfd):
    from pycaffe_mpi import cli

    model = tmp_path / "net.prototxt"
    model.write_text(_SOLVER_NET.replace("include { phase: TEST }", ""))
    weights = tmp_path / "snap_iter_7.caffemodel"
    net = Net(str(model), pycaffe_mpi.TEST)
    net.save(str(weights))
    net.close()
    assert cli.main(["test", "--model", str(model), "--weights", str(weights),
                     "--iterations", "2"]) == 0
    text = capfd.readouterr().err  # the command's own log handler writes to stderr
    assert "member_accuracy_1 = " in text and "member_assigned_0 = " in text
    csv_path = tmp_path / "snap_iter_7_acc_assignment.csv"
    assert csv_path.is_file() and (tmp_path / "snap_iter_7_acc_assignment.png").is_file()
    assert f"Wrote {csv_path}" in text


def test_reports_need_a_place_to_go(tmp_path, monkeypatch, capfd):
    # caffe test writes nothing: without --weights the assignment is logged, never written to
    # the working directory; nor does a solver without snapshot_prefix write one there
    from pycaffe_mpi import cli, solvers

    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    model = tmp_path / "net.prototxt"
    model.write_text(_SOLVER_NET.replace("include { phase: TEST }", ""))
    assert cli.main(["test", "--model", str(model), "--iterations", "2"]) == 0
    text = capfd.readouterr().err
    assert "acc: oracle assignment over 12 examples" in text and "Wrote" not in text
    p = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", max_iter=2, test_iter=[1],
                                  test_interval=2, random_seed=3, snapshot_after_train=False)
    text_format.Merge(_SOLVER_NET, p.net_param)
    solver = solvers.Solver(p)
    solver.solve()
    solver.close()
    assert "acc: oracle assignment over 6 examples" in capfd.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["cwd", "net.prototxt"]
    assert os.listdir(run_dir) == []
