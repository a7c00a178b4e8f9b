"""Tests for the Caffe-compatible schema (proto/caffe.proto) and its generated module."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor, text_format

from pycaffe_mpi.proto import caffe_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_PROTO = REPO_ROOT / "tools" / "gen_proto.py"

FD = descriptor.FieldDescriptor


def _load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", GEN_PROTO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_pinned_generator() -> None:
    pytest.importorskip("grpc_tools")
    from grpc_tools import grpc_version

    if not str(grpc_version.VERSION).startswith("1.71."):
        pytest.skip(f"grpcio-tools {grpc_version.VERSION} is not the pinned 1.71.x")


# --- (a) the committed generated code matches a fresh generation -------------------------


def test_regeneration_matches_committed(tmp_path: Path) -> None:
    _require_pinned_generator()
    gen = _load_gen_proto()
    gen.generate(tmp_path)
    diff = gen.diff_generated(tmp_path)
    assert not diff, "caffe_pb2 is stale; run `python tools/gen_proto.py`:\n" + "".join(
        line[:200] for line in diff[:40]
    )


def test_gen_proto_check_cli_passes() -> None:
    _require_pinned_generator()
    result = subprocess.run(
        [sys.executable, str(GEN_PROTO), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gen_proto_detects_difference(tmp_path: Path) -> None:
    _require_pinned_generator()
    gen = _load_gen_proto()
    fresh = tmp_path / "fresh"
    stale = tmp_path / "stale"
    fresh.mkdir()
    stale.mkdir()
    gen.generate(fresh)
    for name in gen.GENERATED:
        (stale / name).write_text((fresh / name).read_text(encoding="utf-8"), encoding="utf-8")
    assert gen.diff_generated(fresh, stale) == []
    (stale / "caffe_pb2.pyi").write_text("# edited by hand\n", encoding="utf-8")
    assert gen.diff_generated(fresh, stale)


# --- (b) names, numbers, types, labels and defaults match BVLC Caffe ---------------------

# (message, field, number, type, label, default or None to skip)
BVLC_FIELDS = [
    ("BlobShape", "dim", 1, FD.TYPE_INT64, FD.LABEL_REPEATED, None),
    ("BlobProto", "shape", 7, FD.TYPE_MESSAGE, FD.LABEL_OPTIONAL, None),
    ("BlobProto", "data", 5, FD.TYPE_FLOAT, FD.LABEL_REPEATED, None),
    ("BlobProto", "diff", 6, FD.TYPE_FLOAT, FD.LABEL_REPEATED, None),
    ("BlobProto", "double_data", 8, FD.TYPE_DOUBLE, FD.LABEL_REPEATED, None),
    ("BlobProto", "num", 1, FD.TYPE_INT32, FD.LABEL_OPTIONAL, 0),
    ("BlobProto", "width", 4, FD.TYPE_INT32, FD.LABEL_OPTIONAL, 0),
    ("BlobProtoVector", "blobs", 1, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("Datum", "channels", 1, FD.TYPE_INT32, FD.LABEL_OPTIONAL, None),
    ("Datum", "data", 4, FD.TYPE_BYTES, FD.LABEL_OPTIONAL, None),
    ("Datum", "label", 5, FD.TYPE_INT32, FD.LABEL_OPTIONAL, None),
    ("Datum", "float_data", 6, FD.TYPE_FLOAT, FD.LABEL_REPEATED, None),
    ("Datum", "encoded", 7, FD.TYPE_BOOL, FD.LABEL_OPTIONAL, False),
    ("FillerParameter", "type", 1, FD.TYPE_STRING, FD.LABEL_OPTIONAL, "constant"),
    ("FillerParameter", "max", 4, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, 1.0),
    ("FillerParameter", "std", 6, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, 1.0),
    ("FillerParameter", "sparse", 7, FD.TYPE_INT32, FD.LABEL_OPTIONAL, -1),
    ("FillerParameter", "variance_norm", 8, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 0),
    ("NetParameter", "name", 1, FD.TYPE_STRING, FD.LABEL_OPTIONAL, None),
    ("NetParameter", "layers", 2, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("NetParameter", "input", 3, FD.TYPE_STRING, FD.LABEL_REPEATED, None),
    ("NetParameter", "input_dim", 4, FD.TYPE_INT32, FD.LABEL_REPEATED, None),
    ("NetParameter", "force_backward", 5, FD.TYPE_BOOL, FD.LABEL_OPTIONAL, False),
    ("NetParameter", "state", 6, FD.TYPE_MESSAGE, FD.LABEL_OPTIONAL, None),
    ("NetParameter", "input_shape", 8, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("NetParameter", "layer", 100, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("SolverParameter", "net", 24, FD.TYPE_STRING, FD.LABEL_OPTIONAL, None),
    ("SolverParameter", "test_iter", 3, FD.TYPE_INT32, FD.LABEL_REPEATED, None),
    ("SolverParameter", "test_initialization", 32, FD.TYPE_BOOL, FD.LABEL_OPTIONAL, True),
    ("SolverParameter", "base_lr", 5, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, None),
    ("SolverParameter", "iter_size", 36, FD.TYPE_INT32, FD.LABEL_OPTIONAL, 1),
    ("SolverParameter", "regularization_type", 29, FD.TYPE_STRING, FD.LABEL_OPTIONAL, "L2"),
    ("SolverParameter", "stepvalue", 34, FD.TYPE_INT32, FD.LABEL_REPEATED, None),
    ("SolverParameter", "clip_gradients", 35, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, -1.0),
    ("SolverParameter", "snapshot_format", 37, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 1),
    ("SolverParameter", "solver_mode", 17, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 1),
    ("SolverParameter", "random_seed", 20, FD.TYPE_INT64, FD.LABEL_OPTIONAL, -1),
    ("SolverParameter", "type", 40, FD.TYPE_STRING, FD.LABEL_OPTIONAL, "SGD"),
    ("SolverParameter", "solver_type", 30, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 0),
    ("SolverParameter", "weights", 42, FD.TYPE_STRING, FD.LABEL_REPEATED, None),
    ("SolverState", "iter", 1, FD.TYPE_INT32, FD.LABEL_OPTIONAL, None),
    ("SolverState", "learned_net", 2, FD.TYPE_STRING, FD.LABEL_OPTIONAL, None),
    ("SolverState", "history", 3, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("SolverState", "current_step", 4, FD.TYPE_INT32, FD.LABEL_OPTIONAL, 0),
    ("NetState", "phase", 1, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 1),
    ("NetStateRule", "not_stage", 5, FD.TYPE_STRING, FD.LABEL_REPEATED, None),
    ("ParamSpec", "lr_mult", 3, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, 1.0),
    ("ParamSpec", "decay_mult", 4, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, 1.0),
    ("LayerParameter", "phase", 10, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, None),
    ("LayerParameter", "loss_weight", 5, FD.TYPE_FLOAT, FD.LABEL_REPEATED, None),
    ("LayerParameter", "param", 6, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("LayerParameter", "blobs", 7, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("LayerParameter", "include", 8, FD.TYPE_MESSAGE, FD.LABEL_REPEATED, None),
    ("LayerParameter", "propagate_down", 11, FD.TYPE_BOOL, FD.LABEL_REPEATED, None),
    ("LayerParameter", "transform_param", 100, FD.TYPE_MESSAGE, FD.LABEL_OPTIONAL, None),
    ("LayerParameter", "loss_param", 101, FD.TYPE_MESSAGE, FD.LABEL_OPTIONAL, None),
    ("ConvolutionParameter", "kernel_size", 4, FD.TYPE_UINT32, FD.LABEL_REPEATED, None),
    ("ConvolutionParameter", "stride", 6, FD.TYPE_UINT32, FD.LABEL_REPEATED, None),
    ("ConvolutionParameter", "dilation", 18, FD.TYPE_UINT32, FD.LABEL_REPEATED, None),
    ("ConvolutionParameter", "bias_term", 2, FD.TYPE_BOOL, FD.LABEL_OPTIONAL, True),
    ("PoolingParameter", "stride", 3, FD.TYPE_UINT32, FD.LABEL_OPTIONAL, 1),
    ("PoolingParameter", "round_mode", 13, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 0),
    ("LRNParameter", "beta", 3, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, 0.75),
    ("DataParameter", "backend", 8, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 0),
    ("DataParameter", "prefetch", 10, FD.TYPE_UINT32, FD.LABEL_OPTIONAL, 4),
    ("LossParameter", "normalization", 3, FD.TYPE_ENUM, FD.LABEL_OPTIONAL, 1),
    ("BatchNormParameter", "eps", 3, FD.TYPE_FLOAT, FD.LABEL_OPTIONAL, None),
    ("ClipParameter", "min", 1, FD.TYPE_FLOAT, FD.LABEL_REQUIRED, None),
    ("V1LayerParameter", "param", 1001, FD.TYPE_STRING, FD.LABEL_REPEATED, None),
    ("V1LayerParameter", "layer", 1, FD.TYPE_MESSAGE, FD.LABEL_OPTIONAL, None),
    # Our extensions.
    ("NetStateRule", "mpi_rank", 6, FD.TYPE_UINT32, FD.LABEL_REPEATED, None),
    ("LayerParameter", "mpi_param", 1000, FD.TYPE_MESSAGE, FD.LABEL_OPTIONAL, None),
    ("MPIParameter", "root", 1, FD.TYPE_UINT32, FD.LABEL_OPTIONAL, 0),
]

# LayerParameter's layer-specific fields at BVLC's numbers (plus ours from 1000).
LAYER_PARAM_NUMBERS = {
    "accuracy_param": 102, "argmax_param": 103, "batch_norm_param": 139, "bias_param": 141,
    "clip_param": 148, "concat_param": 104, "contrastive_loss_param": 105,
    "convolution_param": 106, "crop_param": 144, "data_param": 107, "dropout_param": 108,
    "dummy_data_param": 109, "eltwise_param": 110, "elu_param": 140, "embed_param": 137,
    "exp_param": 111, "flatten_param": 135, "hdf5_data_param": 112, "hdf5_output_param": 113,
    "hinge_loss_param": 114, "image_data_param": 115, "infogain_loss_param": 116,
    "inner_product_param": 117, "input_param": 143, "log_param": 134, "lrn_param": 118,
    "memory_data_param": 119, "mvn_param": 120, "parameter_param": 145, "pooling_param": 121,
    "power_param": 122, "prelu_param": 131, "python_param": 130, "recurrent_param": 146,
    "reduction_param": 136, "relu_param": 123, "reshape_param": 133, "scale_param": 142,
    "sigmoid_param": 124, "softmax_param": 125, "spp_param": 132, "slice_param": 126,
    "swish_param": 147, "tanh_param": 127, "threshold_param": 128, "tile_param": 138,
    "window_data_param": 129,
    "mpi_param": 1000, "multiple_choice_loss_param": 1001, "bootstrap_param": 1002,
}  # fmt: skip


def _label(fd: descriptor.FieldDescriptor) -> int:
    """The field's label; protobuf 7 dropped ``FieldDescriptor.label`` for ``is_repeated``."""
    if hasattr(fd, "label"):
        return fd.label
    if fd.is_repeated:
        return descriptor.FieldDescriptor.LABEL_REPEATED
    if fd.is_required:
        return descriptor.FieldDescriptor.LABEL_REQUIRED
    return descriptor.FieldDescriptor.LABEL_OPTIONAL


@pytest.mark.parametrize(("message", "field", "number", "ftype", "label", "default"), BVLC_FIELDS)
def test_field_matches_bvlc(
    message: str, field: str, number: int, ftype: int, label: int, default: object
) -> None:
    fd = getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field]
    assert (fd.number, fd.type, _label(fd)) == (number, ftype, label)
    if default is not None:
        assert fd.default_value == pytest.approx(default)


def test_layer_specific_param_numbers() -> None:
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    actual = {name: fields[name].number for name in LAYER_PARAM_NUMBERS}
    assert actual == LAYER_PARAM_NUMBERS
    # Ours stay in 1000-1099; everything else is an upstream number.
    for fd in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        assert fd.number < 149 or 1000 <= fd.number <= 1099, fd.name


def test_packed_exactly_where_bvlc_packs() -> None:
    def walk(msgs: list[descriptor.Descriptor]) -> set[tuple[str, str]]:
        found = set()
        for msg in msgs:
            found |= {(msg.full_name, fd.name) for fd in msg.fields if fd.is_packed}
            found |= walk(list(msg.nested_types))
        return found

    packed = walk(list(caffe_pb2.DESCRIPTOR.message_types_by_name.values()))
    assert packed == {
        ("caffe.BlobShape", "dim"),
        ("caffe.BlobProto", "data"),
        ("caffe.BlobProto", "diff"),
        ("caffe.BlobProto", "double_data"),
        ("caffe.BlobProto", "double_diff"),
    }


def test_enums_match_bvlc() -> None:
    assert caffe_pb2.TRAIN == 0 and caffe_pb2.TEST == 1
    assert caffe_pb2.FillerParameter.AVERAGE == 2
    assert caffe_pb2.SolverParameter.HDF5 == 0
    assert caffe_pb2.SolverParameter.BINARYPROTO == 1
    assert caffe_pb2.SolverParameter.ADAM == 5
    assert caffe_pb2.ParamSpec.PERMISSIVE == 1
    assert caffe_pb2.LossParameter.BATCH_SIZE == 2
    assert caffe_pb2.PoolingParameter.STOCHASTIC == 2
    assert caffe_pb2.PoolingParameter.FLOOR == 1
    assert caffe_pb2.EltwiseParameter.MAX == 2
    assert caffe_pb2.DataParameter.LMDB == 1
    assert caffe_pb2.HingeLossParameter.L2 == 2
    assert caffe_pb2.V1LayerParameter.INNER_PRODUCT == 14
    assert caffe_pb2.MultipleChoiceLossParameter.ASSIGNED == 1


def test_extension_messages_have_no_runtime_handles() -> None:
    assert [f.name for f in caffe_pb2.MPIParameter.DESCRIPTOR.fields] == ["root"]
    mcl = caffe_pb2.MultipleChoiceLossParameter()
    assert (mcl.k, mcl.ce_weight, mcl.normalization) == (1, 0.0, mcl.BATCH)
    boot = caffe_pb2.BootstrapParameter()
    assert (boot.enable, boot.seed, boot.member) == (False, -1, 0)


# --- (c) BVLC-style prototxt parses and round-trips -------------------------------------

NET_PROTOTXT = textwrap.dedent(
    """\
    name: "CIFAR10_quick"
    layer {
      name: "cifar"
      type: "Data"
      top: "data"
      top: "label"
      include { phase: TRAIN }
      transform_param { mean_file: "examples/cifar10/mean.binaryproto" }
      data_param {
        source: "examples/cifar10/cifar10_train_lmdb"
        batch_size: 100
        backend: LMDB
      }
    }
    layer {
      name: "conv1"
      type: "Convolution"
      bottom: "data"
      top: "conv1"
      param { lr_mult: 1 }
      param { lr_mult: 2 }
      include { phase: TRAIN }
      convolution_param {
        num_output: 32
        pad: 2
        kernel_size: 5
        stride: 1
        weight_filler { type: "gaussian" std: 0.0001 }
        bias_filler { type: "constant" }
      }
    }
    layer {
      name: "bcast"
      type: "MPIBroadcast"
      bottom: "conv1"
      top: "conv1_b"
      include { mpi_rank: 0 mpi_rank: 2 }
      mpi_param { root: 0 }
    }
    """
)


def test_bvlc_prototxt_parses_and_round_trips() -> None:
    net = text_format.Merge(NET_PROTOTXT, caffe_pb2.NetParameter())
    data, conv, bcast = net.layer
    assert data.include[0].phase == caffe_pb2.TRAIN
    assert data.transform_param.mean_file == "examples/cifar10/mean.binaryproto"
    assert data.data_param.backend == caffe_pb2.DataParameter.LMDB
    assert [p.lr_mult for p in conv.param] == [1.0, 2.0]
    assert conv.param[0].decay_mult == 1.0  # default
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.pad), list(cp.kernel_size)) == (32, [2], [5])
    assert cp.weight_filler.type == "gaussian"
    assert cp.weight_filler.std == pytest.approx(1e-4)
    assert list(bcast.include[0].mpi_rank) == [0, 2]
    assert bcast.mpi_param.HasField("root")

    text = text_format.MessageToString(net)
    assert text_format.Parse(text, caffe_pb2.NetParameter()) == net
    assert caffe_pb2.NetParameter.FromString(net.SerializeToString()) == net


def test_solver_prototxt_parses() -> None:
    solver = text_format.Parse(
        'net: "train_test.prototxt"\ntest_iter: 100\ntest_interval: 500\n'
        'base_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.004\nlr_policy: "fixed"\n'
        "display: 100\nmax_iter: 4000\nsnapshot: 4000\n"
        'snapshot_prefix: "cifar10_quick"\nsolver_mode: CPU\n',
        caffe_pb2.SolverParameter(),
    )
    assert solver.solver_mode == caffe_pb2.SolverParameter.CPU
    assert solver.type == "SGD" and solver.snapshot_format == solver.BINARYPROTO
    assert solver.base_lr == pytest.approx(0.001)


def test_legacy_v1_layers_parse() -> None:
    net = text_format.Parse(
        'name: "old"\nlayers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"\n'
        "  blobs_lr: 1 blobs_lr: 2 inner_product_param { num_output: 10 } }\n",
        caffe_pb2.NetParameter(),
    )
    assert net.layers[0].type == caffe_pb2.V1LayerParameter.INNER_PRODUCT
    assert list(net.layers[0].blobs_lr) == [1.0, 2.0]


# --- (d) unknown fields fail loudly, naming the line ---------------------------------------


def test_unknown_field_raises_with_line() -> None:
    bad = 'name: "x"\nlayer {\n  name: "conv1"\n  kernal_size: 3\n}\n'
    with pytest.raises(text_format.ParseError, match=r"kernal_size") as info:
        text_format.Merge(bad, caffe_pb2.NetParameter())
    assert info.value.GetLine() == 4
    assert str(info.value).startswith("4:")


# --- (e) binary blobs are byte-compatible and round-trip ----------------------------------


def test_blobproto_binary_round_trip() -> None:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([0.5, -1.0, 2.0, 3.0, 4.0, 5.0])
    raw = blob.SerializeToString()
    back = caffe_pb2.BlobProto.FromString(raw)
    assert back == blob
    assert list(back.shape.dim) == [2, 3]
    assert list(back.data) == [0.5, -1.0, 2.0, 3.0, 4.0, 5.0]
    assert not back.HasField("num")


def test_blobproto_wire_bytes_match_caffe() -> None:
    # Packed float data (field 5) then packed int64 dims inside shape (field 7), as Caffe writes.
    blob = caffe_pb2.BlobProto(data=[1.0, 2.0])
    assert blob.SerializeToString() == b"\x2a\x08" + struct.pack("<2f", 1.0, 2.0)
    shaped = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3]))
    assert shaped.SerializeToString() == b"\x3a\x04\x0a\x02\x02\x03"
    datum = caffe_pb2.Datum(channels=3, height=1, width=1, data=b"\x01\x02\x03", label=7)
    assert datum.SerializeToString() == b"\x08\x03\x10\x01\x18\x01\x22\x03\x01\x02\x03\x28\x07"
