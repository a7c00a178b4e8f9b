"""Audit of issue 8: old net formats build.

A V1 prototxt (``layers { type: ENUM }`` with the deprecated ``input``/``input_dim`` fields)
using each V1LayerParameter.LayerType value builds a Net (and runs forward where its inputs
allow); a V0 net's padding layers fold into the pad of the conv/pool layer that reads them.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pycaffe_mpi import registry, upgrade
from pycaffe_mpi.datasets import datum_db
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter.LayerType

INPUTS = {"data": (2, 3, 6, 6), "vec": (2, 3, 1, 1), "label": (2, 1, 1, 1),
          "h": (1, 1, 3, 3)}

# V1 enum name -> (bottoms, number of tops, the layer's V1 parameter text); DIR is the test's
# temporary folder, where the data files are made
V1_LAYERS: dict[str, tuple[list[str], int, str]] = {
    "ABSVAL": (["data"], 1, ""),
    "ACCURACY": (["vec", "label"], 1, ""),
    "ARGMAX": (["vec"], 1, "argmax_param { top_k: 2 }"),
    "BNLL": (["data"], 1, ""),
    "CONCAT": (["data", "data"], 1, "concat_param { axis: 1 }"),
    "CONTRASTIVE_LOSS": (["vec", "vec", "label"], 1, "contrastive_loss_param { margin: 2 }"),
    "CONVOLUTION": (["data"], 1, "convolution_param { num_output: 2 kernel_size: 3 }"),
    "DATA": ([], 2, 'data_param { source: "DIR/lmdb" batch_size: 2 backend: LMDB }'),
    "DECONVOLUTION": (["data"], 1, "convolution_param { num_output: 2 kernel_size: 2 "
                      "stride: 2 }"),
    "DROPOUT": (["data"], 1, "dropout_param { dropout_ratio: 0.3 }"),
    "DUMMY_DATA": ([], 1, "dummy_data_param { shape { dim: 2 dim: 3 } }"),
    "EUCLIDEAN_LOSS": (["vec", "vec"], 1, ""),
    "ELTWISE": (["data", "data"], 1, "eltwise_param { operation: PROD }"),
    "EXP": (["data"], 1, "exp_param { base: 2 }"),
    "FLATTEN": (["data"], 1, ""),
    "HDF5_DATA": ([], 2, 'hdf5_data_param { source: "DIR/h5.txt" batch_size: 2 }'),
    "HDF5_OUTPUT": (["vec", "label"], 0, 'hdf5_output_param { file_name: "DIR/out.h5" }'),
    "HINGE_LOSS": (["vec", "label"], 1, "hinge_loss_param { norm: L2 }"),
    "IM2COL": (["data"], 1, "convolution_param { kernel_size: 3 }"),
    "IMAGE_DATA": ([], 2, 'image_data_param { source: "DIR/list.txt" root_folder: "DIR/" '
                   "batch_size: 2 }"),
    "INFOGAIN_LOSS": (["vec", "label", "h"], 1, ""),
    "INNER_PRODUCT": (["data"], 1, "inner_product_param { num_output: 2 }"),
    "LRN": (["data"], 1, "lrn_param { local_size: 3 }"),
    "MEMORY_DATA": ([], 2, "memory_data_param { batch_size: 2 channels: 3 height: 4 "
                    "width: 4 }"),
    "MULTINOMIAL_LOGISTIC_LOSS": (["vec", "label"], 1, ""),
    "MVN": (["data"], 1, "mvn_param { across_channels: true }"),
    "POOLING": (["data"], 1, "pooling_param { pool: AVE kernel_size: 2 stride: 2 }"),
    "POWER": (["data"], 1, "power_param { power: 2 shift: 1 }"),
    "RELU": (["data"], 1, "relu_param { negative_slope: 0.1 }"),
    "SIGMOID": (["data"], 1, ""),
    "SIGMOID_CROSS_ENTROPY_LOSS": (["vec", "vec"], 1, ""),
    "SILENCE": (["data"], 0, ""),
    "SOFTMAX": (["vec"], 1, ""),
    "SOFTMAX_LOSS": (["vec", "label"], 1, ""),
    "SPLIT": (["data"], 2, ""),
    "SLICE": (["data"], 3, "slice_param { axis: 1 }"),
    "TANH": (["data"], 1, ""),
    "WINDOW_DATA": ([], 2, 'window_data_param { source: "DIR/windows.txt" root_folder: '
                    '"DIR/" batch_size: 2 } transform_param { crop_size: 4 }'),
    "THRESHOLD": (["data"], 1, "threshold_param { threshold: 0.5 }"),
}
DATA_TYPES = {"DATA", "HDF5_DATA", "IMAGE_DATA", "WINDOW_DATA", "MEMORY_DATA", "DUMMY_DATA"}


def test_every_v1_type_is_audited() -> None:
    assert set(V1_LAYERS) == set(V1.DESCRIPTOR.values_by_name) - {"NONE"}
    for name in V1_LAYERS:
        assert upgrade.V1_TYPES[V1.Value(name)] in registry.layer_type_list(), name


def _data_files(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    datum_db.write_datum_lmdb(tmp / "lmdb", rng.integers(0, 255, (4, 3, 4, 4), dtype=np.uint8),
                              np.arange(4))
    with h5py.File(tmp / "a.h5", "w") as f:
        f["t0"] = rng.standard_normal((3, 2)).astype(np.float32)
        f["t1"] = np.arange(3, dtype=np.float32)
    (tmp / "h5.txt").write_text(f"{tmp / 'a.h5'}\n")
    Image.new("RGB", (10, 10), (100, 50, 20)).save(tmp / "img.png")
    (tmp / "list.txt").write_text("img.png 1\nimg.png 0\n")
    (tmp / "windows.txt").write_text("# 0\nimg.png\n3 10 10\n2\n1 0.9 0 0 3 3\n0 0.1 0 0 3 3\n")


def _v1_net(name: str, tmp: Path) -> str:
    bottoms, ntop, params = V1_LAYERS[name]
    lines = ['name: "v1"']
    if name not in DATA_TYPES:
        for blob, shape in INPUTS.items():
            lines.append(f'input: "{blob}"')
            lines += [f"input_dim: {d}" for d in shape]
    tops = [f'top: "t{i}"' for i in range(ntop)]
    lines.append(f'layers {{ name: "old" type: {name} '
                 + " ".join(f'bottom: "{b}"' for b in bottoms) + " " + " ".join(tops)
                 + " " + params.replace("DIR", str(tmp)) + " }")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(V1_LAYERS))
def test_v1_type_builds(tmp_path: Path, name: str) -> None:
    _data_files(tmp_path)
    path = tmp_path / "v1.prototxt"
    path.write_text(_v1_net(name, tmp_path))
    net = Net(str(path), 0, seed=1)
    layer = net.layer_dict["old"]
    assert layer.type == upgrade.V1_TYPES[V1.Value(name)]
    if name == "MEMORY_DATA":
        net.set_input_arrays(np.zeros((2, 3, 4, 4), np.float32), np.zeros(2, np.float32))
    if name in INPUT_VALUES_NEEDED:
        for blob, fill in INPUT_VALUES_NEEDED[name].items():
            net.blobs[blob].data[...] = fill
    net.forward()
    net.close()


# inputs whose zeros the layer refuses or cannot take (labels must index the scores, etc.)
INPUT_VALUES_NEEDED: dict[str, dict[str, float]] = {
    "MULTINOMIAL_LOGISTIC_LOSS": {"vec": 0.5},
}


V0_PADDED = """name: "v0"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 5 input_dim: 5
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 2 kernelsize: 3 } bottom: "pad1"
         top: "conv1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: MAX kernelsize: 3 stride: 1 }
         bottom: "pad2" top: "pool1" }
"""


def test_v0_padding_layers_fold_into_pad_and_the_net_builds(tmp_path: Path) -> None:
    path = tmp_path / "v0.prototxt"
    path.write_text(V0_PADDED)
    net = Net(str(path), 0, seed=1)
    assert list(net._layer_names) == ["input", "conv1", "pool1"]  # Caffe names it "input"
    conv = net.param.layer[1]
    pool = net.param.layer[2]
    assert list(conv.convolution_param.pad) == [2] and list(conv.bottom) == ["data"]
    assert pool.pooling_param.pad == 1 and list(pool.bottom) == ["conv1"]
    # 5 + 2·2 − 3 + 1 = 7; then 7 + 2·1 − 3 + 1 = 7
    assert net.blobs["conv1"].data.shape == (1, 2, 7, 7)
    assert net.blobs["pool1"].data.shape == (1, 2, 7, 7)
    net.forward()


# V0 type -> (bottoms, number of tops, the V0 layer's fields); the types that need no files
# (V0 "im2col" is left out: Caffe moves no kernel field to it, so no V0 im2col layer builds)
V0_LAYERS: dict[str, tuple[list[str], int, str]] = {
    "accuracy": (["vec", "label"], 1, ""),
    "bnll": (["data"], 1, ""),
    "concat": (["data", "data"], 1, "concat_dim: 1"),
    "conv": (["data"], 1, "num_output: 2 kernelsize: 3 stride: 1 pad: 1 group: 1 biasterm: true "
             'weight_filler { type: "xavier" }'),
    "dropout": (["data"], 1, "dropout_ratio: 0.2"),
    "euclidean_loss": (["vec", "vec"], 1, ""),
    "flatten": (["data"], 1, ""),
    "innerproduct": (["data"], 1, "num_output: 3 biasterm: false"),
    "lrn": (["data"], 1, "local_size: 3 alpha: 0.1 beta: 0.75"),
    "multinomial_logistic_loss": (["vec", "label"], 1, ""),
    "pool": (["data"], 1, "pool: AVE kernelsize: 2 stride: 2"),
    "relu": (["data"], 1, ""),
    "sigmoid": (["data"], 1, ""),
    "softmax": (["vec"], 1, ""),
    "softmax_loss": (["vec", "label"], 1, ""),
    "split": (["data"], 2, ""),
    "tanh": (["data"], 1, ""),
}


@pytest.mark.parametrize("v0_type", sorted(V0_LAYERS))
def test_v0_type_builds(tmp_path: Path, v0_type: str) -> None:
    bottoms, ntop, fields = V0_LAYERS[v0_type]
    lines = ['name: "v0"']
    for blob, shape in INPUTS.items():
        lines.append(f'input: "{blob}"')
        lines += [f"input_dim: {d}" for d in shape]
    lines.append(f'layers {{ layer {{ name: "old" type: "{v0_type}" {fields} }} '
                 + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
                 + " ".join(f'top: "t{i}"' for i in range(ntop)) + " }")
    path = tmp_path / "v0.prototxt"
    path.write_text("\n".join(lines) + "\n")
    net = Net(str(path), 0, seed=1)
    assert net.layer_dict["old"].type == upgrade.V1_TYPES[upgrade.V0_TYPES[v0_type]]
    if v0_type == "multinomial_logistic_loss":
        net.blobs["vec"].data[...] = 0.5
    net.forward()
