"""Comm layers in one process (no mpiexec): the world is the size-1 SelfComm, Broadcast is a
copy and Gather has one top."""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from pycaffe_mpi import comm
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

NET = """
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 } } }
layer { name: "bc" type: "MPIBroadcast" bottom: "x" top: "y" include { mpi_rank: 0 } }
layer { name: "g" type: "MPIGather" bottom: "y" top: "z" mpi_param { root: 0 } }
layer { name: "elsewhere" type: "MPIGather" bottom: "x" top: "w" include { mpi_rank: 1 } }
"""


def test_single_process_net_with_comm_layers():
    net = Net(text_format.Merge(NET, caffe_pb2.NetParameter()), 0, dtype=np.float64,
              comm=comm.SelfComm())
    assert "elsewhere" not in net.layer_dict  # its only rank does not exist here
    x = np.random.default_rng(0).standard_normal((2, 3, 2))
    net.blobs["x"].data[...] = x
    net.forward_loss()
    np.testing.assert_array_equal(net.blobs["y"].data, x)
    np.testing.assert_array_equal(net.blobs["z"].data, x)
    dz = np.random.default_rng(1).standard_normal((2, 3, 2))
    net.blobs["z"].diff[...] = dz
    net.backward_all()
    np.testing.assert_array_equal(net.blobs["x"].diff, dz)
    net.blobs["x"].reshape(4, 1)  # a new shape flows through both layers
    net.forward_loss()
    assert net.blobs["z"].shape == (4, 1)
