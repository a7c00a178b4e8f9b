"""Old formats upgraded at read time: V0 and V1 nets, input fields, old data transformation
fields, old BatchNorm params, V1 .caffemodel weights, solver_type; and the upgrade commands."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import cli, errors, prototxt, upgrade
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.solvers import read_solver_param

# An old LeNet in V1 form (as Caffe's examples were written before 2015), train/test by rules.
LENET_V1 = """name: "LeNet"
layers {
  name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 scale: 0.00390625 }
  include: { phase: TRAIN }
}
layers {
  name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 scale: 0.00390625 }
  include: { phase: TEST }
}
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers {
  name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "ip1_w" blob_share_mode: PERMISSIVE
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } }
}
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "accuracy" type: ACCURACY bottom: "ip1" bottom: "label" top: "accuracy"
  include: { phase: TEST } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip1" bottom: "label" top: "loss"
  loss_weight: 1 }
"""

# The same net written by hand in today's format.
LENET_NEW = """name: "LeNet"
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 }
}
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer {
  name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  param { name: "ip1_w" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } }
}
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss"
  loss_weight: 1 }
"""

# A V0 net (Caffe's first format): a padding layer before a convolution, flat fields.
V0_NET = """name: "tiny_v0"
input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 1 group: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.5 }
    blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
  bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 }
  bottom: "pool1" top: "norm1" }
layers { layer { name: "drop1" type: "dropout" dropout_ratio: 0.25 }
  bottom: "norm1" top: "norm1" }
layers { layer { name: "ip1" type: "innerproduct" num_output: 5 biasterm: false }
  bottom: "norm1" top: "ip1" }
layers { layer { name: "prob" type: "softmax" } bottom: "ip1" top: "prob" }
"""

V0_AS_NEW = """name: "tiny_v0"
layer { name: "input" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 pad: 2 kernel_size: 3 group: 1 stride: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "drop1" type: "Dropout" bottom: "norm1" top: "norm1"
  dropout_param { dropout_ratio: 0.25 } }
layer { name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
  inner_product_param { num_output: 5 bias_term: false } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""

# A V1 deploy net with net-level inputs, for weights.
V1_DEPLOY = """name: "small"
input: "data" input_dim: 2 input_dim: 1 input_dim: 6 input_dim: 6
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "ip1" type: INNER_PRODUCT bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 4 } }
"""


def parse(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """The package log's messages (the CLI's log setup stops propagation, so no caplog)."""
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("pycaffe_mpi")
    handler, old_level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- V1 ------------------------------------------------------------------------------------------
def test_v1_lenet_equals_hand_written_net(messages: list[str]) -> None:
    param = parse(LENET_V1)
    ok, _ = upgrade.upgrade_net_as_needed("lenet_v1.prototxt", param)
    assert ok
    assert param == parse(LENET_NEW), text_format.MessageToString(param)
    assert "INFO Attempting to upgrade input file specified using deprecated " \
           "V1LayerParameter: lenet_v1.prototxt" in messages
    assert "INFO Successfully upgraded file specified using deprecated V1LayerParameter" \
        in messages
    assert "INFO Attempting to upgrade input file specified using deprecated transformation " \
           "parameters: lenet_v1.prototxt" in messages
    assert not upgrade.net_needs_upgrade(param)


def test_every_v1_type_has_a_name() -> None:
    enum = caffe_pb2.V1LayerParameter.LayerType
    assert set(upgrade.V1_TYPES) == set(enum.values())
    assert upgrade.V1_TYPES[enum.Value("SOFTMAX_LOSS")] == "SoftmaxWithLoss"
    assert upgrade.V1_TYPES[enum.Value("TANH")] == "TanH"
    assert upgrade.V1_TYPES[enum.Value("NONE")] == ""


def test_v1_typed_params_all_carry_over() -> None:
    v1 = caffe_pb2.V1LayerParameter(name="x", type=caffe_pb2.V1LayerParameter.THRESHOLD,
                                    loss_weight=[0.5])
    for name in upgrade._V1_PARAM_FIELDS:
        getattr(v1, name).SetInParent()
    out = caffe_pb2.LayerParameter()
    assert upgrade.upgrade_v1_layer(v1, out)
    assert all(out.HasField(n) for n in upgrade._V1_PARAM_FIELDS)
    assert out.type == "Threshold" and list(out.loss_weight) == [0.5]


def test_layer_and_layers_together_is_refused() -> None:
    param = parse('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    with pytest.raises(errors.PrototxtError, match="both 'layer' and 'layers'"):
        upgrade.upgrade_net_as_needed("mixed.prototxt", param)


def test_v1_file_builds_a_net_with_locations(tmp_path: Path) -> None:
    bad = V1_DEPLOY.replace('bottom: "conv1" top: "ip1"', 'bottom: "conv9" top: "ip1"')
    path = write(tmp_path, "deploy_v1.prototxt", bad)
    with pytest.raises(errors.NetError, match=r"deploy_v1.prototxt:6: layer \"ip1\"") as info:
        Net(path, pycaffe_mpi.TEST)
    assert 'unknown bottom blob "conv9"' in str(info.value)
    net = Net(write(tmp_path, "ok.prototxt", V1_DEPLOY), pycaffe_mpi.TEST)
    assert net.layer_names[0] == "input" and net.inputs == ["data"]
    assert net.blobs["ip1"].shape == (2, 4)


# -- V0 ------------------------------------------------------------------------------------------
def test_v0_net_with_padding_layer_equals_hand_written_net(messages: list[str]) -> None:
    param = parse(V0_NET)
    ok, locs = upgrade.upgrade_net_as_needed("v0.prototxt", param,
                                             [f"v0.prototxt:{i}" for i in range(8)])
    assert ok
    assert param == parse(V0_AS_NEW), text_format.MessageToString(param)
    # the padding layer's location goes; the Input layer has none
    assert locs == ["", "v0.prototxt:1", *[f"v0.prototxt:{i}" for i in range(2, 8)]]
    for line in ("INFO Attempting to upgrade input file specified using deprecated "
                 "V0LayerParameter: v0.prototxt",
                 "INFO Successfully upgraded file specified using deprecated V0LayerParameter",
                 "INFO Attempting to upgrade input file specified using deprecated input "
                 "fields: v0.prototxt",
                 "INFO Successfully upgraded file specified using deprecated input fields."):
        assert line in messages


def test_v0_fields_of_data_layers() -> None:
    param = parse('layers { layer { name: "d" type: "images" source: "list.txt" batchsize: 8 '
                  "cropsize: 5 mirror: true meanfile: 'm.binaryproto' scale: 0.5 "
                  'shuffle_images: true new_height: 7 new_width: 9 rand_skip: 3 } top: "x" }'
                  'layers { layer { name: "w" type: "window_data" source: "w.txt" '
                  "det_fg_threshold: 0.6 det_context_pad: 4 det_crop_mode: 'square' } "
                  'top: "y" }')
    assert upgrade.upgrade_net_as_needed("d.prototxt", param)[0]
    d, w = param.layer
    assert d.type == "ImageData"
    assert d.image_data_param == caffe_pb2.ImageDataParameter(
        source="list.txt", batch_size=8, shuffle=True, new_height=7, new_width=9, rand_skip=3)
    assert d.transform_param == caffe_pb2.TransformationParameter(
        crop_size=5, mirror=True, mean_file="m.binaryproto", scale=0.5)
    assert w.type == "WindowData" and w.window_data_param.fg_threshold == pytest.approx(0.6)
    assert w.window_data_param.context_pad == 4 and w.window_data_param.crop_mode == "square"


def test_v0_field_on_the_wrong_type_is_reported(messages: list[str]) -> None:
    param = parse('layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "a" '
                  'top: "b" } input: "a" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1')
    ok, _ = upgrade.upgrade_net_as_needed("bad_v0.prototxt", param)
    assert not ok and param.layer[1].type == "ReLU"
    assert "ERROR Unknown parameter num_output for layer type relu" in messages
    assert any("had one or more problems upgrading V0NetParameter" in m for m in messages)


def test_v0_padding_before_a_non_conv_layer_is_an_error() -> None:
    param = parse('input: "a" layers { layer { name: "p" type: "padding" pad: 1 } '
                  'bottom: "a" top: "b" } layers { layer { name: "r" type: "relu" } '
                  'bottom: "b" top: "c" }')
    with pytest.raises(errors.PrototxtError, match="non-convolutional / non-pooling"):
        upgrade.upgrade_net_as_needed("p.prototxt", param)


def test_unknown_v0_type_is_an_error() -> None:
    with pytest.raises(errors.PrototxtError, match="Unknown layer name: convolution"):
        upgrade.upgrade_net_as_needed("x", parse('layers { layer { name: "c" '
                                                 'type: "convolution" } }'))


# -- inputs, data fields, BatchNorm ----------------------------------------------------------------
def test_input_shape_becomes_input_layer_and_bare_input_is_dropped() -> None:
    param = parse('input: "a" input: "b" input_shape { dim: 1 dim: 2 } '
                  'input_shape { dim: 3 } layer { name: "r" type: "ReLU" bottom: "a" top: "c" }')
    upgrade.upgrade_net_as_needed("in.prototxt", param)
    assert [lp.name for lp in param.layer] == ["input", "r"]
    assert [list(s.dim) for s in param.layer[0].input_param.shape] == [[1, 2], [3]]
    assert not len(param.input) and not len(param.input_shape)
    old_model = parse('input: "data" layer { name: "ip" type: "InnerProduct" }')
    upgrade.upgrade_net_as_needed("old.caffemodel", old_model)
    assert [lp.name for lp in old_model.layer] == ["ip"] and not len(old_model.input)


def test_input_dim_count_is_checked() -> None:
    with pytest.raises(errors.PrototxtError, match="input_dim must give 4 dimensions"):
        upgrade.upgrade_net_as_needed("x", parse('input: "a" input_dim: 1 input_dim: 2'))


def test_data_param_transform_fields_in_layer_blocks() -> None:
    param = parse('layer { name: "d" type: "Data" top: "x" data_param { source: "s" '
                  "scale: 0.5 mirror: true } transform_param { scale: 2 } }")
    upgrade.upgrade_net_as_needed("d.prototxt", param)
    lp = param.layer[0]
    # transform_param wins where both are set (today's format); the old field fills the rest
    assert lp.transform_param == caffe_pb2.TransformationParameter(scale=2, mirror=True)
    assert not lp.data_param.HasField("scale") and not lp.data_param.HasField("mirror")


def test_old_batchnorm_params_stop_learning(messages: list[str]) -> None:
    param = parse('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } '
                  "param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 3 } }")
    upgrade.upgrade_net_as_needed("bn.prototxt", param)
    assert all(p.lr_mult == 0 and p.decay_mult == 0 for p in param.layer[0].param)
    assert "INFO Attempting to upgrade batch norm layers using deprecated params: " \
           "bn.prototxt" in messages
    fresh = parse('layer { name: "bn" type: "BatchNorm" }')
    assert not upgrade.net_needs_upgrade(fresh)


# -- weights -------------------------------------------------------------------------------------
def _v1_caffemodel(rng: np.random.Generator) -> tuple[caffe_pb2.NetParameter, dict]:
    """A V1 binary model as old Caffe wrote it: weights in ``layers`` with legacy 4-D blobs."""
    model = caffe_pb2.NetParameter(name="small")
    weights = {"conv1": [rng.standard_normal((3, 1, 3, 3)), rng.standard_normal(3)],
               "ip1": [rng.standard_normal((4, 48)), rng.standard_normal(4)]}
    types = {"conv1": caffe_pb2.V1LayerParameter.CONVOLUTION,
             "ip1": caffe_pb2.V1LayerParameter.INNER_PRODUCT}
    for name, arrays in weights.items():
        lc = model.layers.add(name=name, type=types[name])
        for arr in arrays:
            shape = (1,) * (4 - arr.ndim) + arr.shape
            lc.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3],
                         data=arr.ravel().tolist())
    model.layers.add(name="relu1", type=caffe_pb2.V1LayerParameter.RELU)
    return model, weights


def test_v1_binary_caffemodel_loads_into_upgraded_net(tmp_path: Path) -> None:
    model, weights = _v1_caffemodel(np.random.default_rng(3))
    path = tmp_path / "small_v1.caffemodel"
    path.write_bytes(model.SerializeToString())
    net = Net(write(tmp_path, "deploy.prototxt", V1_DEPLOY), pycaffe_mpi.TEST,
              weights=str(path))
    for name, arrays in weights.items():
        for blob, arr in zip(net.params[name], arrays):
            np.testing.assert_allclose(blob.data, arr, rtol=1e-6)
    x = np.random.default_rng(4).standard_normal((2, 1, 6, 6))
    out = net.forward(data=x)["ip1"]
    w, b = weights["conv1"]
    conv = np.zeros((2, 3, 4, 4))
    for i in range(4):
        for j in range(4):
            conv[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + 3, j:j + 3], w) + b
    ref = np.maximum(conv, 0).reshape(2, -1) @ weights["ip1"][0].T + weights["ip1"][1]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


# -- the commands --------------------------------------------------------------------------------
def test_upgrade_net_text_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write(tmp_path, "lenet_v1.prototxt", LENET_V1)
    dst = tmp_path / "lenet.prototxt"
    assert cli.main(["upgrade-net", src, str(dst)]) == 0
    assert text_format.Parse(dst.read_text(), caffe_pb2.NetParameter()) == parse(LENET_NEW)
    err = capsys.readouterr().err
    assert "Successfully upgraded file specified using deprecated V1LayerParameter" in err
    assert f"Wrote upgraded NetParameter text proto to {dst}" in err
    # already current: said, and written unchanged
    assert cli.main(["upgrade-net", str(dst), str(tmp_path / "again.prototxt")]) == 0
    assert f"File already in latest proto format: {dst}" in capsys.readouterr().err


def test_upgrade_net_binary_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, weights = _v1_caffemodel(np.random.default_rng(5))
    src = tmp_path / "old.caffemodel"
    src.write_bytes(model.SerializeToString())
    dst = tmp_path / "new.caffemodel"
    assert cli.main(["upgrade-net", str(src), str(dst)]) == 0
    out = io.read_proto_binary(dst, caffe_pb2.NetParameter())
    assert not len(out.layers)
    assert [(lp.name, lp.type) for lp in out.layer] == [
        ("conv1", "Convolution"), ("ip1", "InnerProduct"), ("relu1", "ReLU")]
    np.testing.assert_allclose(io.blobproto_to_array(out.layer[1].blobs[0]).reshape(4, 48),
                               weights["ip1"][0], rtol=1e-6)
    assert "Wrote upgraded NetParameter binary proto to" in capsys.readouterr().err


def test_upgrade_solver_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write(tmp_path, "old_solver.prototxt",
                'net: "n.prototxt" base_lr: 0.1 solver_type: NESTEROV momentum: 0.9\n')
    dst = tmp_path / "solver.prototxt"
    assert cli.main(["upgrade-solver", src, str(dst)]) == 0
    new = text_format.Parse(dst.read_text(), caffe_pb2.SolverParameter())
    assert new.type == "Nesterov" and not new.HasField("solver_type")
    assert not new.HasField("snapshot_prefix")  # only the type is upgraded, as Caffe's tool
    err = capsys.readouterr().err
    assert "Attempting to upgrade input file specified using deprecated 'solver_type' field " \
           f"(enum)': {src}" in err
    assert "Successfully upgraded file specified using deprecated 'solver_type' field (enum) " \
           "to 'type' field (string)." in err
    assert "Wrote upgraded SolverParameter text proto to" in err


def test_upgrade_commands_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for command in ("upgrade-net", "upgrade-solver"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        assert f"pycaffe-mpi {command}" in capsys.readouterr().out
    assert cli.main(["upgrade-net", str(tmp_path / "missing.prototxt"),
                     str(tmp_path / "o")]) == 2
    bad = write(tmp_path, "bad.prototxt", 'layers { name: "x" type: CONVOLUTON }')
    assert cli.main(["upgrade-net", bad, str(tmp_path / "o")]) == 2
    assert "Failed to parse input text file as NetParameter" in capsys.readouterr().err


# -- solvers -------------------------------------------------------------------------------------
def test_read_solver_param_upgrades_solver_type(tmp_path: Path, messages: list[str]) -> None:
    path = write(tmp_path, "s.prototxt", 'net: "n" solver_type: ADAGRAD\n')
    param = read_solver_param(path)
    assert param.type == "AdaGrad" and not param.HasField("solver_type")
    assert "INFO Successfully upgraded file specified using deprecated 'solver_type' field " \
           "(enum) to 'type' field (string)." in messages
    both = write(tmp_path, "both.prototxt", 'net: "n" solver_type: ADAM type: "SGD"\n')
    with pytest.raises(errors.SolverError, match="cannot be both specified"):
        read_solver_param(both)


def test_prototxt_read_net_upgrades_once(tmp_path: Path, messages: list[str]) -> None:
    param, locs = prototxt.read_net(write(tmp_path, "v1.prototxt", LENET_V1))
    assert param == parse(LENET_NEW)
    assert locs == [f"{tmp_path / 'v1.prototxt'}:{n}" for n in (2, 7, 12, 18, 20, 26, 27, 29)]
    assert sum("Attempting to upgrade" in m for m in messages) == 2  # V1 + data fields


def test_every_v0_field_has_a_home_for_its_layer_types() -> None:
    v0_desc = caffe_pb2.V0LayerParameter.DESCRIPTOR
    for field, (_, targets) in upgrade.V0_FIELDS.items():
        for v0_type in targets:
            lc = caffe_pb2.V1LayerParameter()
            lc.layer.type = "conv" if v0_type == upgrade._ANY else v0_type
            value = getattr(lc.layer, field)
            if hasattr(value, "SetInParent"):
                value.SetInParent()
            else:
                default = v0_desc.fields_by_name[field].default_value
                setattr(lc.layer, field, default if default != "" else "x")
            assert upgrade.upgrade_v0_layer(lc, caffe_pb2.V1LayerParameter()), (field, v0_type)
    # Caffe's upgrade drops new_num/new_channels too; everything else is handled
    assert set(v0_desc.fields_by_name) - set(upgrade.V0_FIELDS) == {
        "name", "type", "blobs", "blobs_lr", "weight_decay", "new_num", "new_channels"}
