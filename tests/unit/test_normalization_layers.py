"""BatchNorm, MVN, Bias and Scale beyond the generic layer cases: BatchNorm's running statistics
and their use, its lr_mult handling inside a Net, in-place chains, parameter blob order and
Caffe's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import errors
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing import gradient_check
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer

EPS = float(np.float32(1e-5))  # the default eps, as the float proto field holds it


def _layer(type_: str, proto: str, bottoms, phase: int = TRAIN, dtype=np.float64):
    case = LayerCase(type=type_, id="unit", proto=proto, phase=phase)
    return build_layer(case, [np.asarray(b, np.float64) for b in bottoms], dtype)


def _net(text: str, phase: int = TRAIN, **kw) -> Net:
    return Net(text_format.Merge(text, caffe_pb2.NetParameter()), phase, dtype=np.float64,
               seed=5, **kw)


# -- BatchNorm: statistics ---------------------------------------------------------------------
def test_batchnorm_running_sums_follow_caffe():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 3, 2, 2)) + 4 for _ in range(2)]
    layer, bb, tb = _layer("BatchNorm", "batch_norm_param { moving_average_fraction: 0.5 }",
                           [xs[0]])
    mean_sum, var_sum, s = np.zeros(3), np.zeros(3), 0.0
    for x in xs:
        bb[0].data[...] = x
        layer.forward(bb, tb)
        m = x.size // 3  # values per channel
        mu = x.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1)
        var = x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1)
        s = 0.5 * s + 1
        mean_sum = 0.5 * mean_sum + mu
        var_sum = 0.5 * var_sum + var * m / (m - 1)
    np.testing.assert_allclose(layer.blobs[0].data, mean_sum, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, var_sum, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[2].data, [s], rtol=1e-12)


def test_batchnorm_single_value_per_channel_has_no_correction():
    layer, bb, tb = _layer("BatchNorm", "", [np.array([[1.0, 2.0]])])  # m = 1
    layer.forward(bb, tb)
    np.testing.assert_array_equal(layer.blobs[1].data, [0.0, 0.0])
    np.testing.assert_array_equal(tb[0].data, [[0.0, 0.0]])


def _set_stats(layer, mean, var, s):
    layer.blobs[0].data[...] = mean
    layer.blobs[1].data[...] = var
    layer.blobs[2].data[...] = s


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batchnorm_global_stats_use_the_scaled_sums(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 4))
    layer, bb, tb = _layer("BatchNorm", "", [x], phase=TEST, dtype=dtype)
    mean, var, s = np.array([0.5, -1.0]), np.array([2.0, 0.25]), 2.5
    _set_stats(layer, mean, var, s)
    layer.forward(bb, tb)
    want = np.empty_like(x)
    for c in range(2):
        want[:, c] = (x[:, c] - mean[c] / s) / math.sqrt(var[c] / s + EPS)
    np.testing.assert_allclose(tb[0].data, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
    # the statistics are not touched by a global-stats forward
    np.testing.assert_array_equal(layer.blobs[2].data, [s])


def test_batchnorm_global_stats_gradient_and_no_stat_gradient():
    rng = np.random.default_rng(2)
    layer, bb, tb = _layer("BatchNorm", "", [rng.standard_normal((2, 3, 2, 3))], phase=TEST)
    _set_stats(layer, [0.1, 0.2, -0.3], [1.5, 0.5, 2.0], 1.7)
    fails = gradient_check.check_gradient(layer, bb, tb, [0])
    # NOTE: Caffe gives the statistics no gradient (their lr_mult is 0), while the output does
    # depend on them here: only the bottom's gradient is expected to match.
    assert not [f for f in fails if f.startswith("bottom")], fails
    for t in tb:
        t.diff[...] = rng.standard_normal(t.shape)
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward(tb, [True], bb)
    for p in layer.blobs:
        assert not p.diff.any()
    std = np.sqrt(np.array([1.5, 0.5, 2.0]) / 1.7 + EPS).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(bb[0].diff, tb[0].diff / std, rtol=1e-12)


def test_batchnorm_zero_scale_factor_means_zero_stats():
    x = np.arange(6.0).reshape(2, 3)
    layer, bb, tb = _layer("BatchNorm", "batch_norm_param { use_global_stats: true }", [x])
    _set_stats(layer, [5.0, 5.0, 5.0], [9.0, 9.0, 9.0], 0.0)
    layer.forward(bb, tb)
    np.testing.assert_allclose(tb[0].data, x / math.sqrt(EPS), rtol=1e-12)


def test_batchnorm_channels_fixed_at_setup():
    layer, bb, tb = _layer("BatchNorm", "", [np.zeros((2, 3, 2))])
    bb[0].reshape(2, 4, 2)
    with pytest.raises(errors.NetError, match="channels"):
        layer.reshape(bb, tb)


# -- BatchNorm inside a Net: lr_mult, weights, in place --------------------------------------------
BN_NET = """
force_backward: true
layer { name: 'data' type: 'Input' top: 'data'
        input_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 } } }
layer { name: 'bn' type: 'BatchNorm' bottom: 'data' top: 'bn' %s }
"""


def test_batchnorm_statistics_get_lr_mult_zero():
    net = _net(BN_NET % "")
    assert net.params_lr == [0.0, 0.0, 0.0]
    assert [p.lr_mult for p in net.layer_dict["bn"].layer_param.param] == [0.0, 0.0, 0.0]
    assert [tuple(b.shape) for b in net.params["bn"]] == [(3,), (3,), (1,)]
    # Caffe's older prototxts spell the zeros out; some give fewer than three
    old = _net(BN_NET % "param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 }")
    assert old.params_lr == [0.0, 0.0, 0.0]


def test_batchnorm_refuses_learned_statistics():
    with pytest.raises(errors.NetError, match=r"param\[1\]\.lr_mult"):
        _net(BN_NET % "param { lr_mult: 0 } param { lr_mult: 1 }")


def test_batchnorm_stats_saved_and_used_by_a_test_net():
    rng = np.random.default_rng(3)
    train = _net(BN_NET % "")
    x = rng.standard_normal((4, 3, 2, 2))
    train.forward(data=x)
    saved = train.to_proto()
    test = _net(BN_NET % "", TEST)
    test.copy_trained_layers_from(saved)
    y = test.forward(data=x)["bn"]
    mean_sum, var_sum, s = (b.data for b in train.params["bn"])
    want = (x - (mean_sum / s).reshape(1, 3, 1, 1)) / np.sqrt(var_sum / s + EPS).reshape(
        1, 3, 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-12)
    # unbiased: 16 values per channel
    np.testing.assert_allclose(var_sum, x.transpose(1, 0, 2, 3).reshape(3, -1).var(
        axis=1, ddof=1), rtol=1e-12)


CHAIN = """
force_backward: true
layer { name: 'data' type: 'Input' top: 'data'
        input_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 } } }
layer { name: 'bn' type: 'BatchNorm' bottom: 'data' top: '%s' }
layer { name: 'sc' type: 'Scale' bottom: '%s' top: '%s'
        scale_param { bias_term: true filler { type: 'gaussian' }
                      bias_filler { type: 'gaussian' } } }
layer { name: 'mvn' type: 'MVN' bottom: '%s' top: '%s' }
layer { name: 'relu' type: 'ReLU' bottom: '%s' top: '%s' }
"""


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_in_place_chain_matches_separate_blobs(phase):
    """BatchNorm → Scale → MVN → ReLU all in place give the gradients of the same chain with a
    blob per layer: each layer keeps what its backward needs from later in-place writes."""
    rng = np.random.default_rng(4)
    sep = _net(CHAIN % ("a", "a", "b", "b", "c", "c", "d"), phase)
    inp = _net(CHAIN % ("x", "x", "x", "x", "x", "x", "x"), phase)
    x = rng.standard_normal((4, 3, 2, 2))
    dy = rng.standard_normal((4, 3, 2, 2))
    for net, out in ((sep, "d"), (inp, "x")):
        if phase == TEST:
            net.params["bn"][0].data[...] = [0.1, -0.2, 0.3]
            net.params["bn"][1].data[...] = [1.0, 2.0, 0.5]
            net.params["bn"][2].data[...] = 1.0
        net.forward(data=x)
        net.clear_param_diffs()
        net.backward(**{out: dy})
    np.testing.assert_allclose(inp.blobs["x"].data, sep.blobs["d"].data, rtol=1e-12)
    np.testing.assert_allclose(inp.blobs["data"].diff, sep.blobs["data"].diff, rtol=1e-10,
                               atol=1e-12)
    for a, b in zip(inp.params["sc"], sep.params["sc"]):
        np.testing.assert_allclose(a.diff, b.diff, rtol=1e-10, atol=1e-12)


# -- Scale and Bias: parameter blobs and checks --------------------------------------------------
def test_scale_blob_order_and_defaults():
    x = np.ones((2, 3, 4))
    layer, _, _ = _layer("Scale", "scale_param { bias_term: true }", [x])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(layer.blobs[0].data, 1.0)  # scale first, ones
    np.testing.assert_array_equal(layer.blobs[1].data, 0.0)  # then the bias, zeros
    layer, _, _ = _layer("Scale", "scale_param { bias_term: true axis: 1 }",
                         [x, np.ones((3, 4))])
    assert [tuple(b.shape) for b in layer.blobs] == [(3, 4)]  # the bias only
    layer, _, _ = _layer("Bias", "", [x])
    assert [tuple(b.shape) for b in layer.blobs] == [(3,)]
    layer, _, _ = _layer("Bias", "bias_param { num_axes: -1 filler { value: 2 } }", [x])
    np.testing.assert_array_equal(layer.blobs[0].data, np.full((3, 4), 2.0))
    layer, _, _ = _layer("Bias", "", [x, np.ones((3,))])
    assert len(layer.blobs) == 0


def test_scale_net_params_and_lr_mult():
    net = _net("""
      layer { name: 'data' type: 'Input' top: 'data'
              input_param { shape { dim: 2 dim: 3 } } }
      layer { name: 'sc' type: 'Scale' bottom: 'data' top: 'data'
              param { lr_mult: 1 } param { lr_mult: 2 } scale_param { bias_term: true } }
    """)
    assert net.params_lr == [1.0, 2.0]
    y = net.forward(data=np.arange(6.0).reshape(2, 3))["data"]
    np.testing.assert_array_equal(y, np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize(("type_", "proto", "shapes", "match"), [
    ("Bias", "bias_param { num_axes: -2 }", [(2, 3)], "num_axes"),
    ("Bias", "bias_param { axis: 1 num_axes: 2 }", [(2, 3)], "extends past"),
    ("Bias", "bias_param { axis: 2 }", [(2, 3)], "out of range"),
    ("Bias", "", [(2, 3, 4), (4,)], "dimension mismatch"),
    ("Scale", "scale_param { num_axes: -3 }", [(2, 3)], "num_axes"),
    ("Scale", "scale_param { axis: 1 num_axes: 3 }", [(2, 3)], "extends past"),
    ("Scale", "", [(2, 3, 4), (3, 5)], "dimension mismatch"),
    ("Scale", "", [(2, 3), (3, 1)], "extends past"),
])
def test_affine_layers_check_shapes(type_, proto, shapes, match):
    with pytest.raises(errors.NetError, match=match):
        _layer(type_, proto, [np.zeros(s) for s in shapes])


def test_scale_in_net_with_wrong_operand_names_the_layer():
    bad = """
      layer { name: 'data' type: 'Input' top: 'a' top: 'b'
              input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } } }
      layer { name: 'sc' type: 'Scale' bottom: 'a' bottom: 'b' top: 'c' }
    """
    with pytest.raises(errors.NetError, match=r'layer "sc" \(type Scale\)'):
        _net(bad)


# -- MVN ---------------------------------------------------------------------------------------
def test_mvn_adds_eps_to_the_std():
    x = np.array([[[[1.0, 3.0]]]])  # one row: mean 2, std 1
    layer, bb, tb = _layer("MVN", "mvn_param { eps: 1 }", [x])
    layer.forward(bb, tb)
    np.testing.assert_allclose(tb[0].data, [[[[-0.5, 0.5]]]], rtol=1e-12)


def test_mvn_reads_its_bottom_as_nchw():
    x = np.arange(8.0).reshape(2, 4)
    layer, bb, tb = _layer("MVN", "", [x])
    assert tb[0].shape == (2, 4, 1, 1)  # Caffe's MVN gives a 4-axis top
    layer.forward(bb, tb)
    np.testing.assert_array_equal(tb[0].data, 0.0)  # each (n, c) row holds one value
    with pytest.raises(errors.NetError, match="at most 4 axes"):
        _layer("MVN", "", [np.zeros((1, 1, 1, 1, 2))])


def test_layer_types_registered():
    types = pycaffe_mpi.layer_type_list() if hasattr(pycaffe_mpi, "layer_type_list") else None
    if types is None:
        from pycaffe_mpi import registry

        types = registry.layer_type_list()
    assert {"BatchNorm", "MVN", "Bias", "Scale"} <= set(types)


# -- BatchNorm under a solver ---------------------------------------------------------------------
def test_solver_leaves_batchnorm_statistics_to_the_forward_passes():
    """With momentum and weight decay, the update never moves the statistics (lr_mult 0); the
    test net shares them and normalizes with them."""
    from pycaffe_mpi import solvers

    p = caffe_pb2.SolverParameter(type="SGD", base_lr=0.1, momentum=0.9, weight_decay=0.01,
                                  lr_policy="fixed", random_seed=3, display=0, max_iter=2,
                                  test_iter=[1], test_interval=100, snapshot_after_train=False)
    text_format.Parse("""
      layer { name: 'data' type: 'DummyData' top: 'data' top: 'label'
              dummy_data_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 }
                                 data_filler { type: 'gaussian' }
                                 data_filler { type: 'constant' value: 1 } } }
      layer { name: 'bn' type: 'BatchNorm' bottom: 'data' top: 'data' }
      layer { name: 'sc' type: 'Scale' bottom: 'data' top: 'data'
              scale_param { bias_term: true } }
      layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
              inner_product_param { num_output: 3 weight_filler { type: 'gaussian' } } }
      layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label' top: 'loss' }
    """, p.net_param)
    solver = solvers.Solver(p, dtype=np.float64)
    before = [np.array(b.data) for b in solver.net.params["sc"]]
    solver.step(2)
    bn = solver.net.params["bn"]
    maf = float(np.float32(0.999))
    np.testing.assert_allclose(bn[2].data, [1 + maf], rtol=1e-12)  # two forwards, no update
    assert any(not np.array_equal(a, b.data) for a, b in zip(before, solver.net.params["sc"]))
    test_bn = solver.test_nets[0].layer_dict["bn"]
    assert test_bn.use_global_stats
    np.testing.assert_array_equal(test_bn.blobs[2].data, bn[2].data)
    scores = solver.test(0)
    assert scores is None or all(np.isfinite(scores))

