"""Audit of issue 8: the pycaffe face, spot-checked against pycaffe's documented behaviour.

A BVLC pycaffe script changes only its import (``import pycaffe_mpi as caffe``; ``from
pycaffe_mpi import layers as L, params as P``); every name the issue lists must exist and
behave as pycaffe's does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi as caffe
from pycaffe_mpi import errors as caffe_errors
from pycaffe_mpi import layers as L
from pycaffe_mpi import params as P
from pycaffe_mpi import prototxt
from pycaffe_mpi.proto import caffe_pb2

TOP_LEVEL = ["set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "Net", "NetSpec",
             "layers", "params", "to_proto", "io", "TRAIN", "TEST", "Layer", "get_solver",
             "SGDSolver", "Classifier", "Detector", "proto"]
NET_NAMES = ["forward", "backward", "forward_all", "backward_all", "forward_backward_all",
             "_layer_names", "layer_dict", "top_names", "bottom_names", "inputs", "outputs",
             "share_with", "copy_from", "reshape", "save", "blobs", "params", "layers"]
NET_TEXT = """layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }"""
IO_NAMES = ["Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array",
            "array_to_blobproto", "array_to_datum", "datum_to_array",
            "arraylist_to_blobprotovector_str"]

DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    return path


def test_every_listed_name_exists() -> None:
    net = caffe.Net(text_format.Parse(NET_TEXT, caffe_pb2.NetParameter()), caffe.TEST)
    missing = [n for n in TOP_LEVEL if not hasattr(caffe, n)]
    missing += [f"io.{n}" for n in IO_NAMES if not hasattr(caffe.io, n)]
    missing += [f"Net.{n}" for n in NET_NAMES if not hasattr(net, n)]
    for m in ("set_transpose", "set_channel_swap", "set_raw_scale", "set_mean",
              "set_input_scale", "preprocess", "deprocess"):
        if not hasattr(caffe.io.Transformer, m):
            missing.append(f"io.Transformer.{m}")
    assert not missing, missing
    assert caffe.layers is L and caffe.params is P


def test_net_new_and_old_constructor_forms_load_the_same_weights(deploy: Path,
                                                                 tmp_path: Path) -> None:
    caffe.set_mode_cpu()
    first = caffe.Net(str(deploy), caffe.TEST)
    weights = str(tmp_path / "w.caffemodel")
    first.save(weights)
    new = caffe.Net(str(deploy), caffe.TEST, weights=weights)
    old = caffe.Net(str(deploy), weights, caffe.TEST)
    for name in ("conv", "ip"):
        for a, b, c in zip(first.params[name], new.params[name], old.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
            np.testing.assert_array_equal(a.data, c.data)
    assert old.phase == caffe.TEST


def test_net_introspection_matches_pycaffe(deploy: Path) -> None:
    net = caffe.Net(str(deploy), caffe.TEST)
    assert list(net._layer_names) == ["data", "conv", "relu", "ip", "prob"]
    assert list(net.layer_dict) == list(net._layer_names)
    assert net.inputs == ["data"]
    assert net.outputs == ["prob"]
    assert net.top_names["relu"] == ["conv"] and net.bottom_names["relu"] == ["conv"]
    assert net.bottom_names["data"] == [] and net.top_names["prob"] == ["prob"]
    assert list(net.params) == ["conv", "ip"]
    assert net.params["conv"][0].data.shape == (2, 3, 3, 3)


def test_forward_all_batches_pads_and_trims(deploy: Path) -> None:
    net = caffe.Net(str(deploy), caffe.TEST)
    x = np.random.default_rng(0).standard_normal((10, 3, 5, 5)).astype(np.float32)
    out = net.forward_all(data=x, blobs=["ip"])
    assert set(out) == {"prob", "ip"}
    assert out["prob"].shape == (10, 3)
    # batch by batch (batch size 4: 4 + 4 + 2 padded) gives the same rows
    for i in range(0, 10, 4):
        rows = x[i:i + 4]
        batch = np.zeros((4, 3, 5, 5), np.float32)
        batch[:len(rows)] = rows
        got = net.forward(data=batch)["prob"][:len(rows)]
        np.testing.assert_allclose(out["prob"][i:i + 4], got, rtol=1e-6)


def test_backward_all_returns_input_diffs(tmp_path: Path) -> None:
    path = tmp_path / "fb.prototxt"
    path.write_text("force_backward: true\n" + DEPLOY)
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.default_rng(0).standard_normal((6, 3, 5, 5)).astype(np.float32)
    net.forward_all(data=x)
    outs, diffs = net.forward_backward_all(data=x, prob=np.ones((6, 3), np.float32))
    assert outs["prob"].shape == (6, 3)
    assert diffs["data"].shape == (6, 3, 5, 5)
    # the softmax of a constant top diff passes back nothing
    np.testing.assert_allclose(diffs["data"], 0, atol=1e-5)
    # pycaffe has no batched backward_all; ours is Caffe's Net::Backward over the last batch
    net.blobs["prob"].diff[...] = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    net.backward_all()
    assert np.abs(net.blobs["data"].diff).sum() > 0


def test_transformer_preprocess_deprocess_round_trip() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (6, 7, 3)).astype(np.float32)  # H x W x K, RGB in [0, 1]
    t = caffe.io.Transformer({"data": (1, 3, 6, 7)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.5)
    x = t.preprocess("data", image)
    assert x.shape == (3, 6, 7) and x.dtype == np.float32
    # pycaffe's order: transpose, swap, raw scale, mean, input scale
    want = (image.transpose(2, 0, 1)[[2, 1, 0]] * 255
            - np.array([104.0, 117.0, 123.0])[:, None, None]) * 0.5
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", x[np.newaxis]), image, atol=1e-5)


def test_net_spec_to_proto_matches_pycaffe() -> None:
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=8, ntop=2,
                             include=dict(phase=caffe.TRAIN))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3,
                            param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.loss = L.SoftmaxWithLoss(n.pool, n.label)
    # what BVLC python/caffe/net_spec.py writes for the same script
    want = text_format.Parse("""
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss" }
""", caffe_pb2.NetParameter())
    assert n.to_proto() == want


def test_net_spec_automatic_names_as_pycaffe() -> None:
    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[1, 2]))
    n.sil = L.Silence(L.ReLU(n.x), L.ReLU(n.x), ntop=0)
    got = n.to_proto()
    # pycaffe names a top-less layer by its NetSpec attribute too
    assert [lp.name for lp in got.layer] == ["x", "ReLU1", "ReLU2", "sil"]
    assert [list(lp.top) for lp in got.layer] == [["x"], ["ReLU1"], ["ReLU2"], []]


def test_net_spec_prototxt_read_back_by_net_equals_the_netparameter(tmp_path: Path) -> None:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, bias_term=False,
                           weight_filler=dict(type="xavier"))
    n.bn = L.BatchNorm(n.conv, in_place=True)
    n.scale = L.Scale(n.bn, bias_term=True, in_place=True)
    n.deconv = L.Deconvolution(n.scale, convolution_param=dict(num_output=3, kernel_size=2,
                                                              stride=2))
    n.crop = L.Crop(n.deconv, n.data, axis=2)
    n.out = L.Reduction(n.crop, operation=P.Reduction.SUMSQ, axis=0)
    want = n.to_proto()
    want.name = "spec"
    path = tmp_path / "spec.prototxt"
    path.write_text(str(want))
    parsed, _ = prototxt.read_net(str(path))
    assert parsed == want
    net = caffe.Net(str(path), caffe.TRAIN)
    # the built net's layers are the file's, with Caffe's additions only: the phase each
    # layer inherits from the net, and a Split layer for the blob used twice
    kept = [lp for lp in net.param.layer if lp.type != "Split"]
    assert [(lp.name, lp.type) for lp in kept] == [(lp.name, lp.type) for lp in want.layer]
    for got, lp in zip(kept, want.layer):
        for field in ("convolution_param", "batch_norm_param", "scale_param", "crop_param",
                      "reduction_param", "input_param"):
            assert getattr(got, field) == getattr(lp, field), (lp.name, field)
        assert list(got.top) == list(lp.top)
    assert [lp.name for lp in net.param.layer] == list(net._layer_names)
    assert net.blobs["crop"].data.shape == (2, 3, 6, 6)
    net.forward()


def test_third_positional_after_an_int_phase_is_not_dropped(deploy: Path,
                                                             tmp_path: Path) -> None:
    first = caffe.Net(str(deploy), caffe.TEST)
    first.params["ip"][0].data[...] = 7
    weights = str(tmp_path / "w.caffemodel")
    first.save(weights)
    # a weights path where pycaffe takes `level`: loaded or refused, never ignored
    try:
        net = caffe.Net(str(deploy), caffe.TEST, weights)
    except (TypeError, caffe_errors.PycaffeError):
        return
    assert (net.params["ip"][0].data == 7).all(), "the weights were silently ignored"


def test_third_positional_after_an_int_phase_is_the_level(tmp_path: Path) -> None:
    model = tmp_path / "levels.prototxt"
    model.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 } } }\n'
        'layer { name: "deep" type: "ReLU" bottom: "data" top: "deep"\n'
        '        include { min_level: 2 } }\n')
    assert "deep" not in caffe.Net(str(model), caffe.TEST)._layer_names
    assert "deep" in caffe.Net(str(model), caffe.TEST, 2)._layer_names
    with pytest.raises(caffe_errors.PycaffeError, match="level given twice"):
        caffe.Net(str(model), caffe.TEST, 2, level=3)
