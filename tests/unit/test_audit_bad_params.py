"""Audit of issue 8: a bad parameter of each new layer type, written in a prototxt FILE and
built into a Net, is an error naming the file:line, the layer's name, its type and the field.

Each value is one that BVLC Caffe's CHECKs reject (the comment names the CHECK). Types without
a checked parameter (BNLL, ELU, Power, Swish, Threshold, Silence, LSTMUnit, Parameter, MVN,
BatchReindex) are covered by the topology/shape checks of their own tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pycaffe_mpi
from pycaffe_mpi import errors
from pycaffe_mpi.net import Net

# (type, the layer's parameter text, bottom shapes, the field the error must name)
BAD = [
    # AbsVal: CHECK_NE(top[0], bottom[0]) "does not allow in-place computation"
    ("AbsVal", "", [(2, 3)], "top", True),
    # ArgMax: CHECK_GE(top_k, 1)
    ("ArgMax", "argmax_param { top_k: 0 }", [(2, 3)], "argmax_param.top_k", False),
    # BatchNorm: CHECK_EQ(param(i).lr_mult(), 0) "Cannot configure batch normalization
    # statistics as layer parameters"
    ("BatchNorm", "param { lr_mult: 1 }", [(2, 3, 4, 4)], "param", False),
    # Bias: axis out of range (CanonicalAxisIndex)
    ("Bias", "bias_param { axis: 5 }", [(2, 3, 4, 4)], "bias_param.axis", False),
    # Clip: clip_param's min and max are required
    ("Clip", "clip_param { min: 1 }", [(2, 3)], "clip_param.max", False),
    # Crop: CHECK_EQ(offset_size, num cropped axes) when more than one offset is given
    ("Crop", "crop_param { axis: 2 offset: 1 offset: 1 offset: 1 }", [(2, 3, 6, 6), (2, 3, 4, 4)],
     "crop_param.offset", False),
    # Deconvolution: CHECK_GT(kernel dims, 0) "Filter dimensions must be nonzero"
    ("Deconvolution", "convolution_param { num_output: 2 kernel_size: 0 }", [(2, 3, 4, 4)],
     "convolution_param.kernel_size", False),
    # Embed: CHECK_GT(input_dim, 0)
    ("Embed", "embed_param { num_output: 2 input_dim: 0 }", [(3,)], "embed_param.input_dim",
     False),
    # Exp: CHECK_GT(base, 0) unless base == -1
    ("Exp", "exp_param { base: -2 }", [(2, 3)], "exp_param.base", False),
    # Log: CHECK_GT(base, 0) unless base == -1
    ("Log", "log_param { base: 0 }", [(2, 3)], "log_param.base", False),
    # Im2col: CHECK_GT(kernel dims, 0)
    ("Im2col", "convolution_param { kernel_size: 0 }", [(2, 3, 4, 4)],
     "convolution_param.kernel_size", False),
    # InfogainLoss: CHECK(has_source()) "Infogain matrix source must be specified"
    ("InfogainLoss", "", [(2, 3), (2,)], "infogain_loss_param.source", False),
    # HDF5Data: the source list must be readable (LOG(FATAL) "Failed to open source file")
    ("HDF5Data", 'hdf5_data_param { source: "/nonexistent/list.txt" batch_size: 2 }', [],
     "hdf5_data_param.source", False),
    # LSTM / RNN: CHECK_GT(num_output, 0) "num_output must be positive"
    ("LSTM", "recurrent_param { num_output: 0 }", [(3, 2, 4), (3, 2)],
     "recurrent_param.num_output", False),
    ("RNN", "recurrent_param { num_output: 0 }", [(3, 2, 4), (3, 2)],
     "recurrent_param.num_output", False),
    # MemoryData: CHECK_GT(batch_size * channels * height * width, 0)
    ("MemoryData", "memory_data_param { batch_size: 0 channels: 1 height: 2 width: 2 }", [],
     "memory_data_param.batch_size", False),
    # PReLU: CHECK_GE(bottom num_axes, 2) "Number of axes of bottom blob must be >=2"; and an
    # unknown filler is Caffe's "Unknown filler name"
    ("PReLU", 'prelu_param { filler { type: "nosuch" } }', [(2, 3)], "prelu_param.filler",
     False),
    # Reduction: axis out of range (CanonicalAxisIndex)
    ("Reduction", "reduction_param { axis: 4 }", [(2, 3)], "reduction_param.axis", False),
    # Scale: CHECK_GE(num_axes, -1)
    ("Scale", "scale_param { num_axes: -2 }", [(2, 3, 4, 4)], "scale_param.num_axes", False),
    # SPP: pooling over a pyramid needs at least one level
    ("SPP", "spp_param { pyramid_height: 0 }", [(2, 3, 4, 4)], "spp_param.pyramid_height",
     False),
    # Tile: CHECK_GT(tiles, 0) "Number of tiles must be positive"
    ("Tile", "tile_param { tiles: 0 }", [(2, 3)], "tile_param.tiles", False),
    # ImageData: new_height and new_width set together
    ("ImageData", 'image_data_param { source: "LIST" batch_size: 1 new_height: 4 }', [],
     "image_data_param.new_height", False),
    # WindowData: CHECK_GT(crop_size, 0) "crop_size must be positive"
    ("WindowData", 'window_data_param { source: "LIST" batch_size: 2 }', [],
     "crop_size", False),
    # ContrastiveLoss: CHECK_EQ(bottom[0]->channels(), bottom[1]->channels())
    ("ContrastiveLoss", "", [(2, 3), (2, 4), (2,)], "bottom", False),
    # HingeLoss: the label bottom holds one label per item (Caffe's bottom checks)
    ("HingeLoss", "", [(2, 3), (3,)], "bottom", False),
    # SigmoidCrossEntropyLoss: CHECK_EQ(count) "inputs must have the same count"
    ("SigmoidCrossEntropyLoss", "", [(2, 3), (2, 4)], "bottom", False),
    # Filter: CHECK_EQ(top.size(), bottom.size() - 1)
    ("Filter", "", [(2, 3), (2,), (2,)], "top", False),
]


def _write(tmp_path: Path, type_: str, params: str, shapes: list[tuple[int, ...]],
           in_place: bool) -> tuple[Path, int]:
    params = params.replace("LIST", str(tmp_path / "list.txt"))
    (tmp_path / "list.txt").write_text("")
    lines = ['name: "audit"']
    bottoms = [f"b{i}" for i in range(len(shapes))]
    if shapes:
        lines.append('layer { name: "input" type: "Input"')
        lines += [f'  top: "{b}"' for b in bottoms]
        lines.append("  input_param {")
        lines += ["    shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in shapes]
        lines += ["  }", "}"]
    line = len(lines) + 1
    tops = bottoms[:1] if in_place else ["t0"]
    if type_ in {"HDF5Data", "ImageData", "MemoryData", "WindowData", "LSTMUnit"}:
        tops = ["t0", "t1"]
    if type_ == "HDF5Output":
        tops = []
    lines.append(f'layer {{ name: "bad_{type_.lower()}" type: "{type_}"')
    lines += [f'  bottom: "{b}"' for b in bottoms] + [f'  top: "{t}"' for t in tops]
    lines += [f"  {params}", "}"]
    path = tmp_path / "net.prototxt"
    path.write_text("\n".join(lines) + "\n")
    return path, line


@pytest.mark.parametrize(("type_", "params", "shapes", "field", "in_place"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_parameter_is_located(tmp_path: Path, type_: str, params: str,
                                  shapes: list[tuple[int, ...]], field: str,
                                  in_place: bool) -> None:
    path, line = _write(tmp_path, type_, params, shapes, in_place)
    with pytest.raises(errors.PycaffeError) as info:
        Net(str(path), pycaffe_mpi.TRAIN)
    msg = str(info.value)
    assert f"{path}:{line}" in msg, msg
    assert f'"bad_{type_.lower()}"' in msg, msg
    assert re.search(rf"\b{type_}\b", msg), msg
    assert field in msg, msg


def test_fork_layer_type_is_named_as_not_bvlc(tmp_path: Path) -> None:
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 '
                    'dim: 2 dim: 4 dim: 4 } } }\n'
                    'layer { name: "up" type: "Upsample" bottom: "x" top: "y" }\n')
    with pytest.raises(errors.PycaffeError) as info:
        Net(str(path), 0)
    msg = str(info.value)
    assert f"{path}:2" in msg and '"up"' in msg and "Upsample" in msg, msg
    assert "BVLC" in msg, msg


# More of Caffe's CHECKs on parameters and bottom shapes, each located the same way.
MORE = [
    ("ArgMax", "argmax_param { axis: 1 top_k: 4 }", [(2, 3)], "argmax_param.top_k", False),
    ("Bias", "bias_param { num_axes: -2 }", [(2, 3, 4)], "bias_param.num_axes", False),
    ("Scale", "scale_param { axis: 1 num_axes: 3 }", [(2, 3, 4)], "scale_param.num_axes",
     False),
    ("Crop", "crop_param { axis: 4 }", [(2, 3, 6, 6), (2, 3, 4, 4)], "crop_param.axis", False),
    ("Crop", "crop_param { axis: 1 offset: 0 offset: 1 }", [(2, 3, 6, 6), (2, 3, 4, 4)],
     "crop_param.offset", False),
    ("Tile", "", [(2, 3)], "tile_param.tiles", False),  # CHECK(has_tiles())
    ("ImageData", 'image_data_param { source: "LIST" batch_size: 0 }', [],
     "image_data_param.batch_size", False),
    ("HDF5Output", 'hdf5_output_param { file_name: "LIST.h5" }', [(2, 3), (3,)], "bottom",
     False),
    ("Im2col", "convolution_param { kernel_size: 3 kernel_h: 3 kernel_w: 3 }", [(2, 3, 4, 4)],
     "convolution_param.kernel_size", False),
    ("Im2col", "convolution_param { kernel_size: 3 stride: 0 }", [(2, 3, 4, 4)],
     "convolution_param.stride", False),
    ("Deconvolution", "convolution_param { num_output: 4 kernel_size: 2 group: 3 }",
     [(2, 6, 4, 4)], "convolution_param.group", False),
    ("Deconvolution", "convolution_param { kernel_size: 2 }", [(2, 3, 4, 4)],
     "convolution_param.num_output", False),
    ("LSTM", "recurrent_param { num_output: 3 }", [(3, 2, 4), (3, 2), (3, 5)], "bottom[2]",
     False),
    ("LSTMUnit", "", [(1, 2, 3), (1, 2, 10), (1, 2)], "bottom[1]", False),
    ("Filter", "", [(2, 3), (2, 2)], "bottom", False),
    ("Log", "log_param { base: 1 }", [(2, 3)], "log_param.base", False),
    ("ContrastiveLoss", "", [(2, 3), (2, 3), (2, 2)], "bottom[2]", False),
    ("Embed", "embed_param { input_dim: 3 }", [(2,)], "embed_param.num_output", False),
    ("InfogainLoss", "loss_param { normalize: true }", [(2, 3), (2,), (1, 1, 3, 3)],
     "loss_param.normalize", False),
    ("MVN", "", [(2, 3, 4, 4, 4)], "bottom", False),
    ("PReLU", "prelu_param { channel_shared: true }", [(2,)], "bottom", False),
    ("BatchReindex", "", [(2, 3), (2, 2)], "bottom", False),
]


@pytest.mark.parametrize(("type_", "params", "shapes", "field", "in_place"), MORE,
                         ids=[f"{m[0]}-{m[3]}-{i}" for i, m in enumerate(MORE)])
def test_more_bad_values_are_located(tmp_path: Path, type_: str, params: str,
                                     shapes: list[tuple[int, ...]], field: str,
                                     in_place: bool) -> None:
    test_bad_parameter_is_located(tmp_path, type_, params, shapes, field, in_place)
