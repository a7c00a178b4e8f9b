"""Benchmark nets: a model file with its Data layers swapped for synthetic inputs."""

from __future__ import annotations

from google.protobuf import text_format

from pycaffe_mpi import prototxt
from pycaffe_mpi.proto import caffe_pb2


def _swap_data(path: str, make) -> caffe_pb2.NetParameter:
    """The net at ``path`` with its TRAIN Data layer replaced by ``make(layer)`` (keeping its
    include rules, so MPI rank rules still hold) and its TEST Data dropped."""
    param, _ = prototxt.read_net(path)
    layers = []
    for lp in param.layer:
        if lp.type != "Data":
            layers.append(lp)
            continue
        if any(r.HasField("phase") and r.phase == caffe_pb2.TEST for r in lp.include):
            continue
        new = make(lp)
        new.include.extend(lp.include)
        layers.append(new)
    del param.layer[:]
    param.layer.extend(layers)
    return param


def with_dummy_data(path: str, batch: int, classes: int = 10) -> caffe_pb2.NetParameter:
    """The net at ``path`` with DummyData of CIFAR's shape (3x32x32, labels in [0, classes))
    in place of its TRAIN Data layer; the data are drawn again at every forward."""
    return _swap_data(path, lambda lp: text_format.Merge(f"""
        name: "{lp.name}" type: "DummyData" top: "data" top: "label"
        dummy_data_param {{
          shape {{ dim: {batch} dim: 3 dim: 32 dim: 32 }} shape {{ dim: {batch} }}
          data_filler {{ type: "gaussian" std: 50 }}
          data_filler {{ type: "uniform" min: 0 max: {classes - 0.01} }}
        }}""", caffe_pb2.LayerParameter()))


def with_input_data(path: str, batch: int) -> caffe_pb2.NetParameter:
    """The net at ``path`` with an Input layer of CIFAR's shape (data 3x32x32, label) in place
    of its TRAIN Data layer: the caller fills the blobs once, so a timed step holds no data
    generation (a baseline fed fixed tensors pays none either)."""
    return _swap_data(path, lambda lp: text_format.Merge(f"""
        name: "{lp.name}" type: "Input" top: "data" top: "label"
        input_param {{ shape {{ dim: {batch} dim: 3 dim: 32 dim: 32 }} shape {{ dim: {batch} }} }}
        """, caffe_pb2.LayerParameter()))
