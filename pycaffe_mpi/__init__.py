"""pycaffe-mpi: Caffe-compatible declarative deep learning in Python, with MPI model parallelism.

The Python face follows pycaffe::

    import pycaffe_mpi as caffe
    from pycaffe_mpi import layers as L, params as P
    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="model.caffemodel")
    solver = caffe.get_solver("solver.prototxt")

Every pycaffe name lives in :mod:`pycaffe_mpi.pycaffe` (also what ``import caffe`` gives Python
layers); the package forwards to it, so ``pycaffe_mpi.X is pycaffe_mpi.pycaffe.X``. Neither CuPy
nor mpi4py is needed to import the package.
"""

from __future__ import annotations

from typing import Any

from pycaffe_mpi import _threads

# before NumPy (imported below) loads OpenBLAS: under mpiexec, share the cores between ranks
_threads.share_cores_between_ranks()

from pycaffe_mpi import pycaffe as _face  # noqa: E402
from pycaffe_mpi.pycaffe import (  # noqa: E402
    TEST,
    TRAIN,
    Layer,
    Settings,
    layer_type_list,
    proto,
    register_layer,
    set_device,
    set_mode_cpu,
    set_mode_gpu,
    set_random_seed,
)

__version__ = "0.1.0"

__all__ = ["TEST", "TRAIN", "Layer", "Settings", "layer_type_list", "proto", "register_layer",
           "set_device", "set_mode_cpu", "set_mode_gpu", "set_random_seed", "settings",
           *_face.LAZY]


def __getattr__(name: str) -> Any:
    # NOTE: nothing is cached here: ``settings`` (replaceable in tests) and the lazy names are
    # always the pycaffe module's own objects.
    if name == "settings":
        return _face.settings
    return _face.lazy_attribute(name, "pycaffe_mpi")


def __dir__() -> list[str]:
    return sorted([*globals(), *_face.LAZY, "settings"])
