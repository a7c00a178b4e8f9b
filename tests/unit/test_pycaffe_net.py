"""pycaffe's Net methods (BVLC python/caffe/pycaffe.py and _caffe.cpp semantics)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi as caffe
from pycaffe_mpi import errors
from pycaffe_mpi import layers as L
from pycaffe_mpi.proto import caffe_pb2

NET = """
name: "tiny"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "act" type: "TanH" bottom: "ip" top: "act" }
"""


def tiny(phase: int = caffe.TEST, **kw) -> caffe.Net:
    return caffe.Net(text_format.Parse(NET, caffe_pb2.NetParameter()), phase, seed=3, **kw)


def reference(net: caffe.Net, x: np.ndarray) -> np.ndarray:
    w, b = (p.data.astype(np.float64) for p in net.params["ip"])
    out = np.zeros((len(x), 2))
    for i in range(len(x)):
        for j in range(2):
            out[i, j] = np.tanh(sum(x[i, k] * w[j, k] for k in range(3)) + b[j])
    return out


def test_constructor_forms(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET)
    weights = tmp_path / "tiny.caffemodel"
    tiny().save(str(weights))
    a = caffe.Net(str(path), caffe.TEST, weights=str(weights))
    b = caffe.Net(str(path), str(weights), caffe.TEST)  # pycaffe's old positional form
    c = caffe.Net(str(path), caffe.TRAIN)
    for net in (a, b):
        assert net.phase == caffe.TEST
        np.testing.assert_array_equal(net.params["ip"][0].data, tiny().params["ip"][0].data)
    assert c.phase == caffe.TRAIN


def test_introspection_matches_pycaffe():
    net = tiny()
    assert net._layer_names == ["data", "ip", "act"]
    assert list(net.layer_dict) == net._layer_names
    assert [layer.type for layer in net.layers] == ["Input", "InnerProduct", "TanH"]
    assert net._blob_names == list(net.blobs) == ["data", "ip", "act"]
    assert net._blobs == list(net.blobs.values())
    assert net.inputs == ["data"] and net.outputs == ["act"]
    assert net._inputs == [0] and net._outputs == [2]
    assert net._top_ids(1) == [1] and net._bottom_ids(2) == [1]
    assert dict(net.top_names) == {"data": ["data"], "ip": ["ip"], "act": ["act"]}
    assert dict(net.bottom_names) == {"data": [], "ip": ["data"], "act": ["ip"]}
    assert list(net.params) == ["ip"] and [p.data.shape for p in net.params["ip"]] == [(2, 3),
                                                                                        (2,)]
    assert net._blob_loss_weights == [0.0, 0.0, 0.0]
    loss_net = caffe.Net(caffe.to_proto(L.EuclideanLoss(L.Input(shape=dict(dim=[2, 3])),
                                                        L.Input(shape=dict(dim=[2, 3])))),
                         caffe.TEST)
    assert loss_net._blob_loss_weights == [0.0, 0.0, 1.0]
    assert list(loss_net.blob_loss_weights.values()) == [0.0, 0.0, 1.0]


def test_forward_all_batches_pads_and_concatenates():
    net = tiny()
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)  # 4 + 4 + 2
    out = net.forward_all(data=x)
    assert list(out) == ["act"] and out["act"].shape == (10, 2)
    np.testing.assert_allclose(out["act"], reference(net, x), rtol=1e-5, atol=1e-6)
    extra = net.forward_all(blobs=["ip"], data=x[:4])
    assert set(extra) == {"act", "ip"} and extra["ip"].shape == (4, 2)
    np.testing.assert_allclose(np.tanh(extra["ip"]), extra["act"], rtol=1e-6)
    with pytest.raises(errors.NetError, match="needs input arrays"):
        net.forward_all()


def test_batch_pads_the_last_batch_with_zeros():
    net = tiny()
    batches = list(net._batch({"data": np.ones((6, 3))}))
    assert [b["data"].shape for b in batches] == [(4, 3), (4, 3)]
    np.testing.assert_array_equal(batches[1]["data"], [[1] * 3] * 2 + [[0] * 3] * 2)


def test_forward_backward_all_gives_outputs_and_input_diffs():
    net = tiny()
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    top = np.random.default_rng(2).standard_normal((6, 2)).astype(np.float32)
    outs, diffs = net.forward_backward_all(data=x, act=top)
    act = reference(net, x)
    np.testing.assert_allclose(outs["act"], act, rtol=1e-5, atol=1e-6)
    w = net.params["ip"][0].data.astype(np.float64)
    want = np.zeros((6, 3))
    for i in range(6):
        for k in range(3):
            want[i, k] = sum(top[i, j] * (1 - act[i, j] ** 2) * w[j, k] for j in range(2))
    assert diffs["data"].shape == (6, 3)
    np.testing.assert_allclose(diffs["data"], want, rtol=1e-4, atol=1e-5)
    outs, diffs = net.forward_backward_all(blobs=["ip"], diffs=["ip"], data=x[:4])
    assert set(outs) == {"act", "ip"} and set(diffs) == {"data", "ip"}
    with pytest.raises(errors.NetError, match="neither inputs"):
        net.forward_backward_all(nope=x)


def test_private_forward_backward_and_share_with(tmp_path):
    net = tiny()
    net.blobs["data"].data[...] = 1
    net._forward(0, 2)
    np.testing.assert_allclose(net.blobs["act"].data, reference(net, np.ones((4, 3))),
                               rtol=1e-5)
    net.blobs["act"].diff[...] = 1
    net._backward(2, 1)
    assert np.abs(net.params["ip"][0].diff).sum() > 0
    other = caffe.Net(text_format.Parse(NET, caffe_pb2.NetParameter()), caffe.TEST, seed=99)
    assert not np.array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    other.share_with(net)
    net.params["ip"][0].data[...] = 5
    assert (other.params["ip"][0].data == 5).all()
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    fresh = tiny()
    fresh.copy_from(str(path))
    assert (fresh.params["ip"][0].data == 5).all()
    h5 = tmp_path / "w.caffemodel.h5"
    net.save_hdf5(str(h5))
    again = tiny()
    again.load_hdf5(str(h5))
    np.testing.assert_array_equal(again.params["ip"][1].data, net.params["ip"][1].data)
    assert (again.params["ip"][0].data == 5).all()
    fresh.blobs["data"].reshape(7, 3)
    fresh.reshape()
    assert fresh.blobs["act"].data.shape == (7, 2)


def memory_net(batch_size: int = 2) -> caffe.Net:
    spec = caffe.NetSpec()
    spec.data, spec.label = L.MemoryData(batch_size=batch_size, channels=1, height=2, width=3,
                                         ntop=2)
    spec.flat = L.Flatten(spec.data)
    return caffe.Net(spec.to_proto(), caffe.TEST)


def test_set_input_arrays_checks_like_caffe_and_calls_reset():
    with pytest.raises(errors.NetError, match="first layer is a MemoryDataLayer"):
        tiny().set_input_arrays(np.zeros((4, 3), np.float32), np.zeros(4, np.float32))
    calls = []
    net = tiny()
    # the checks and the hand-over alone, with a stand-in first layer
    net.layers[0] = types.SimpleNamespace(type="MemoryData", batch_size=2,
                                          reset=lambda d, lab: calls.append((d, lab)))
    mp = net.param.layer[0].memory_data_param
    mp.batch_size, mp.channels, mp.height, mp.width = 2, 1, 2, 3
    data = np.zeros((4, 1, 2, 3), np.float32)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    assert calls[0][0] is data and calls[0][1].shape == (4, 1, 1, 1)
    for bad, match in [((np.zeros((4, 2, 2, 3)), np.zeros(4)), "wrong number of channels"),
                       ((np.zeros((4, 1, 3, 3)), np.zeros(4)), "wrong height"),
                       ((np.zeros((4, 1, 2, 2)), np.zeros(4)), "wrong width"),
                       ((np.zeros((4, 6)), np.zeros(4)), "must be 4-d"),
                       ((np.zeros((4, 1, 2, 3)), np.zeros(2)), "same first dimension"),
                       ((np.zeros((3, 1, 2, 3)), np.zeros(3)), "multiple of batch size")]:
        with pytest.raises(errors.NetError, match=match):
            net.set_input_arrays(*bad)
    assert len(calls) == 1


def test_set_input_arrays_feeds_the_memory_data_layer():
    if "MemoryData" not in caffe.layer_type_list():
        pytest.skip("no MemoryData layer registered")
    net = memory_net()
    data = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([3, 1, 4, 1], dtype=np.float32)
    net.set_input_arrays(data, labels)
    first = net.forward(blobs=["label"])
    np.testing.assert_array_equal(first["flat"], data[:2].reshape(2, 6))
    np.testing.assert_array_equal(first["label"].ravel(), [3, 1])
    second = net.forward(blobs=["label"])
    np.testing.assert_array_equal(second["flat"], data[2:].reshape(2, 6))


def test_backward_all_without_arguments_is_the_full_backward_pass():
    # pycaffe has no batched backward_all; Net.backward_all() back-propagates every layer
    net = tiny()
    net.forward(data=np.ones((4, 3), np.float32))
    net.blobs["act"].diff[...] = 1
    net.clear_param_diffs()
    net.backward_all()
    assert np.abs(net.params["ip"][0].diff).sum() > 0 and np.abs(net.blobs["data"].diff).sum() > 0


def test_forward_all_on_the_gpu_gives_host_arrays_equal_to_the_cpu():
    from pycaffe_mpi import backend

    if not backend.gpu_available():
        pytest.skip("no usable GPU")
    caffe.set_device(0)
    x = np.random.default_rng(4).standard_normal((9, 3)).astype(np.float32)
    cpu = tiny().forward_all(data=x)["act"]
    gpu_net = tiny(backend=caffe.Settings(mode="gpu").backend())
    gpu = gpu_net.forward_all(data=x)["act"]
    assert isinstance(gpu, np.ndarray)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-6)
    _, diffs = gpu_net.forward_backward_all(data=x, act=np.ones((9, 2), np.float32))
    assert isinstance(diffs["data"], np.ndarray) and diffs["data"].shape == (9, 3)
