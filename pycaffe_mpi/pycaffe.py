"""What ``import caffe`` gives pycaffe code when no other Caffe is installed.

A BVLC pycaffe layer module (``import caffe`` then ``class MyLoss(caffe.Layer)``) runs unchanged:
before a ``type: "Python"`` layer imports its module, ``caffe``, ``caffe.proto`` and
``caffe.proto.caffe_pb2`` are aliased to this module, :mod:`pycaffe_mpi.proto` and its
``caffe_pb2`` (:func:`pycaffe_mpi.layer_types.python.install_caffe_alias`; never when another
``caffe`` is importable).

Provided: ``Layer`` (= :class:`pycaffe_mpi.layer.Layer`), ``TRAIN`` = 0, ``TEST`` = 1,
``layer_type_list()``, ``proto``; loaded on first use (PEP 562): ``Net``, ``SGDSolver``,
``NesterovSolver``, ``AdaGradSolver``, ``RMSPropSolver``, ``AdaDeltaSolver``, ``AdamSolver``,
``get_solver`` and ``io``; and the mode setters below. Anything else of pycaffe (NetSpec,
``caffe.layers``/``params``, NCCL, Classifier, Detector, draw, ...) raises AttributeError
saying it is not provided, rather than pretending.

Mode settings: ``set_mode_cpu()``, ``set_mode_gpu()``, ``set_device(i)`` and
``set_random_seed(s)`` record the choice in :data:`settings`, a :class:`Settings` object (fields
``mode`` "cpu"/"gpu", ``device_id``, ``random_seed`` (None = unset)). It is the only state
here; the Net and solvers read it for their defaults (``settings.backend()`` gives the chosen
:class:`~pycaffe_mpi.backend.Backend`). ``set_mode_gpu``/``set_device`` fail at once, with the
reason, when no usable GPU is present (BVLC fails later, on first use).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from pycaffe_mpi import backend as _backend
from pycaffe_mpi import errors as _errors
from pycaffe_mpi import layer as _layer
from pycaffe_mpi import proto
from pycaffe_mpi import registry as _registry
from pycaffe_mpi.proto import caffe_pb2 as _caffe_pb2  # noqa: F401  (caffe.proto.caffe_pb2)

Layer = _layer.Layer
TRAIN = 0
TEST = 1
layer_type_list = _registry.layer_type_list

__all__ = ["TEST", "TRAIN", "Layer", "Settings", "layer_type_list", "proto", "set_device",
           "set_mode_cpu", "set_mode_gpu", "set_random_seed", "settings"]


@dataclasses.dataclass
class Settings:
    """pycaffe's global mode, as set by ``caffe.set_mode_*``/``set_device``/``set_random_seed``."""

    mode: str = "cpu"
    device_id: int = 0
    random_seed: int | None = None

    def backend(self) -> _backend.Backend:
        """The Backend these settings select (the CPU unless ``set_mode_gpu`` was called)."""
        return _backend.Backend("gpu", self.device_id) if self.mode == "gpu" else _backend.CPU


settings = Settings()


def set_mode_cpu() -> None:
    settings.mode = "cpu"


def set_mode_gpu() -> None:
    if not _backend.gpu_available():
        raise _errors.PycaffeError("caffe.set_mode_gpu(): no usable GPU (CuPy and a CUDA "
                                   "device are needed; install the 'gpu' extra)")
    settings.mode = "gpu"


def set_device(device_id: int) -> None:
    n = _backend.gpu_count()
    if not 0 <= int(device_id) < n:
        raise _errors.PycaffeError(f"caffe.set_device({device_id}): "
                                   + (f"there are {n} GPU(s)" if n else "no usable GPU"))
    settings.device_id = int(device_id)


def set_random_seed(seed: int) -> None:
    settings.random_seed = int(seed)


# name -> (module, attribute); imported on first access.
_LAZY = {
    "Net": ("pycaffe_mpi.net", "Net"),
    "io": ("pycaffe_mpi.io", None),
    "get_solver": ("pycaffe_mpi.solvers", "get_solver"),
    **{n: ("pycaffe_mpi.solvers", n) for n in (
        "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
        "AdamSolver")},
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"caffe.{name} is not provided by pycaffe-mpi's caffe module "
                             f"(it offers: {', '.join(sorted([*__all__, *_LAZY]))})")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
