"""Device choice: NumPy on the CPU, CuPy on a GPU. The only module that imports CuPy.

Layers never import an array library themselves; they use ``self.xp`` (this module's
``Backend.xp``), so one kernel serves both devices.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from pycaffe_mpi import errors


def _import_cupy() -> Any | None:
    """Return the cupy module when it is installed and a CUDA device is usable, else None."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return None
    try:
        if not cupy.cuda.is_available():
            return None
    except Exception:  # a broken driver counts as no GPU
        return None
    return cupy


def gpu_available() -> bool:
    """True when CuPy is installed and can see at least one CUDA device."""
    return _import_cupy() is not None


def gpu_count() -> int:
    """Number of CUDA devices CuPy can use (0 without CuPy or a driver)."""
    cupy = _import_cupy()
    return 0 if cupy is None else int(cupy.cuda.runtime.getDeviceCount())


def device_properties(device_id: int) -> dict[str, Any]:
    """Properties of one CUDA device, for ``pycaffe-mpi device_query``."""
    cupy = _import_cupy()
    if cupy is None:
        raise errors.PycaffeError("no CUDA device: install the 'gpu' extra and a CUDA driver")
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in props.items()}


def get_array_module(arr: Any) -> Any:
    """numpy or cupy, whichever owns ``arr``."""
    mod = type(arr).__module__
    if mod.startswith("cupy"):
        return importlib.import_module("cupy")
    return np


def to_host(arr: Any) -> np.ndarray:
    """A NumPy copy/view of ``arr`` (no copy for NumPy input)."""
    if isinstance(arr, np.ndarray):
        return arr
    if hasattr(arr, "get"):
        return arr.get()
    return np.asarray(arr)


class Backend:
    """Where arrays live: ``Backend()`` is the CPU, ``Backend("gpu", 0)`` the first GPU.

    Attributes:
        kind: ``"cpu"`` or ``"gpu"``.
        device_id: the CUDA device for ``"gpu"``.
        xp: ``numpy`` or ``cupy``.
    """

    def __init__(self, kind: str = "cpu", device_id: int = 0) -> None:
        if kind not in ("cpu", "gpu"):
            raise errors.PycaffeError(f'unknown device kind "{kind}" (use cpu or gpu)')
        self.kind = kind
        self.device_id = device_id
        if kind == "gpu":
            cupy = _import_cupy()
            if cupy is None:
                raise errors.PycaffeError(
                    "GPU mode asked for (--gpu or solver_mode: GPU) but CuPy or a CUDA device "
                    "is not available; install the 'gpu' extra or run on the CPU"
                )
            cupy.cuda.Device(device_id).use()
            self.xp: Any = cupy
        else:
            self.xp = np

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def asarray(self, arr: Any, dtype: Any = None) -> Any:
        """Move/convert ``arr`` onto this device."""
        return self.xp.asarray(arr, dtype=dtype)

    def to_host(self, arr: Any) -> np.ndarray:
        return to_host(arr)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU); used by timers."""
        if self.is_gpu:
            self.xp.cuda.Device(self.device_id).synchronize()

    def __repr__(self) -> str:
        return f"Backend({self.kind!r}, {self.device_id})" if self.is_gpu else "Backend('cpu')"


CPU = Backend()
