"""Benchmark nets: a model file with its Data layers swapped for synthetic DummyData."""

from __future__ import annotations

from google.protobuf import text_format

from pycaffe_mpi import prototxt
from pycaffe_mpi.proto import caffe_pb2


def with_dummy_data(path: str, batch: int) -> caffe_pb2.NetParameter:
    """The net at ``path`` with its TRAIN Data layer replaced by DummyData of CIFAR-10's shape
    (same tops, same include rules, so MPI rank rules still hold) and its TEST Data dropped."""
    param, _ = prototxt.read_net(path)
    layers = []
    for lp in param.layer:
        if lp.type != "Data":
            layers.append(lp)
            continue
        if any(r.HasField("phase") and r.phase == caffe_pb2.TEST for r in lp.include):
            continue
        dummy = text_format.Merge(f"""
            name: "{lp.name}" type: "DummyData" top: "data" top: "label"
            dummy_data_param {{
              shape {{ dim: {batch} dim: 3 dim: 32 dim: 32 }} shape {{ dim: {batch} }}
              data_filler {{ type: "gaussian" std: 50 }}
              data_filler {{ type: "uniform" min: 0 max: 9.99 }}
            }}""", caffe_pb2.LayerParameter())
        dummy.include.extend(lp.include)
        layers.append(dummy)
    del param.layer[:]
    param.layer.extend(layers)
    return param
