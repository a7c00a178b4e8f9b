"""Device choice: NumPy on the CPU, CuPy on a GPU. The only module that imports CuPy.

Layers never import an array library themselves; they use ``self.xp`` (this module's
``Backend.xp``), so one kernel serves both devices. Hand-written CUDA kernels
(:mod:`pycaffe_mpi.kernels.cuda`) are compiled here, once per source and dtype
(:func:`cuda_kernel`), and page-locked host buffers for MPI staging come from
:func:`pinned_empty`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
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


def is_cupy(xp: Any) -> bool:
    """True when the array module ``xp`` is CuPy (layers' dispatch to CUDA kernels asks this)."""
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


# Prepended to every kernel source: the element type ``T`` and small helpers that NVRTC and a
# host C++ compiler (the kernel tests' stand-in) both accept.
_PRELUDE = """
typedef {ctype} T;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
#define KERNEL_LOOP(i, n) \\
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \\
       i += (long long)blockDim.x * gridDim.x)
"""
_CTYPES = {"float32": "float", "float64": "double"}


def kernel_source(source: str, dtype: Any) -> str:
    """``source`` with the prelude for element type ``dtype`` (float32 or float64)."""
    name = np.dtype(dtype).name
    if name not in _CTYPES:
        raise errors.PycaffeError(f"CUDA kernels support float32 and float64, not {name}")
    return _PRELUDE.format(ctype=_CTYPES[name]) + source


@functools.cache
def _raw_module(code: str) -> Any:
    cupy = _import_cupy()
    if cupy is None:
        raise errors.PycaffeError("CUDA kernels need CuPy and a CUDA device")
    return cupy.RawModule(code=code, options=("--std=c++14",))


def cuda_kernel(source: str, name: str, dtype: Any) -> Callable[[Sequence[int], Sequence[int],
                                                                 Sequence[Any]], None]:
    """The ``extern "C"`` kernel ``name`` of ``source`` for ``dtype``, compiled on first use and
    cached (NVRTC, plus CuPy's on-disk cache across processes); call it as
    ``kernel(grid, block, args)``."""
    return _raw_module(kernel_source(source, dtype)).get_function(name)


def pinned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A NumPy array in page-locked host memory (fast, asynchronous device copies)."""
    cupy = _import_cupy()
    if cupy is None:
        raise errors.PycaffeError("pinned host memory needs CuPy and a CUDA device")
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = cupy.cuda.alloc_pinned_memory(max(size, 1))
    return np.frombuffer(mem, np.uint8, size).view(dtype).reshape(tuple(shape))


class LateFlag:
    """A device boolean read on the host later, without waiting for the device now.

    On a GPU the flag is copied into page-locked host memory behind the work queued so far on
    the current stream; :meth:`value` gives it once that copy has happened (None before). A
    check that would otherwise stop the GPU every iteration (a label range check, say) can so
    fail an iteration or two late instead. On the CPU the value is read at once.
    """

    def __init__(self, xp: Any, flag: Any) -> None:
        self._value: bool | None = None
        if not is_cupy(xp):
            self._value = bool(flag)
            return
        self._src = flag.astype(np.bool_).reshape(1)  # kept alive until the copy is done
        self._host = pinned_empty((1,), np.bool_)
        stream = xp.cuda.get_current_stream()
        xp.cuda.runtime.memcpyAsync(self._host.ctypes.data, self._src.data.ptr, 1,
                                    xp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        self._event = stream.record()

    def value(self) -> bool | None:
        """The flag, or None while the device has not reached it yet."""
        if self._value is None and self._event.done:
            self._value, self._src = bool(self._host[0]), None
        return self._value


class Uploader:
    """Host-to-device copies that do not wait for the device.

    NOTE: a copy from ordinary (pageable) host memory waits for all work queued before it, so
    a batch uploaded every iteration would stop the GPU every iteration. Here the host array is
    first copied into a page-locked buffer, from which the device copy runs asynchronously; a
    buffer is reused once its copy is done (a ring of ``slots`` per shape and dtype; only a
    device more than ``slots`` uploads behind makes the host wait).
    """

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._rings: dict[tuple[tuple[int, ...], str], list[list[Any]]] = {}

    def __call__(self, xp: Any, host: Any, out: Any = None) -> Any:
        """``host`` (a NumPy array) on the device of ``xp``, written into ``out`` (same shape,
        C-contiguous) when given; a plain conversion off CuPy."""
        if not is_cupy(xp):
            if out is None:
                return xp.asarray(host)
            out[...] = host
            return out
        host = np.asarray(host, dtype=None if out is None else out.dtype)
        if out is None:
            out = xp.empty(host.shape, host.dtype)
        ring = self._rings.setdefault((host.shape, host.dtype.str), [])
        slot = next((s for s in ring if s[1] is None or s[1].done), None)
        if slot is None and len(ring) < self.slots:
            slot = [pinned_empty(host.shape, host.dtype), None]
            ring.append(slot)
        elif slot is None:  # the device is `slots` uploads behind: wait for the oldest
            slot = ring.pop(0)
            slot[1].synchronize()
            ring.append(slot)
        slot[0][...] = host
        stream = xp.cuda.get_current_stream()
        out.set(slot[0], stream=stream)
        slot[1] = stream.record()
        return out


upload = Uploader()


def memory_in_use(device_id: int = 0) -> dict[str, int]:
    """Device bytes held by CuPy's pool (``held``: a high-water mark, since the pool keeps
    freed blocks) and in use now (``used``); zeros without CuPy."""
    cupy = _import_cupy()
    if cupy is None:
        return {"held": 0, "used": 0}
    with cupy.cuda.Device(device_id):
        pool = cupy.get_default_memory_pool()
        return {"held": int(pool.total_bytes()), "used": int(pool.used_bytes())}


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
