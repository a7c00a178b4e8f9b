"""What the GPU tests share: why they skip, one layer case run on a backend, and a host stand-in
for the CUDA kernels (conftest.py turns it on as the ``cuda_standin`` fixture). A module of its
own, not conftest.py: other test folders' conftest modules take that name first.

The stand-in compiles each kernel source of :mod:`pycaffe_mpi.kernels.cuda` as plain C++ (with
the same prelude as on the device, plus one host thread: ``blockIdx = threadIdx = 0``,
``blockDim = gridDim = 1``, so the grid-stride loop visits every output) and calls it on NumPy
arrays through ctypes. With it, the layers' CUDA dispatch, the launch arguments and the kernels'
arithmetic run on any machine with a C++ compiler and are compared against the NumPy path.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.testing.layer_cases import build_layer


def gpu_skip_reason() -> str | None:
    """Why the device tests cannot run here (None when CuPy sees a CUDA device)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "GPU tests skipped: CuPy is not installed (pip install cupy-cuda12x)"
    if not backend_mod.gpu_available():
        return "GPU tests skipped: CuPy is installed but sees no usable CUDA device"
    return None


def run_case(case: Any, bottoms: list[np.ndarray], backend: Any, dtype: Any = np.float64
             ) -> tuple[list[np.ndarray], ...]:
    """Forward and backward of one layer case on ``backend`` (None = the CPU) with fixed top
    diffs; returns host copies of (tops, checked bottom diffs, param diffs, params)."""
    layer, bb, tb = build_layer(case, bottoms, dtype, backend=backend)
    if case.stochastic:
        layer.rng = np.random.default_rng(7)
    layer.forward(bb, tb)
    rng = np.random.default_rng(3)
    put = backend_mod.CPU.asarray if backend is None else backend.asarray
    for t in tb:
        t.diff[...] = put(rng.standard_normal(t.shape).astype(dtype))
    for p in layer.blobs:
        p.diff[...] = 0
    checked: list[int] = []
    if case.grad:
        checked = [i for i in range(len(bb)) if layer.allow_force_backward(i)]
        if case.grad_bottoms is not None:
            checked = list(case.grad_bottoms)
        layer.backward(tb, [i in checked for i in range(len(bb))], bb)
    host = backend_mod.to_host
    return ([host(t.data) for t in tb], [host(bb[i].diff) for i in checked],
            [host(p.diff) for p in layer.blobs], [host(p.data) for p in layer.blobs])


# -- the host stand-in for CUDA kernels ------------------------------------------------------------

HOST_PRELUDE = """
#include <cmath>
struct HostDim3 { long long x, y, z; };
static const HostDim3 blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};
static const HostDim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
using std::exp; using std::log; using std::pow;
"""

_LIBS: dict[str, ctypes.CDLL] = {}
_BUILD = Path(tempfile.mkdtemp(prefix="pycaffe_cuda_standin_"))
LAUNCHES: list[tuple[str, int]] = []  # (kernel name, threads) of every launch, for the tests


def _host_library(code: str) -> ctypes.CDLL:
    key = hashlib.sha1(code.encode()).hexdigest()[:16]
    if key not in _LIBS:
        src, lib = _BUILD / f"{key}.cpp", _BUILD / f"{key}.so"
        src.write_text(code)
        subprocess.run([shutil.which("g++") or "g++", "-O1", "-shared", "-fPIC", "-o", str(lib),
                        str(src)], check=True, capture_output=True, text=True)
        _LIBS[key] = ctypes.CDLL(str(lib))
    return _LIBS[key]


_SCALARS = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong, np.float32: ctypes.c_float,
            np.float64: ctypes.c_double}


def _c_arg(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        # a kernel indexes flat memory: a strided view here would be a bug on the device too
        assert a.flags.c_contiguous, f"non-contiguous array {a.shape} handed to a kernel"
        return ctypes.c_void_p(a.ctypes.data)
    assert type(a) in _SCALARS, f"kernel argument {a!r} must be a sized NumPy scalar"
    return _SCALARS[type(a)](a)


def host_cuda_kernel(source: str, name: str, dtype: Any) -> Any:
    """:func:`pycaffe_mpi.backend.cuda_kernel` for the host: same signature and call."""
    fn = getattr(_host_library(HOST_PRELUDE + backend_mod.kernel_source(source, dtype)), name)
    fn.restype = None

    def call(grid: Any, block: Any, args: Any) -> None:
        LAUNCHES.append((name, int(grid[0]) * int(block[0])))
        fn(*[_c_arg(a) for a in args])

    return call
