"""Layer cases for the MPI comm family: MPIBroadcast and MPIGather in a one-member group.

The generic suite builds a layer without a Net, so no group communicator is set and the layers
fall back to the size-1 :class:`pycaffe_mpi.comm.SelfComm` with root 0 (Broadcast: top = bottom,
gradient = top diff; Gather: one top = the bottom). The real multi-rank behaviour is tested by
launching ``mpiexec`` in ``tests/mpi``.
"""

from __future__ import annotations

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case


def _identity(bottoms, layer):
    return [np.array(bottoms[0], copy=True)]


add_case(LayerCase(type="MPIBroadcast", id="self_4d", proto="mpi_param { root: 0 }",
                   bottoms=[(2, 3, 2, 2)], reference=_identity, in_place=True))
add_case(LayerCase(type="MPIBroadcast", id="self_1d", bottoms=[(5,)], reference=_identity))
add_case(LayerCase(type="MPIBroadcast", id="self_5d", bottoms=[(2, 1, 2, 3, 2)],
                   reference=_identity))
add_case(LayerCase(type="MPIGather", id="self_2d", proto="mpi_param { root: 0 }",
                   bottoms=[(3, 4)], reference=_identity))
add_case(LayerCase(type="MPIGather", id="self_5d", bottoms=[(1, 2, 2, 3, 2)],
                   reference=_identity, in_place=True))
