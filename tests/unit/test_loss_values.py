"""Loss and accuracy values: BVLC Caffe's own checks plus hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer

FLT_MIN = 1.17549435e-38


def _layer(type_: str, proto: str, bottoms: list[np.ndarray], ntop: int = 1,
           dtype=np.float64):
    case = LayerCase(type=type_, id="unit", proto=proto, ntop=ntop)
    return build_layer(case, [np.asarray(b, np.float64) for b in bottoms], dtype)


def _forward(type_: str, proto: str, bottoms: list[np.ndarray], ntop: int = 1,
             dtype=np.float64) -> list[np.ndarray]:
    layer, bb, tb = _layer(type_, proto, bottoms, ntop, dtype)
    layer.forward(bb, tb)
    return [np.array(t.data) for t in tb]


# -- SoftmaxWithLoss ---------------------------------------------------------------------------


def test_softmax_loss_ignore_label_identity():
    """Caffe's TestForwardIgnoreLabel: Σ over ignoring each label = (C − 1) × full loss."""
    rng = np.random.default_rng(1701)
    x = 10 * rng.standard_normal((10, 5, 2, 3))
    lab = rng.integers(0, 5, size=(10, 1, 2, 3)).astype(float)
    full = _forward("SoftmaxWithLoss", "loss_param { normalize: false }", [x, lab])[0]
    accum = sum(
        _forward("SoftmaxWithLoss", f"loss_param {{ normalize: false ignore_label: {k} }}",
                 [x, lab])[0] for k in range(5))
    np.testing.assert_allclose(accum, 4 * full, rtol=1e-4)


# Hand-computed example: outer 2, C 2, inner 2 (4 positions), label 1 at (1, 1) is ignored.
# Scores at a position are (log 3, 0) → p = (3/4, 1/4), or (0, 0) → p = (1/2, 1/2).
_X = np.zeros((2, 2, 1, 2))
_X[0, 0, 0, 0] = math.log(3)  # position (0, 0): p = (3/4, 1/4), label 0 → −log 3/4
_X[1, 0, 0, 1] = math.log(3)  # position (1, 1): ignored
_LAB = np.array([[0, 1], [1, 1]], float).reshape(2, 1, 1, 2)
_LAB[1, 0, 0, 1] = 7  # the ignore value (would be out of range if it were not ignored)
_SUM = -math.log(3 / 4) - 2 * math.log(1 / 2)  # 3 valid positions


@pytest.mark.parametrize("norm, normalizer", [
    ("normalization: FULL", 4), ("normalization: VALID", 3), ("", 3),
    ("normalization: BATCH_SIZE", 2), ("normalization: NONE", 1),
    ("normalize: true", 3), ("normalize: false", 2),
    ("normalize: false normalization: FULL", 4),  # normalization wins when both are set
])
def test_softmax_loss_normalization_modes(norm, normalizer):
    proto = f"loss_param {{ ignore_label: 7 {norm} }}"
    for dtype in (np.float64, np.float32):
        layer, bb, tb = _layer("SoftmaxWithLoss", proto, [_X, _LAB], dtype=dtype)
        layer.forward(bb, tb)
        assert tb[0].shape == ()
        np.testing.assert_allclose(tb[0].data, _SUM / normalizer, rtol=1e-6)
        # backward with loss weight 3 in the top diff: (p − onehot)·3/normalizer, 0 if ignored
        tb[0].diff[...] = 3
        layer.backward(tb, [True, False], bb)
        want = np.zeros((2, 2, 1, 2))
        want[0, :, 0, 0] = [3 / 4 - 1, 1 / 4]
        want[0, :, 0, 1] = [1 / 2, 1 / 2 - 1]
        want[1, :, 0, 0] = [1 / 2, 1 / 2 - 1]
        np.testing.assert_allclose(bb[0].diff, want * 3 / normalizer, rtol=1e-6, atol=1e-7)


def test_softmax_loss_normalizer_clamped_to_one():
    lab = np.full((2, 1, 1, 2), 7.0)  # every position ignored: VALID count 0 → normalizer 1
    layer, bb, tb = _layer("SoftmaxWithLoss", "loss_param { ignore_label: 7 }", [_X, lab])
    layer.forward(bb, tb)
    assert float(tb[0].data) == 0.0
    tb[0].diff[...] = 1
    layer.backward(tb, [True, False], bb)
    assert not np.any(bb[0].diff)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_loss_clamps_at_flt_min(dtype):
    """−log(max(p, FLT_MIN)): a hopeless label costs −log FLT_MIN ≈ 87.34, never inf."""
    x = np.array([[200.0, 0.0]])
    loss = _forward("SoftmaxWithLoss", "", [x, np.array([1.0])], dtype=dtype)[0]
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, -math.log(FLT_MIN), rtol=1e-6)
    # large scores do not overflow and a confident right answer costs ~0
    loss = _forward("SoftmaxWithLoss", "", [np.array([[1e4, 0.0]]), np.array([0.0])],
                    dtype=dtype)[0]
    assert loss == 0.0


def test_softmax_loss_second_top_is_probabilities():
    tops = _forward("SoftmaxWithLoss", "", [_X, np.zeros((2, 1, 1, 2))], ntop=2)
    assert tops[1].shape == _X.shape
    np.testing.assert_allclose(tops[1][0, :, 0, 0], [3 / 4, 1 / 4])
    np.testing.assert_allclose(tops[1].sum(axis=1), 1.0)


def test_softmax_loss_errors():
    with pytest.raises(errors.NetError, match=r"loss_under_test.*label 5 is outside \[0, 2\)"):
        _forward("SoftmaxWithLoss", "", [_X, np.full((2, 1, 1, 2), 5.0)])
    with pytest.raises(errors.NetError, match="number of labels must match"):
        _forward("SoftmaxWithLoss", "", [_X, np.zeros((2, 3))])
    with pytest.raises(errors.NetError, match=r"softmax_param\.axis"):
        _forward("SoftmaxWithLoss", "softmax_param { axis: 4 }", [_X, np.zeros(2)])
    layer, bb, tb = _layer("SoftmaxWithLoss", "", [_X, np.zeros((2, 1, 1, 2))])
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match="cannot backpropagate to label inputs"):
        layer.backward(tb, [True, True], bb)


def test_softmax_loss_labels_truncate_like_static_cast():
    a = _forward("SoftmaxWithLoss", "", [_X, np.array([[0.9, 1.7], [1.2, 0.3]])])
    b = _forward("SoftmaxWithLoss", "", [_X, np.array([[0.0, 1.0], [1.0, 0.0]])])
    np.testing.assert_allclose(a, b)


# -- Accuracy ----------------------------------------------------------------------------------


def _accuracy_data(rng):
    x = rng.standard_normal((100, 10))
    lab = (rng.integers(0, 2**31, size=100) % 10).astype(float)
    return x, lab


def _top_k_correct(x, lab, k, ignore=None):
    right, n = 0, 0
    for s, y in zip(x, lab.astype(int)):
        if y == ignore:
            continue
        n += 1
        right += int(y in np.argsort(-s, kind="stable")[:k])
    return right, n


@pytest.mark.parametrize("top_k", [1, 3])
def test_accuracy_forward(top_k):
    """Caffe's TestForwardCPU / TestForwardCPUTopK: 100×10 scores, accuracy = correct/100."""
    x, lab = _accuracy_data(np.random.default_rng(1701))
    acc = _forward("Accuracy", f"accuracy_param {{ top_k: {top_k} }}", [x, lab])[0]
    right, n = _top_k_correct(x, lab, top_k)
    assert n == 100
    np.testing.assert_allclose(acc, right / 100, atol=1e-4)


def test_accuracy_ignore_label_denominator():
    """Caffe's TestForwardIgnoreLabel: 3 of 100 labels ignored → the denominator is 97."""
    x, lab = _accuracy_data(np.random.default_rng(1701))
    lab[[2, 5, 32]] = -1
    acc = _forward("Accuracy", "accuracy_param { ignore_label: -1 }", [x, lab])[0]
    right, n = _top_k_correct(x, lab, 1, ignore=-1)
    assert n == 97
    np.testing.assert_allclose(acc, right / 97, atol=1e-4)


def test_accuracy_per_class():
    """Caffe's TestForwardCPUPerClass(WithIgnore): a 10-entry second top."""
    x, lab = _accuracy_data(np.random.default_rng(1701))
    lab[[2, 5, 32]] = 10  # ignore value just past the last class
    acc, per_class = _forward("Accuracy", "accuracy_param { ignore_label: 10 }", [x, lab],
                              ntop=2)
    assert per_class.shape == (10,)
    valid = lab != 10
    want = np.zeros(10)
    for c in range(10):
        rows = valid & (lab == c)
        if rows.any():
            want[c] = np.mean(np.argmax(x[rows], axis=1) == c)
    np.testing.assert_allclose(per_class, want, atol=1e-4)
    right, n = _top_k_correct(x, lab, 1, ignore=10)
    np.testing.assert_allclose(acc, right / n, atol=1e-4)


def test_accuracy_tie_rule():
    """BVLC HEAD: correct iff fewer than top_k other classes score ≥ the true class."""
    x = np.array([[1.0, 1.0, 0.0]])
    def acc(label, top_k):
        return float(_forward("Accuracy", f"accuracy_param {{ top_k: {top_k} }}",
                              [x, np.array([label])])[0])
    assert acc(0, 1) == 0.0  # a tie counts against the example
    assert acc(1, 1) == 0.0
    assert acc(0, 2) == 1.0
    assert acc(2, 2) == 0.0
    assert acc(2, 3) == 1.0


def test_accuracy_all_ignored_is_zero_and_no_backward():
    x = np.eye(3)
    layer, bb, tb = _layer("Accuracy", "accuracy_param { ignore_label: 1 }", [x, np.ones(3)], 2)
    layer.forward(bb, tb)
    assert float(tb[0].data) == 0.0 and not tb[1].data.any()
    assert not layer.is_loss
    assert not layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    layer.backward(tb, [False, False], bb)  # nothing to do
    with pytest.raises(errors.NetError, match="has no backward"):
        layer.backward(tb, [True, False], bb)
    with pytest.raises(errors.NetError, match="top_k must be less than or equal"):
        _forward("Accuracy", "accuracy_param { top_k: 4 }", [x, np.zeros(3)])


# -- EuclideanLoss and MultinomialLogisticLoss -------------------------------------------------


def test_euclidean_loss_value_and_gradient():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[0.0, 0.0], [1.0, 1.0]])
    layer, bb, tb = _layer("EuclideanLoss", "", [a, b])
    layer.forward(bb, tb)
    np.testing.assert_allclose(tb[0].data, (1 + 4 + 4 + 9) / (2 * 2))
    tb[0].diff[...] = 2  # loss weight 2
    layer.backward(tb, [True, True], bb)
    np.testing.assert_allclose(bb[0].diff, (a - b) * 2 / 2)
    np.testing.assert_allclose(bb[1].diff, -(a - b) * 2 / 2)
    assert layer.is_loss and layer.allow_force_backward(1)
    with pytest.raises(errors.NetError, match="same count"):
        _forward("EuclideanLoss", "", [a, np.zeros((2, 3))])


def test_multinomial_logistic_loss_value_and_gradient():
    p = np.array([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]).reshape(3, 2, 1, 1)
    lab = np.array([0.0, 1.0, 1.0]).reshape(3, 1, 1, 1)
    layer, bb, tb = _layer("MultinomialLogisticLoss", "", [p, lab])
    layer.forward(bb, tb)
    # p = 0 is clamped to 1e-20
    want = -(math.log(0.5) + math.log(0.75) + math.log(1e-20)) / 3
    np.testing.assert_allclose(tb[0].data, want)
    tb[0].diff[...] = 1
    layer.backward(tb, [True, False], bb)
    g = np.zeros((3, 2))
    g[0, 0], g[1, 1], g[2, 1] = -1 / (3 * 0.5), -1 / (3 * 0.75), -1 / (3 * 1e-20)
    np.testing.assert_allclose(bb[0].diff.reshape(3, 2), g)
    with pytest.raises(errors.NetError, match="channels, height and width 1"):
        _forward("MultinomialLogisticLoss", "", [p, np.zeros((3, 2))])


def test_loss_tops_are_scalars_and_losses_are_flagged():
    for type_, bottoms in (("SoftmaxWithLoss", [_X, np.zeros(4)]),
                           ("EuclideanLoss", [np.ones((2, 3)), np.zeros((2, 3))]),
                           ("MultinomialLogisticLoss", [np.full((2, 3), 1 / 3), np.zeros(2)])):
        layer, _, tb = _layer(type_, "", bottoms)
        assert layer.is_loss, type_
        assert tb[0].shape == (), type_
        assert isinstance(tb[0], Blob)
