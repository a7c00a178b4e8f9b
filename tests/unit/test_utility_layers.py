"""Checks of the neuron and utility layers beyond the generic layer suite: Caffe's parameter
CHECKs as our errors, layers without a backward, in-place rules, blob shapes, and Filter /
Embed / Parameter inside a Net."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer, to_blob


def _layer(type_: str, proto: str, *bottoms: np.ndarray, ntop: int = 1, dtype=np.float64):
    case = LayerCase(type=type_, id="unit", proto=proto, ntop=ntop)
    return build_layer(case, [np.asarray(b, np.float64) for b in bottoms], dtype)


# -- layers without a backward -----------------------------------------------------------------
@pytest.mark.parametrize(("type_", "proto"), [("Threshold", "threshold_param { threshold: 0.1 }"),
                                              ("ArgMax", "argmax_param { top_k: 2 }")])
def test_backward_refused_as_caffe_not_implemented(type_, proto):
    layer, bb, tb = _layer(type_, proto, np.random.default_rng(0).standard_normal((3, 4)))
    layer.forward(bb, tb)
    layer.backward(tb, [False], bb)  # nothing asked, nothing raised
    with pytest.raises(NotImplementedError, match=rf'layer "{type_.lower()}_under_test"'):
        layer.backward(tb, [True], bb)


def test_threshold_runs_in_place():
    x = np.array([[-1.0, 0.1, 0.2, 3.0]])
    layer, bb, _ = _layer("Threshold", "threshold_param { threshold: 0.1 }", x)
    layer.reshape(bb, bb)
    layer.forward(bb, bb)
    np.testing.assert_array_equal(bb[0].data, [[0, 0, 1, 1]])


def test_absval_refuses_in_place():
    layer, bb, _ = _layer("AbsVal", "", np.ones((2, 3)))
    with pytest.raises(errors.NetError, match="in-place"):
        layer.setup(bb, bb)


# -- parameter checks --------------------------------------------------------------------------
@pytest.mark.parametrize(("type_", "proto", "field"), [
    ("Exp", "exp_param { base: 0 }", "exp_param.base"),
    ("Exp", "exp_param { base: -2 }", "exp_param.base"),
    ("Log", "log_param { base: -0.5 }", "log_param.base"),
    ("Log", "log_param { base: 1 }", "log_param.base"),
    ("Clip", "clip_param { min: -1 }", "clip_param.max"),
    ("Tile", "tile_param { axis: 1 }", "tile_param.tiles"),
    ("Tile", "tile_param { tiles: 0 }", "tile_param.tiles"),
    ("Tile", "tile_param { axis: 2 tiles: 2 }", "tile_param.axis"),
    ("ArgMax", "argmax_param { top_k: 0 }", "argmax_param.top_k"),
    ("ArgMax", "argmax_param { top_k: 7 }", "argmax_param.top_k"),
    ("ArgMax", "argmax_param { axis: 1 top_k: 4 }", "argmax_param.top_k"),
    ("Reduction", "reduction_param { axis: 3 }", "reduction_param.axis"),
    ("Embed", "embed_param { input_dim: 3 }", "embed_param.num_output"),
    ("Embed", "embed_param { num_output: 3 }", "embed_param.input_dim"),
])
def test_parameter_checks_name_the_field(type_, proto, field):
    with pytest.raises(errors.NetError, match=f"field {field}"):
        _layer(type_, proto, np.ones((2, 3)))


def test_exp_and_log_accept_base_e_and_positive_bases():
    x = np.array([[0.5, 1.0, 2.0]])
    layer, bb, tb = _layer("Exp", "exp_param { base: 2 scale: 3 shift: 1 }", x)
    layer.forward(bb, tb)
    np.testing.assert_allclose(tb[0].data, 2.0 ** (1 + 3 * x))
    layer, bb, tb = _layer("Log", "log_param { base: 2 scale: 3 shift: 1 }", x)
    layer.forward(bb, tb)
    np.testing.assert_allclose(tb[0].data, np.log2(1 + 3 * x))


# -- PReLU -------------------------------------------------------------------------------------
def test_prelu_blob_shapes_default_filler_and_checks():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    layer, _, _ = _layer("PReLU", "", x)
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, 0.25)
    shared, _, _ = _layer("PReLU", "prelu_param { channel_shared: true }", x)
    assert shared.blobs[0].shape == ()  # Caffe's 0-axis blob: one slope
    with pytest.raises(errors.NetError, match="number of axes"):
        _layer("PReLU", "", np.ones(5))


def test_prelu_loaded_slopes_must_match_channels():
    case = LayerCase(type="PReLU", id="unit")
    from pycaffe_mpi import registry
    from pycaffe_mpi.testing.layer_cases import layer_param

    layer = registry.layer_class("PReLU")(layer_param(case, 1, 1), dtype=np.float64)
    layer.blobs.append(Blob((4,), np.float64))
    bottom = [to_blob(np.ones((2, 3, 2)))]
    with pytest.raises(errors.NetError, match="inconsistent"):
        layer.setup(bottom, [Blob((), np.float64)])


# -- index bottoms -----------------------------------------------------------------------------
def test_batch_reindex_checks_indices_and_refuses_their_gradient():
    x = np.arange(6.0).reshape(3, 2)
    layer, bb, tb = _layer("BatchReindex", "", x, np.array([2.0, 0.0, 2.0]))
    layer.forward(bb, tb)
    np.testing.assert_array_equal(tb[0].data, [[4, 5], [0, 1], [4, 5]])
    tb[0].diff[...] = 1
    layer.backward(tb, [True, False], bb)
    np.testing.assert_array_equal(bb[0].diff, [[1, 1], [0, 0], [2, 2]])
    with pytest.raises(errors.NetError, match="index"):
        layer.backward(tb, [True, True], bb)
    bb[1].data[...] = [0, 3, 1]
    with pytest.raises(errors.NetError, match="out of range"):
        layer.forward(bb, tb)
    with pytest.raises(errors.NetError, match="1-D"):
        _layer("BatchReindex", "", x, np.zeros((2, 1)))


def test_embed_checks_indices_and_refuses_input_gradient():
    proto = "embed_param { num_output: 2 input_dim: 3 }"
    layer, bb, tb = _layer("Embed", proto, np.array([0.0, 2.0, 2.0]))
    assert [b.shape for b in layer.blobs] == [(3, 2), (2,)]
    layer.blobs[0].data[...] = np.arange(6.0).reshape(3, 2)
    layer.forward(bb, tb)
    np.testing.assert_array_equal(tb[0].data, [[0, 1], [4, 5], [4, 5]])
    tb[0].diff[...] = 1
    layer.backward(tb, [False], bb)
    np.testing.assert_array_equal(layer.blobs[0].diff, [[1, 1], [0, 0], [2, 2]])
    np.testing.assert_array_equal(layer.blobs[1].diff, [3, 3])
    with pytest.raises(errors.NetError, match="cannot backpropagate"):
        layer.backward(tb, [True], bb)
    for bad, msg in ((3.0, "out of range"), (-1.0, "out of range"), (1.5, "integers")):
        bb[0].data[1] = bad
        with pytest.raises(errors.NetError, match=msg):
            layer.forward(bb, tb)


def test_filter_checks_and_refuses_selector_gradient():
    x = np.arange(8.0).reshape(4, 2)
    with pytest.raises(errors.NetError, match="singletons"):
        _layer("Filter", "", x, np.ones((4, 2)))
    with pytest.raises(errors.NetError, match="0th dimension"):
        _layer("Filter", "", x, np.ones(3))
    with pytest.raises(errors.NetError, match="one top per filtered bottom"):
        _layer("Filter", "", x, x, np.ones(4))
    layer, bb, tb = _layer("Filter", "", x, np.array([0.0, 1.0, 0.0, 1.0]))
    assert tb[0].shape == (4, 2)  # Caffe's first reshape: the whole batch
    layer.forward(bb, tb)
    np.testing.assert_array_equal(tb[0].data, [[2, 3], [6, 7]])
    tb[0].diff[...] = 1
    bb[0].diff[...] = np.nan
    layer.backward(tb, [True, False], bb)
    np.testing.assert_array_equal(bb[0].diff, [[0, 0], [1, 1], [0, 0], [1, 1]])
    with pytest.raises(errors.NetError, match="selector"):
        layer.backward(tb, [True, True], bb)


# -- small layers ------------------------------------------------------------------------------
def test_silence_writes_zero_diffs_only_where_asked():
    layer, bb, tb = _layer("Silence", "", np.ones((2, 2)), np.ones(3), ntop=0)
    for b in bb:
        b.diff[...] = 5
    layer.forward(bb, tb)
    layer.backward(tb, [True, False], bb)
    np.testing.assert_array_equal(bb[0].diff, 0)
    np.testing.assert_array_equal(bb[1].diff, 5)


def test_parameter_top_is_the_blob_and_diffs_accumulate():
    layer, _, tb = _layer("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }")
    assert layer.blobs[0].shape == (2, 3) and tb[0].shape == (2, 3)
    np.testing.assert_array_equal(layer.blobs[0].data, 0)  # Caffe leaves it at zero
    layer.blobs[0].data[...] = np.arange(6.0).reshape(2, 3)
    layer.forward([], tb)
    np.testing.assert_array_equal(tb[0].data, np.arange(6.0).reshape(2, 3))
    tb[0].diff[...] = 1
    layer.backward(tb, [], [])
    layer.backward(tb, [], [])
    np.testing.assert_array_equal(layer.blobs[0].diff, 2)


def test_reduction_over_everything_gives_a_scalar_top():
    x = np.arange(6.0).reshape(2, 3)
    layer, bb, tb = _layer("Reduction", "reduction_param { operation: MEAN coeff: 2 }", x)
    layer.forward(bb, tb)
    assert tb[0].shape == ()
    assert float(tb[0].data) == pytest.approx(2 * 15 / 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_tops_hold_caffe_layout(dtype):
    x = np.array([[1.0, 5.0, 3.0, 5.0], [0.0, -1.0, 2.0, 1.0]])
    layer, bb, tb = _layer("ArgMax", "argmax_param { top_k: 2 out_max_val: true }", x,
                           dtype=dtype)
    layer.forward(bb, tb)
    assert tb[0].shape == (2, 2, 2) and tb[0].data.dtype == dtype
    # ties: the larger index first, as Caffe's sort of (value, index) pairs
    np.testing.assert_array_equal(tb[0].data, [[[3, 1], [5, 5]], [[2, 3], [2, 1]]])


# -- inside a Net ------------------------------------------------------------------------------
NET = """
layer { name: 'in' type: 'Input' top: 'x' top: 'sel' top: 'tok'
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } shape { dim: 4 } } }
layer { name: 'filter' type: 'Filter' bottom: 'x' bottom: 'sel' top: 'xs' }
layer { name: 'prelu' type: 'PReLU' bottom: 'xs' top: 'xs' }
layer { name: 'embed' type: 'Embed' bottom: 'tok' top: 'e'
        embed_param { num_output: 3 input_dim: 5 weight_filler { type: 'gaussian' } } }
layer { name: 'p' type: 'Parameter' top: 'w' parameter_param { shape { dim: 3 } } }
layer { name: 'tile' type: 'Tile' bottom: 'w' top: 'wt' tile_param { axis: 0 tiles: 2 } }
layer { name: 'sum' type: 'Reduction' bottom: 'xs' top: 's' reduction_param { axis: 1 } }
layer { name: 'silence' type: 'Silence' bottom: 'e' bottom: 'wt' }
layer { name: 'loss' type: 'Reduction' bottom: 's' top: 'loss' loss_weight: 1
        reduction_param { operation: SUMSQ } }
"""


def test_utility_layers_in_a_net_forward_and_backward():
    net = Net(text_format.Merge(NET, caffe_pb2.NetParameter()), pycaffe_mpi.TRAIN,
              dtype=np.float64, seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    sel = np.array([1.0, 0.0, 1.0, 1.0])
    out = net.forward(x=x, sel=sel, tok=np.array([0.0, 4.0, 2.0, 2.0]))
    xs = x[sel != 0]
    h = np.maximum(xs, 0) + 0.25 * np.minimum(xs, 0)
    assert float(out["loss"]) == pytest.approx(((h.sum(axis=1)) ** 2).sum())
    assert net.blobs["xs"].shape == (3, 3) and net.blobs["wt"].shape == (6,)
    net.clear_param_diffs()
    net.backward()
    g = 2 * h.sum(axis=1, keepdims=True) * np.ones_like(h)
    want = (g * xs * (xs <= 0)).sum(axis=0)
    np.testing.assert_allclose(net.params["prelu"][0].diff, want, rtol=1e-10)
