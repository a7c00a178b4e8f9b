"""caffe.NetSpec, caffe.layers, caffe.params, caffe.to_proto: the NetParameter pycaffe writes.

The expected prototxt texts are written by hand from pycaffe's net_spec rules (BVLC
python/caffe/net_spec.py and its test_net_spec.py nets).
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi as caffe
from pycaffe_mpi import layers as L
from pycaffe_mpi import params as P
from pycaffe_mpi.proto import caffe_pb2


def parse(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def lenet(batch_size: int, dummy: bool = False) -> caffe.NetSpec:
    n = caffe.NetSpec()
    if dummy:
        n.data, n.label = L.DummyData(
            shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size])],
            data_filler=[dict(type="gaussian"), dict(type="constant", value=3)], ntop=2)
    else:
        n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB,
                                 source="train_lmdb", transform_param=dict(scale=1. / 255),
                                 ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n


def _conv(name, bottom, num_output):
    return f"""layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
        convolution_param {{ num_output: {num_output} kernel_size: 5
                             weight_filler {{ type: "xavier" }} }} }}"""


def _pool(name, bottom):
    return f"""layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}"
        pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}"""


def _ip(name, bottom, top, num_output):
    return f"""layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}"
        inner_product_param {{ num_output: {num_output} weight_filler {{ type: "xavier" }} }} }}"""


LENET_TEXT = "\n".join([
    """layer { name: "data" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.00392156862745 }
        data_param { source: "train_lmdb" batch_size: 64 backend: LMDB } }""",
    _conv("conv1", "data", 20), _pool("pool1", "conv1"), _conv("conv2", "pool1", 50),
    _pool("pool2", "conv2"), _ip("fc1", "pool2", "fc1", 500),
    'layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }',
    _ip("score", "fc1", "score", 10),
    """layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label"
        top: "loss" }"""])


def test_lenet_equals_pycaffe_prototxt():
    net = lenet(64).to_proto()
    assert net == parse(LENET_TEXT)
    # field order inside each message is the schema's, as protobuf writes it for pycaffe
    text = str(net)
    assert text.index("source:") < text.index("batch_size:") < text.index("backend: LMDB")
    assert text.index("num_output: 20") < text.index("kernel_size: 5")


def test_anonymous_tops_get_type_counter_names():
    data, label = L.DummyData(shape=[dict(dim=[2, 1, 8, 8]), dict(dim=[2, 1, 1, 1])], ntop=2)
    conv1 = L.Convolution(data, kernel_size=3, num_output=2)
    conv2 = L.Convolution(conv1, kernel_size=3, num_output=2)
    ip = L.InnerProduct(conv2, num_output=3)
    relu = L.ReLU(ip, in_place=True)
    loss = L.SoftmaxWithLoss(relu, label)
    expected = parse("""
        layer { name: "DummyData1" type: "DummyData" top: "DummyData1" top: "DummyData2"
          dummy_data_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 }
                             shape { dim: 2 dim: 1 dim: 1 dim: 1 } } }
        layer { name: "Convolution1" type: "Convolution" bottom: "DummyData1"
          top: "Convolution1" convolution_param { num_output: 2 kernel_size: 3 } }
        layer { name: "Convolution2" type: "Convolution" bottom: "Convolution1"
          top: "Convolution2" convolution_param { num_output: 2 kernel_size: 3 } }
        layer { name: "InnerProduct1" type: "InnerProduct" bottom: "Convolution2"
          top: "InnerProduct1" inner_product_param { num_output: 3 } }
        layer { name: "ReLU1" type: "ReLU" bottom: "InnerProduct1" top: "InnerProduct1" }
        layer { name: "SoftmaxWithLoss1" type: "SoftmaxWithLoss" bottom: "InnerProduct1"
          bottom: "DummyData2" top: "SoftmaxWithLoss1" }""")
    assert loss.to_proto() == expected
    assert caffe.to_proto(loss) == expected
    # the net builds, and the in-place ReLU keeps its bottom's name
    net = caffe.Net(expected, caffe.TEST, seed=0)
    assert len(net.layers) == 6 and net.outputs == ["SoftmaxWithLoss1"]


def test_to_proto_of_several_tops_names_each_layer_once():
    x = L.Input(shape=dict(dim=[1, 4]))
    a = L.InnerProduct(x, num_output=2)
    b = L.Sigmoid(x)
    net = caffe.to_proto(a, b)
    assert [lp.name for lp in net.layer] == ["Input1", "InnerProduct1", "Sigmoid1"]
    assert [list(lp.bottom) for lp in net.layer] == [[], ["Input1"], ["Input1"]]


def test_zero_tops_layer_is_named_by_its_attribute():
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    net = n.to_proto()
    assert [(lp.name, list(lp.bottom), list(lp.top)) for lp in net.layer] == [
        ("data", [], ["data", "data2"]), ("silence_data", ["data"], []),
        ("silence_data2", ["data2"], [])]
    assert list(net.layer[0].dummy_data_param.shape[0].dim) == [3]


def test_layer_fields_param_include_loss_weight_and_repeated_values():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.ip = L.InnerProduct(n.data, num_output=4, param=[dict(lr_mult=1, decay_mult=1),
                                                       dict(lr_mult=2, decay_mult=0)],
                          bias_filler=dict(type="constant", value=0.1),
                          include=dict(phase=caffe.TRAIN), propagate_down=True)
    n.out = L.EuclideanLoss(n.ip, n.ip, loss_weight=0.5, exclude=[dict(stage="deploy")])
    n.py = L.Python(n.ip, module="mymod", layer="MyLayer", param_str='{"k": 1}', ntop=1)
    n.conv = L.Convolution(n.data, kernel_size=[3, 1], num_output=1, name="renamed",
                           convolution_param=dict(bias_term=False))
    expected = parse("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
          param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
          inner_product_param { num_output: 4 bias_filler { type: "constant" value: 0.1 } }
          include { phase: TRAIN } propagate_down: true }
        layer { name: "out" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "out"
          loss_weight: 0.5 exclude { stage: "deploy" } }
        layer { name: "py" type: "Python" bottom: "ip" top: "py"
          python_param { module: "mymod" layer: "MyLayer" param_str: '{"k": 1}' } }
        layer { name: "renamed" type: "Convolution" bottom: "data" top: "conv"
          convolution_param { num_output: 1 kernel_size: 3 kernel_size: 1 bias_term: false } }
    """)
    assert n.to_proto() == expected


def test_params_constants_are_the_schema_enums():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Pooling.AVE == caffe_pb2.PoolingParameter.AVE
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM
    with pytest.raises(AttributeError):
        P.NoSuchLayer  # noqa: B018


def test_our_extension_types_route_their_keywords():
    x = L.Input(shape=dict(dim=[1, 2]))
    net = caffe.to_proto(L.MPIBroadcast(x, root=1), L.Deconvolution(x, num_output=3,
                                                                     kernel_size=2))
    assert net.layer[1].mpi_param.root == 1
    assert net.layer[2].convolution_param.num_output == 3


def test_errors_are_clear():
    data = L.DummyData(ntop=2)  # a tuple of two Tops
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class "
                                        r"'tuple'>\)$"):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)
    bad = L.Convolution(L.Input(), kernel_size=3, no_such_field=1)
    with pytest.raises(AttributeError, match=r'"no_such_field".*convolution_param'):
        bad.to_proto()
    n = caffe.NetSpec()
    with pytest.raises(AttributeError, match="no top named 'missing'"):
        n.missing  # noqa: B018
    n["x"] = L.Input()
    assert n["x"] is n.x and list(n.tops) == ["x"]
    assert not hasattr(L, "__wrapped__")


def test_lenet_builds_and_runs_from_its_prototxt(tmp_path):
    path = tmp_path / "lenet.prototxt"
    path.write_text(str(lenet(2, dummy=True).to_proto()))
    net = caffe.Net(str(path), caffe.TRAIN, seed=0)
    assert len(net.layers) == 9
    assert net.layer_dict["relu1"].type == "ReLU"
    assert net.top_names["relu1"] == ["fc1"] == net.bottom_names["relu1"]
    loss = net.forward()["loss"]
    assert np.isfinite(loss) and float(loss) > 0
