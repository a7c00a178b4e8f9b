"""The shipped models and Caffe-style nets build and run unchanged apart from data paths."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pycaffe_mpi import datasets
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.net import Net

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "cifar10_quick"

# LeNet as Caffe's MNIST example defines it (scale 1/256, 20/50 conv, 500 hidden).
LENET = """
name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "@DB@" batch_size: 64 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "@DB@" batch_size: 100 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" }
    bias_filler { type: "constant" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" }
    bias_filler { type: "constant" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    datasets.write_datum_lmdb(d / "c10", rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8),
                              rng.integers(0, 10, 12))
    datasets.write_datum_lmdb(d / "mnist", rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 12))
    io.write_binaryproto(d / "mean.binaryproto", np.full((1, 3, 32, 32), 120.0), legacy=True)
    return d


def _localise(text: str, db: Path, mean: Path) -> str:
    text = re.sub(r'source: "[^"]*"', f'source: "{db}"', text)
    return re.sub(r'mean_file: "[^"]*"', f'mean_file: "{mean}"', text)


@pytest.mark.parametrize("name", ["train_test.prototxt", "train_test_b350.prototxt"])
def test_cifar10_quick_builds_and_runs(name, data, tmp_path):
    f = tmp_path / name
    f.write_text(_localise((MODELS / name).read_text(), data / "c10",
                           data / "mean.binaryproto"))
    train = Net(str(f), 0, seed=1)
    loss = train.forward_backward()
    assert abs(loss - np.log(10)) < 0.05  # std 1e-4 conv1 weights: near-uniform scores
    shapes = {k: v.shape for k, v in train.blobs.items()}
    batch = 100 if name == "train_test.prototxt" else 350
    assert shapes["conv1"] == (batch, 32, 32, 32) and shapes["pool1"] == (batch, 32, 16, 16)
    assert shapes["pool2"] == (batch, 32, 8, 8) and shapes["pool3"] == (batch, 64, 4, 4)
    assert [p.shape for p in train.params["conv1"]] == [(32, 3, 5, 5), (32,)]
    test = Net(str(f), 1, seed=1)
    out = test.forward()
    assert set(out) == {"accuracy", "loss"} and 0 <= float(out["accuracy"]) <= 1
    train.close()
    test.close()


def test_cifar10_quick_deploy_gives_probabilities():
    net = Net(str(MODELS / "deploy.prototxt"), 1, seed=0)
    prob = net.forward(data=np.random.default_rng(0).standard_normal((1, 3, 32, 32)))["prob"]
    assert prob.shape == (1, 10) and abs(float(prob.sum()) - 1) < 1e-5


def test_lenet_builds_and_runs(data, tmp_path):
    f = tmp_path / "lenet.prototxt"
    f.write_text(LENET.replace("@DB@", str(data / "mnist")))
    net = Net(str(f), 0, seed=2)
    net.forward_backward()
    assert net.blobs["pool2"].shape == (64, 50, 4, 4) and net.blobs["ip1"].shape == (64, 500)
    net.close()


@pytest.mark.parametrize("solver", sorted(p.name for p in MODELS.glob("solver*.prototxt")))
def test_solver_files_parse_and_point_at_shipped_nets(solver):
    from pycaffe_mpi import solvers

    param = solvers.read_solver_param(str(MODELS / solver))
    assert (ROOT / param.net).is_file()
    assert param.max_iter in (4000, 5000) and param.momentum == pytest.approx(0.9)
