"""Comm layers in one process (no mpiexec): the world is the size-1 SelfComm, Broadcast is a
copy and Gather has one top."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import comm, errors
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

NET = """
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 } } }
layer { name: "bc" type: "MPIBroadcast" bottom: "x" top: "y" include { mpi_rank: 0 } }
layer { name: "g" type: "MPIGather" bottom: "y" top: "z" mpi_param { root: 0 } }
"""
ELSEWHERE = ('layer { name: "elsewhere" type: "MPIGather" bottom: "x" top: "w" '
             "include { mpi_rank: 1 } }")



def test_single_process_net_with_comm_layers():
    net = Net(text_format.Merge(NET, caffe_pb2.NetParameter()), 0, dtype=np.float64,
              comm=comm.SelfComm())
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


def test_net_needing_more_ranks_says_how_to_start_it():
    """A layer for rank 1 in a single process: the net needs mpiexec with 2 ranks."""
    with pytest.raises(errors.NetError, match=r'layer "elsewhere".*needs 2 MPI ranks.*'
                                              r"mpiexec -n 2"):
        Net(text_format.Merge(NET + ELSEWHERE, caffe_pb2.NetParameter()), 0,
            comm=comm.SelfComm())


def test_rank_outside_the_world_names_layer_and_size():
    from pycaffe_mpi.comm import plan

    param = text_format.Merge(NET + ELSEWHERE.replace("mpi_rank: 1", "mpi_rank: 5"),
                              caffe_pb2.NetParameter())
    with pytest.raises(errors.NetError, match=r'"elsewhere".*rank 5, outside this job of 3 '):
        plan.check_world(param, 3)
    plan.check_world(param, 6)
