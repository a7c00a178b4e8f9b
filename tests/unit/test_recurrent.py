"""RNN, LSTM and LSTMUnit beyond the generic layer suite: Caffe's parameter layout, the state
carried between forwards, expose_hidden chaining, the errors users see, and use inside a Net."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import errors
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer, to_blob

H = 3
FILLERS = ('weight_filler { type: "gaussian" std: 0.5 } '
           'bias_filler { type: "gaussian" std: 0.5 }')


def make(type_: str, bottoms: list[np.ndarray], ntop: int = 1, extra: str = "",
         dtype=np.float64):
    case = LayerCase(type=type_, id="t", ntop=ntop,
                     proto=f"recurrent_param {{ num_output: {H} {FILLERS} {extra} }}")
    return build_layer(case, bottoms, dtype)


def cont_start(t: int, n: int) -> np.ndarray:
    """<0, 1, 1, ...>: every stream starts a sequence at the first step."""
    c = np.ones((t, n))
    c[0] = 0
    return c


def run(layer, bb, tb):
    layer.reshape(bb, tb)
    layer.forward(bb, tb)
    return [np.array(t.data, copy=True) for t in tb]


# -- parameter layout (BVLC's unrolled-net order and shapes) -----------------------------------
@pytest.mark.parametrize(("type_", "want"), [
    ("LSTM", [(4 * H, 6), (4 * H,), (4 * H, 4), (4 * H, H)]),
    ("RNN", [(H, 6), (H,), (H, 4), (H, H), (H, H), (H,)]),
])
def test_param_shapes_in_caffe_order(type_, want):
    rng = np.random.default_rng(0)
    x, xs = rng.standard_normal((2, 3, 2, 3)), rng.standard_normal((3, 2, 2))
    layer, _, tb = make(type_, [x, cont_start(2, 3), xs])
    assert [tuple(b.shape) for b in layer.blobs] == want
    assert tb[0].shape == (2, 3, H)


def test_default_fillers_are_zero():
    case = LayerCase(type="LSTM", id="t", proto=f"recurrent_param {{ num_output: {H} }}")
    layer, _, _ = build_layer(case, [np.ones((2, 1, 2)), cont_start(2, 1)])
    assert all(not np.any(b.data) for b in layer.blobs)


# -- state carried between forwards (Caffe's LSTMLayerTest.TestForward) ------------------------
@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_one_step_at_a_time_equals_full_sequence(type_):
    rng = np.random.default_rng(1)
    t_, n = 4, 3
    x = rng.standard_normal((t_, n, 2, 2))
    full, bb, tb = make(type_, [x, cont_start(t_, n)])
    want = run(full, bb, tb)[0]

    step, bb, tb1 = make(type_, [x[:1], np.zeros((1, n))])
    for t in range(t_):
        bb[0].data[...] = x[t:t + 1]
        bb[1].data[...] = float(t > 0)
        (got,) = run(step, bb, tb1)
        np.testing.assert_allclose(got[0], want[t], rtol=1e-12, atol=1e-12)

    # all cont 0: each step starts afresh, so only the first step agrees
    fresh, bb, tb2 = make(type_, [x[:1], np.zeros((1, n))])
    for t in range(t_):
        bb[0].data[...] = x[t:t + 1]
        (got,) = run(fresh, bb, tb2)
        if t == 0:
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        else:
            assert np.all(got[0] != want[t])


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_reset_and_new_batch_size_start_from_zero(type_):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 3))
    ones = np.ones((2, 2))
    layer, bb, tb = make(type_, [x, ones])
    first = run(layer, bb, tb)[0]
    assert not np.allclose(run(layer, bb, tb)[0], first)  # the state carried over
    layer.reset()
    np.testing.assert_allclose(run(layer, bb, tb)[0], first, rtol=1e-12)
    # a new N drops the carried state: stream 0 of a 1-stream batch equals the first forward
    small = [to_blob(x[:, :1]), to_blob(ones[:, :1])]
    np.testing.assert_allclose(run(layer, small, tb)[0], first[:, :1], rtol=1e-12)


# -- expose_hidden: h_T [, c_T] of one half feed h_0 [, c_0] of the next -----------------------
@pytest.mark.parametrize(("type_", "nrec"), [("RNN", 1), ("LSTM", 2)])
def test_expose_hidden_chains_halves(type_, nrec):
    rng = np.random.default_rng(3)
    t_, n = 4, 2
    x = rng.standard_normal((t_, n, 3))
    cont = np.ones((t_, n))
    cont[2, 1] = 0
    zeros = [np.zeros((1, n, H))] * nrec
    full, bb, tb = make(type_, [x, cont, *zeros], 1 + nrec, "expose_hidden: true")
    want = run(full, bb, tb)
    half, bb1, tb1 = make(type_, [x[:2], cont[:2], *zeros], 1 + nrec, "expose_hidden: true")
    for b, p in zip(half.blobs, full.blobs):
        b.data[...] = p.data
    first = run(half, bb1, tb1)
    bb1[0].data[...], bb1[1].data[...] = x[2:], cont[2:]
    for k in range(nrec):
        bb1[2 + k].data[...] = first[1 + k]
    second = run(half, bb1, tb1)
    np.testing.assert_allclose(np.concatenate([first[0], second[0]]), want[0], rtol=1e-12)
    for k in range(nrec):
        np.testing.assert_allclose(second[1 + k], want[1 + k], rtol=1e-12)


# -- errors --------------------------------------------------------------------------------------
def _err(type_, bottoms, ntop=1, extra="", match=""):
    with pytest.raises(errors.NetError, match=match) as ei:
        make(type_, bottoms, ntop, extra)
    assert f'layer "{type_.lower()}_under_test" (type {type_})' in str(ei.value)
    return str(ei.value)


@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_shape_errors_name_layer_and_field(type_):
    x = np.zeros((3, 2, 4))
    _err(type_, [x, np.zeros((2, 2))], match=r"field bottom\[1\]: cont must be \(T, N\)")
    _err(type_, [x, np.zeros((3, 5))], match=r"bottom\[1\].*\(3, 2\)")
    _err(type_, [x, np.zeros((3, 2, 1))], match=r"bottom\[1\]")
    _err(type_, [np.zeros((3, 2)), np.zeros((3, 2))], match=r"bottom\[0\].*feature axis")
    _err(type_, [x, np.zeros((3, 2)), np.zeros((4, 5))], match=r"bottom\[2\].*N = 2")
    _err(type_, [x, np.zeros((3, 2)), np.zeros(2)], match=r"bottom\[2\]")
    _err(type_, [x, np.zeros((3, 2))], extra="num_output: 0",
         match="recurrent_param.num_output")


def test_expose_hidden_arity_and_shapes():
    x, c = np.zeros((3, 2, 4)), np.zeros((3, 2))
    h0 = np.zeros((1, 2, H))
    _err("LSTM", [x, c, h0], 3, "expose_hidden: true", match=r"field bottom: .*h_0, c_0")
    _err("LSTM", [x, c, h0, h0], 1, "expose_hidden: true", match="field top")
    _err("RNN", [x, c, np.zeros((1, 3, H))], 2, "expose_hidden: true",
         match=r"bottom\[2\]: h_0 must be \(1, 2, 3\)")
    # with a static input the hidden bottoms come after it
    layer, _, _ = make("RNN", [x, c, np.zeros((2, 5)), h0], 2, "expose_hidden: true")
    assert layer.static_input and len(layer.blobs) == 6


def test_reshape_checks_feature_size():
    layer, bb, tb = make("RNN", [np.zeros((3, 2, 4)), np.zeros((3, 2))])
    bb[0].reshape((3, 2, 5))
    with pytest.raises(errors.NetError, match=r"bottom\[0\].*4 values"):
        layer.reshape(bb, tb)


def test_loaded_weights_of_wrong_shape_are_refused():
    case = LayerCase(type="LSTM", id="t", proto=f"recurrent_param {{ num_output: {H} }}")
    from pycaffe_mpi import registry
    from pycaffe_mpi.testing.layer_cases import layer_param

    layer = registry.layer_class("LSTM")(layer_param(case, 2, 1), dtype=np.float64)
    for shape in [(4 * H, 4), (4 * H,), (H, H)]:
        layer.blobs.append(layer.new_blob(shape))
    with pytest.raises(errors.NetError, match="expected parameter shapes"):
        layer.setup([to_blob(np.zeros((3, 2, 4))), to_blob(np.zeros((3, 2)))],
                    [to_blob(np.zeros(1))])


@pytest.mark.parametrize(("type_", "cont_index"), [("RNN", 1), ("LSTM", 1), ("LSTMUnit", 2)])
def test_no_backward_to_cont(type_, cont_index):
    if type_ == "LSTMUnit":
        case = LayerCase(type="LSTMUnit", id="t", ntop=2)
        layer, bb, tb = build_layer(
            case, [np.zeros((1, 2, H)), np.zeros((1, 2, 4 * H)), np.ones((1, 2))])
    else:
        layer, bb, tb = make(type_, [np.zeros((2, 2, 3)), np.ones((2, 2))])
    assert not layer.allow_force_backward(cont_index)
    assert layer.allow_force_backward(0)
    layer.forward(bb, tb)
    pdown = [i == cont_index for i in range(len(bb))]
    with pytest.raises(errors.NetError, match="sequence indicators"):
        layer.backward(tb, pdown, bb)


def test_lstm_unit_shape_errors():
    case = LayerCase(type="LSTMUnit", id="t", ntop=2)
    c, g, k = np.zeros((1, 2, H)), np.zeros((1, 2, 4 * H)), np.zeros((1, 2))
    with pytest.raises(errors.NetError, match=r"bottom\[1\]: gates must be"):
        build_layer(case, [c, np.zeros((1, 2, 3 * H)), k])
    with pytest.raises(errors.NetError, match=r"bottom\[2\]: cont must be \(1, N\)"):
        build_layer(case, [c, g, np.zeros((1, 3))])
    with pytest.raises(errors.NetError, match=r"bottom\[0\]: c_prev must be \(1, N, H\)"):
        build_layer(case, [np.zeros((2, 2, H)), g, k])


def test_lstm_unit_matches_lstm_step():
    """An LSTM step is the LSTMUnit applied to the summed gate inputs (Caffe's unrolled net)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 3))
    cont = np.array([[1.0, 0.0]])
    lstm, bb, tb = make("LSTM", [x, cont, np.zeros((1, 2, H)), np.zeros((1, 2, H))], 3,
                        "expose_hidden: true")
    h0, c0 = rng.standard_normal((1, 2, H)), rng.standard_normal((1, 2, H))
    bb[2].data[...], bb[3].data[...] = h0, c0
    h, _, c_t = run(lstm, bb, tb)
    w_xc, b_c, w_hc = (np.asarray(b.data) for b in lstm.blobs)
    gates = x[0] @ w_xc.T + b_c + (h0[0] * cont[0][:, None]) @ w_hc.T
    unit, ub, ut = build_layer(LayerCase(type="LSTMUnit", id="t", ntop=2),
                               [c0, gates[None], cont])
    unit.forward(ub, ut)
    np.testing.assert_allclose(ut[0].data, c_t, rtol=1e-12)
    np.testing.assert_allclose(ut[1].data, h, rtol=1e-12)


def test_float32_stays_float32():
    layer, _, tb = make("LSTM", [np.ones((2, 2, 3)), cont_start(2, 2)], dtype=np.float32)
    assert all(b.data.dtype == np.float32 for b in layer.blobs)
    assert tb[0].data.dtype == np.float32


def test_debug_info_logs(caplog):
    layer, bb, tb = make("RNN", [np.ones((2, 2, 3)), cont_start(2, 2)], extra="debug_info: true")
    with caplog.at_level(logging.INFO, logger="pycaffe_mpi"):
        layer.forward(bb, tb)
        layer.backward(tb, [True, False], bb)
    assert "[Forward] Layer rnn_under_test, top 0 data" in caplog.text
    assert "[Backward] Layer rnn_under_test, param 4 diff" in caplog.text


# -- inside a Net ----------------------------------------------------------------------------------
NET = """
name: 'seq'
force_backward: true
layer { name: 'in' type: 'Input' top: 'x' top: 'cont' top: 'y'
        input_param { shape { dim: 3 dim: 2 dim: 4 } shape { dim: 3 dim: 2 }
                      shape { dim: 3 dim: 2 dim: 3 } } }
layer { name: 'lstm' type: 'LSTM' bottom: 'x' bottom: 'cont' top: 'h'
        recurrent_param { num_output: 3 weight_filler { type: 'uniform' min: -0.5 max: 0.5 }
                          bias_filler { type: 'constant' value: 0.1 } } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'h' bottom: 'y' top: 'loss' }
"""


def test_lstm_in_a_net_trains_and_round_trips(tmp_path):
    p = text_format.Merge(NET, caffe_pb2.NetParameter())
    net = Net(p, pycaffe_mpi.TRAIN, dtype=np.float64, seed=5)
    assert [tuple(b.shape) for b in net.params["lstm"]] == [(12, 4), (12,), (12, 3)]
    i = net.layer_names.index("lstm")
    assert net.bottom_need_backward[i] == [True, False]  # force_backward skips cont
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 3))
    net.forward(x=x, cont=cont_start(3, 2), y=y)
    net.clear_param_diffs()
    diffs = net.backward()
    assert np.abs(diffs["x"]).sum() > 0
    assert all(np.abs(b.diff).sum() > 0 for b in net.params["lstm"])
    path = str(tmp_path / "seq.caffemodel")
    net.save(path)
    other = Net(p, pycaffe_mpi.TRAIN, dtype=np.float64, seed=6)
    other.copy_trained_layers_from(path)
    for a, b in zip(other.params["lstm"], net.params["lstm"]):
        np.testing.assert_array_equal(a.data, b.data)


def test_lstm_unit_gradient_exact_for_fractional_cont():
    """The forget-gate gradient is the derivative of cont · σ(f'), also for cont outside {0, 1}
    (Caffe's f · (1 − f) with f = cont · σ(f') agrees only for binary cont)."""
    from pycaffe_mpi.testing import gradient_check

    rng = np.random.default_rng(5)
    case = LayerCase(type="LSTMUnit", id="t", ntop=2)
    layer, bb, tb = build_layer(case, [rng.standard_normal((1, 2, H)),
                                       rng.standard_normal((1, 2, 4 * H)),
                                       np.array([[0.5, 0.25]])])
    assert not gradient_check.check_gradient(layer, bb, tb, [0, 1])
