"""pycaffe-mpi: Caffe-compatible declarative deep learning in Python, with MPI model parallelism.

The Python face follows pycaffe::

    import pycaffe_mpi as caffe
    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="model.caffemodel")
    solver = caffe.get_solver("solver.prototxt")

Neither CuPy nor mpi4py is needed to import the package.
"""

from __future__ import annotations

from typing import Any

from pycaffe_mpi import _threads

# before NumPy (imported below) loads OpenBLAS: under mpiexec, share the cores between ranks
_threads.share_cores_between_ranks()

from pycaffe_mpi.layer import TEST, TRAIN, Layer  # noqa: E402
from pycaffe_mpi.registry import layer_type_list, register_layer  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "Net": ("pycaffe_mpi.net", "Net"),
    "Blob": ("pycaffe_mpi.blob", "Blob"),
    "get_solver": ("pycaffe_mpi.solvers", "get_solver"),
    "Solver": ("pycaffe_mpi.solvers", "Solver"),
    "SGDSolver": ("pycaffe_mpi.solvers", "SGDSolver"),
    "NesterovSolver": ("pycaffe_mpi.solvers", "NesterovSolver"),
    "AdaGradSolver": ("pycaffe_mpi.solvers", "AdaGradSolver"),
    "RMSPropSolver": ("pycaffe_mpi.solvers", "RMSPropSolver"),
    "AdaDeltaSolver": ("pycaffe_mpi.solvers", "AdaDeltaSolver"),
    "AdamSolver": ("pycaffe_mpi.solvers", "AdamSolver"),
    "io": ("pycaffe_mpi.io", None),
}

__all__ = ["TEST", "TRAIN", "Layer", "layer_type_list", "register_layer", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pycaffe_mpi' has no attribute {name!r}")
    import importlib

    mod_name, attr = _LAZY[name]
    mod = importlib.import_module(mod_name)
    return mod if attr is None else getattr(mod, attr)
