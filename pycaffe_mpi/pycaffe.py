"""pycaffe's ``caffe`` module: the one owner of the face ``import pycaffe_mpi as caffe`` shows.

The package :mod:`pycaffe_mpi` forwards every name it does not define itself to this module, and
a BVLC pycaffe layer module (``import caffe`` then ``class MyLoss(caffe.Layer)``) runs unchanged:
before a ``type: "Python"`` layer imports its module, ``caffe``, ``caffe.proto`` and
``caffe.proto.caffe_pb2`` are aliased to this module, :mod:`pycaffe_mpi.proto` and its
``caffe_pb2`` (:func:`pycaffe_mpi.layer_types.python.install_caffe_alias`; never when another
``caffe`` is importable). So ``caffe.X`` is the same object whichever way it was reached.

Provided at once: ``Layer`` (= :class:`pycaffe_mpi.layer.Layer`), ``TRAIN`` = 0, ``TEST`` = 1,
``layer_type_list()``, ``proto`` and the mode setters below. Loaded on first use (PEP 562), so
importing the package stays cheap: ``Net``, ``Blob``, ``SGDSolver``, ``NesterovSolver``,
``AdaGradSolver``, ``RMSPropSolver``, ``AdaDeltaSolver``, ``AdamSolver``, ``get_solver``, ``io``,
``NetSpec``, ``layers``, ``params``, ``to_proto``, ``Classifier`` and ``Detector``. The rest of
pycaffe (``NCCL``, ``Timer``, ``draw``, ``init_log``, ``solver_count``, ...) raises
AttributeError saying it is not provided, rather than pretending.

Mode settings: ``set_mode_cpu()``, ``set_mode_gpu()``, ``set_device(i)`` and
``set_random_seed(s)`` record the choice in :data:`settings`, a :class:`Settings` object (fields
``mode`` "cpu"/"gpu", ``device_id``, ``random_seed`` (None = unset)). It is the only state
here; ``settings.backend()`` gives the chosen :class:`~pycaffe_mpi.backend.Backend`. As in
pycaffe, they are the defaults of every ``Net`` and ``Solver`` built afterwards: a Net or Solver
given no ``backend`` runs on ``settings.backend()``; a Net given no ``seed`` takes the next
seed of the stream ``random_seed`` starts (``settings.next_seed()``: reproducible from run to
run, different from net to net, as Caffe's global generator), and a Solver whose file sets no
``random_seed`` uses ``random_seed`` (plus the MPI rank).
``set_mode_gpu``/``set_device`` fail at once, with the reason, when no usable GPU is present
(BVLC fails later, on first use).
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
register_layer = _registry.register_layer

__all__ = ["TEST", "TRAIN", "Layer", "Settings", "layer_type_list", "proto", "register_layer",
           "set_device", "set_mode_cpu", "set_mode_gpu", "set_random_seed", "settings"]

#: names defined in this module itself (the package imports these eagerly)
EAGER = __all__


@dataclasses.dataclass
class Settings:
    """pycaffe's global mode, as set by ``caffe.set_mode_*``/``set_device``/``set_random_seed``."""

    mode: str = "cpu"
    device_id: int = 0
    random_seed: int | None = None
    #: seeds handed out since ``random_seed`` was set (see :meth:`next_seed`)
    draws: int = 0

    def backend(self) -> _backend.Backend:
        """The Backend these settings select (the CPU unless ``set_mode_gpu`` was called)."""
        return _backend.Backend("gpu", self.device_id) if self.mode == "gpu" else _backend.CPU

    def next_seed(self) -> int | None:
        """The seed of the next Net built without one: None when no seed was set; else the
        ``draws``-th value of a stream fixed by ``random_seed``. As with Caffe's global
        generator, a script gives the same nets on every run, but two nets differ."""
        if self.random_seed is None:
            return None
        import numpy as np

        self.draws += 1
        seq = np.random.SeedSequence([self.random_seed, self.draws])
        return int(seq.generate_state(1, np.uint32)[0])


settings = Settings()


def set_mode_cpu() -> None:
    """Run on the CPU (the default)."""
    settings.mode = "cpu"


def set_mode_gpu() -> None:
    """Run on the GPU chosen by :func:`set_device`; fails now when none is usable."""
    if not _backend.gpu_available():
        raise _errors.PycaffeError("caffe.set_mode_gpu(): no usable GPU (CuPy and a CUDA "
                                   "device are needed; install the 'gpu' extra)")
    settings.mode = "gpu"


def set_device(device_id: int) -> None:
    """Choose the CUDA device used in GPU mode."""
    n = _backend.gpu_count()
    if not 0 <= int(device_id) < n:
        raise _errors.PycaffeError(f"caffe.set_device({device_id}): "
                                   + (f"there are {n} GPU(s)" if n else "no usable GPU"))
    settings.device_id = int(device_id)


def set_random_seed(seed: int) -> None:
    """Record the seed nets and solvers use when they are given none."""
    settings.random_seed = int(seed)
    settings.draws = 0


# name -> (module, attribute or None for the module itself); imported on first access.
LAZY: dict[str, tuple[str, str | None]] = {
    "Net": ("pycaffe_mpi.net", "Net"),
    "Blob": ("pycaffe_mpi.blob", "Blob"),
    "io": ("pycaffe_mpi.io", None),
    "get_solver": ("pycaffe_mpi.solvers", "get_solver"),
    "Solver": ("pycaffe_mpi.solvers", "Solver"),
    **{n: ("pycaffe_mpi.solvers", n) for n in (
        "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
        "AdamSolver")},
    **{n: ("pycaffe_mpi.net_spec", n) for n in ("NetSpec", "layers", "params", "to_proto")},
    "Classifier": ("pycaffe_mpi.classifier", "Classifier"),
    "Detector": ("pycaffe_mpi.classifier", "Detector"),
}


def lazy_attribute(name: str, owner: str = "caffe") -> Any:
    """Import and return the lazily loaded ``name`` (AttributeError naming ``owner`` if none)."""
    if name not in LAZY:
        raise AttributeError(f"{owner}.{name} is not provided by pycaffe-mpi's caffe module "
                             f"(it offers: {', '.join(sorted([*EAGER, *LAZY]))})")
    module, attr = LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


def __getattr__(name: str) -> Any:
    value = lazy_attribute(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY])
