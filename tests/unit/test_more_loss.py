"""ContrastiveLoss, HingeLoss, InfogainLoss, SigmoidCrossEntropyLoss: hand-computed values,
Caffe's own checks, the backward refusals and the errors users see."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import errors, registry, snapshot
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer


def _layer(type_: str, proto: str, bottoms: list, ntop: int = 1, dtype=np.float64):
    case = LayerCase(type=type_, id="unit", proto=proto, ntop=ntop)
    return build_layer(case, [np.asarray(b, np.float64) for b in bottoms], dtype)


def _loss_and_grad(type_: str, proto: str, bottoms: list, weight: float = 1.0,
                   pdown: list | None = None):
    layer, bb, tb = _layer(type_, proto, bottoms)
    layer.forward(bb, tb)
    tb[0].diff[...] = weight
    layer.backward(tb, pdown or [True] + [False] * (len(bb) - 1), bb)
    return float(tb[0].data), [np.array(b.diff) for b in bb]


@pytest.fixture
def h_file(tmp_path):
    def write(h, legacy=False):
        path = str(tmp_path / "H.binaryproto")
        snapshot.write_binaryproto(path, np.asarray(h, np.float32), legacy=legacy)
        return path
    return write


# -- ContrastiveLoss ---------------------------------------------------------------------------


def test_contrastive_hand_example():
    # pair 0 similar at distance² 4; pair 1 dissimilar at distance 0.5 (inside the margin 1);
    # pair 2 dissimilar at distance 3 (outside: no loss, no gradient)
    a = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.5], [3.0, 0.0]])
    y = np.array([1.0, 0.0, 0.0])
    loss, (da, db, _) = _loss_and_grad("ContrastiveLoss", "", [a, b, y], weight=2.0,
                                        pdown=[True, True, False])
    assert loss == pytest.approx((4 + 0.5 ** 2) / (2 * 3))
    alpha = 2.0 / 3
    np.testing.assert_allclose(da[0], alpha * (a[0] - b[0]))
    np.testing.assert_allclose(da[1], -alpha * 0.5 / (0.5 + 1e-4) * (a[1] - b[1]))
    np.testing.assert_allclose(da[2], 0)
    np.testing.assert_allclose(db, -da)


def test_contrastive_legacy_and_truncated_similarity():
    a, b = np.zeros((2, 1)), np.array([[0.5], [0.5]])
    # 0.9 truncates to 0 (dissimilar), as Caffe's static_cast<int>
    y = np.array([0.9, -0.0])
    loss = _loss_and_grad("ContrastiveLoss", "contrastive_loss_param { legacy_version: true }",
                          [a, b, y])[0]
    assert loss == pytest.approx(2 * (1 - 0.25) / 4)


def test_contrastive_ignores_propagate_down_for_similarity():
    layer, bb, tb = _layer("ContrastiveLoss", "", [np.ones((2, 3)), np.zeros((2, 3)),
                                                   np.ones(2)])
    assert [layer.allow_force_backward(i) for i in range(3)] == [True, True, False]
    layer.forward(bb, tb)
    tb[0].diff[...] = 1
    bb[2].diff[...] = np.nan
    layer.backward(tb, [True, True, True], bb)
    assert np.isnan(bb[2].diff).all()


@pytest.mark.parametrize("shapes, field", [
    (((2, 3, 2, 1), (2, 3, 2, 1), (2, 1, 1, 1)), "bottom[0]"),
    (((2, 3), (2, 4), (2,)), "bottom"),
    (((2, 3), (2, 3), (2, 2)), "bottom[2]"),
    (((2, 3), (2, 3), (3,)), "bottom[2]"),
])
def test_contrastive_shape_errors(shapes, field):
    with pytest.raises(errors.NetError, match=re.escape(f"field {field}:")):
        _layer("ContrastiveLoss", "", [np.zeros(s) for s in shapes])


# -- HingeLoss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_hand_example(norm):
    x = np.array([[0.5, -2.0, 0.2], [3.0, 0.0, -0.5]])
    lab = np.array([0.0, 2.0])
    # margins max(0, 1 ± x): row 0 (label 0): 0.5, 0, 1.2; row 1 (label 2): 4, 1, 1.5
    m = np.array([[0.5, 0.0, 1.2], [4.0, 1.0, 1.5]])
    t = np.array([[-1, 1, 1], [1, 1, -1]])
    loss, (dx, _) = _loss_and_grad("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}",
                                   [x, lab], weight=3.0)
    if norm == "L1":
        assert loss == pytest.approx(m.sum() / 2)
        np.testing.assert_allclose(dx, t * (m > 0) * 3.0 / 2)
    else:
        assert loss == pytest.approx((m ** 2).sum() / 2)
        np.testing.assert_allclose(dx, 2 * t * m * 3.0 / 2)


def test_hinge_refuses_label_backward_and_bad_labels():
    layer, bb, tb = _layer("HingeLoss", "", [np.zeros((2, 3)), np.array([0.0, 1.0])])
    layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match="label"):
        layer.backward(tb, [True, True], bb)
    bb[1].data[...] = [0, 3]
    with pytest.raises(errors.NetError, match=r"label 3 is outside \[0, 3\)"):
        layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match=r"field bottom\[1\]"):
        _layer("HingeLoss", "", [np.zeros((2, 3)), np.zeros((2, 2))])


# -- InfogainLoss ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_param", [
    "", "loss_param { ignore_label: 1 }", "loss_param { ignore_label: 1 normalization: FULL }",
    "loss_param { ignore_label: 0 normalization: BATCH_SIZE }",
    "loss_param { normalization: NONE }",
])
def test_infogain_identity_equals_softmax_loss(loss_param):
    """With H = I the infogain loss is SoftmaxWithLoss (same normalization and ignore_label)."""
    rng = np.random.default_rng(5)
    x = 3 * rng.standard_normal((3, 4, 2, 2))
    lab = rng.integers(0, 4, (3, 1, 2, 2)).astype(float)
    want = _loss_and_grad("SoftmaxWithLoss", loss_param, [x, lab], weight=1.7)
    got = _loss_and_grad("InfogainLoss", loss_param, [x, lab, np.eye(4)], weight=1.7)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(got[1][0], want[1][0], rtol=1e-10, atol=1e-14)


def test_infogain_file_equals_bottom(h_file):
    rng = np.random.default_rng(6)
    h = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    x, lab = rng.standard_normal((4, 3)), rng.integers(0, 3, 4).astype(float)
    path = h_file(h.reshape(1, 1, 3, 3), legacy=True)
    from_file = _loss_and_grad("InfogainLoss", f'infogain_loss_param {{ source: "{path}" }}',
                               [x, lab])
    from_bottom = _loss_and_grad("InfogainLoss", "", [x, lab, h])
    assert from_file[0] == pytest.approx(from_bottom[0], rel=1e-12)
    np.testing.assert_allclose(from_file[1][0], from_bottom[1][0], rtol=1e-12)


def test_infogain_hand_example():
    # two classes, equal scores → p = (1/2, 1/2); H row 1 = (0.5, 2)
    h = np.array([[1.0, 0.0], [0.5, 2.0]])
    loss, (dx, _, _) = _loss_and_grad("InfogainLoss", "", [np.zeros((1, 2)), [1.0], h])
    assert loss == pytest.approx(2.5 * math.log(2))
    np.testing.assert_allclose(dx, [[0.5 * 2.5 - 0.5, 0.5 * 2.5 - 2.0]])


def test_infogain_refuses_backward_to_labels_and_h():
    layer, bb, tb = _layer("InfogainLoss", "", [np.zeros((2, 3)), [0.0, 2.0], np.eye(3)])
    assert [layer.allow_force_backward(i) for i in range(3)] == [True, False, False]
    layer.forward(bb, tb)
    tb[0].diff[...] = 1
    with pytest.raises(errors.NetError, match="infogain matrix"):
        layer.backward(tb, [True, False, True], bb)
    with pytest.raises(errors.NetError, match="label"):
        layer.backward(tb, [True, True, False], bb)


def test_infogain_prob_top_and_float32(h_file):
    path = h_file(np.eye(3))
    x = np.random.default_rng(2).standard_normal((2, 3, 2))
    layer, bb, tb = _layer("InfogainLoss", f'infogain_loss_param {{ source: "{path}" }}',
                           [x, np.zeros((2, 2))], ntop=2, dtype=np.float32)
    layer.forward(bb, tb)
    assert tb[0].data.dtype == tb[1].data.dtype == np.float32
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(tb[1].data, e / e.sum(axis=1, keepdims=True), rtol=1e-6)
    tb[0].diff[...] = 1
    layer.backward(tb, [True, False], bb)
    assert bb[0].diff.dtype == np.float32


def test_infogain_errors(h_file, tmp_path):
    x, lab = np.zeros((2, 3)), np.zeros(2)
    with pytest.raises(errors.NetError, match=r"infogain_loss_param\.source"):
        _layer("InfogainLoss", "", [x, lab])
    missing = tmp_path / "nope.binaryproto"
    with pytest.raises(errors.NetError, match="does not exist"):
        _layer("InfogainLoss", f'infogain_loss_param {{ source: "{missing}" }}', [x, lab])
    path = h_file(np.eye(2))
    with pytest.raises(errors.NetError, match="H must be 3x3"):
        _layer("InfogainLoss", f'infogain_loss_param {{ source: "{path}" }}', [x, lab])
    with pytest.raises(errors.NetError, match=r"field bottom\[2\].*H must be 3x3"):
        _layer("InfogainLoss", "", [x, lab, np.eye(4)])
    with pytest.raises(errors.NetError, match="normalize is deprecated"):
        _layer("InfogainLoss", "loss_param { normalize: true }", [x, lab, np.eye(3)])
    with pytest.raises(errors.NetError, match=r"field bottom\[1\]"):
        _layer("InfogainLoss", "", [x, np.zeros((2, 2)), np.eye(3)])


def test_infogain_in_a_net_from_file(h_file):
    """A net with H from a file: loss weight 1 by default, and force_backward leaves the
    labels alone."""
    path = h_file(np.eye(3) * 2)
    p = text_format.Merge(f"""
        force_backward: true
        layer {{ name: 'in' type: 'Input' top: 'x' top: 'y'
                input_param {{ shape {{ dim: 2 dim: 3 }} shape {{ dim: 2 }} }} }}
        layer {{ name: 'loss' type: 'InfogainLoss' bottom: 'x' bottom: 'y' top: 'loss'
                infogain_loss_param {{ source: '{path}' }} }}
    """, caffe_pb2.NetParameter())
    net = Net(p, pycaffe_mpi.TRAIN, dtype=np.float64)
    out = net.forward(x=np.zeros((2, 3)), y=np.array([0.0, 2.0]))
    assert float(out["loss"]) == pytest.approx(2 * math.log(3))
    diffs = net.backward()
    # (p · Σ_k H[y, k] − H[y]) / 2 valid positions, p = 1/3 everywhere
    np.testing.assert_allclose(diffs["x"], [[-2 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, -2 / 3]])


# -- SigmoidCrossEntropyLoss -------------------------------------------------------------------


def _bce(x, t):
    s = 1 / (1 + np.exp(-x))
    return -(t * np.log(s) + (1 - t) * np.log(1 - s))


@pytest.mark.parametrize("loss_param, normalizer", [
    ("", 2),  # Caffe's layer falls back to BATCH_SIZE, not the proto's VALID default
    ("loss_param { normalization: VALID }", 4),
    ("loss_param { normalization: FULL }", 6),
    ("loss_param { normalization: BATCH_SIZE }", 2),
    ("loss_param { normalization: NONE }", 1),
    ("loss_param { normalize: true }", 4),
    ("loss_param { normalize: false }", 2),
])
def test_sigmoid_ce_normalization(loss_param, normalizer):
    x = np.array([[0.5, -1.0, 2.0], [0.0, 1.5, -0.3]])
    t = np.array([[1.0, 0.0, -1.0], [0.25, -1.0, 1.0]])  # two ignored (-1)
    proto = loss_param.replace("loss_param {", "loss_param { ignore_label: -1") or \
        "loss_param { ignore_label: -1 }"
    valid = t != -1
    loss, (dx, _) = _loss_and_grad("SigmoidCrossEntropyLoss", proto, [x, t], weight=2.0)
    assert loss == pytest.approx(_bce(x[valid], t[valid]).sum() / normalizer)
    want = np.where(valid, 1 / (1 + np.exp(-x)) - t, 0) * 2.0 / normalizer
    np.testing.assert_allclose(dx, want, rtol=1e-12)


def test_sigmoid_ce_extreme_scores_stay_finite():
    x = np.array([[1000.0, -1000.0, 800.0, -800.0]])
    t = np.array([[1.0, 0.0, 0.0, 1.0]])
    for dtype in (np.float32, np.float64):
        layer, bb, tb = _layer("SigmoidCrossEntropyLoss", "", [x, t], dtype=dtype)
        layer.forward(bb, tb)
        assert float(tb[0].data) == pytest.approx(1600.0)
        tb[0].diff[...] = 1
        layer.backward(tb, [True, False], bb)
        np.testing.assert_allclose(bb[0].diff, [[0.0, 0.0, 1.0, -1.0]])


def test_sigmoid_ce_refuses_label_backward_and_count_mismatch():
    layer, bb, tb = _layer("SigmoidCrossEntropyLoss", "", [np.zeros((2, 3)), np.zeros((2, 3))])
    layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match="label"):
        layer.backward(tb, [True, True], bb)
    with pytest.raises(errors.NetError, match="same count"):
        _layer("SigmoidCrossEntropyLoss", "", [np.zeros((2, 3)), np.zeros((2, 2))])


@pytest.mark.parametrize("type_", ["ContrastiveLoss", "HingeLoss", "InfogainLoss",
                                   "SigmoidCrossEntropyLoss"])
def test_is_loss(type_):
    assert registry.layer_class(type_).is_loss
