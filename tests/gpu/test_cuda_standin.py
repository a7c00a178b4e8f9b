"""The CUDA kernels' host-side logic and arithmetic without a GPU.

Every layer case of the layers with CUDA kernels runs twice on NumPy arrays: through the plain
NumPy path and through the CUDA dispatch with each kernel compiled as host C++ (the
``cuda_standin`` fixture of conftest.py). Both must agree to float64 rounding. The kernel sources
are also compiled for the device with nvcc where it is installed (no GPU needed for that).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from gpu_support import run_case

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.kernels import cuda as cuda_k
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import make_bottoms

KERNEL_LAYERS = ("Convolution", "Deconvolution", "Im2col", "Pooling", "LRN", "SoftmaxWithLoss",
                 "MultipleChoiceLoss")
CASES = [c for c in layer_cases.all_cases() if c.type in KERNEL_LAYERS]
SOURCES = {"IM2COL": cuda_k.IM2COL, "POOL": cuda_k.POOL, "LRN": cuda_k.LRN,
           "SOFTMAX_LOSS": cuda_k.SOFTMAX_LOSS, "MCL": cuda_k.MCL}
LAUNCHED_TYPES: set[str] = set()


def _bottoms(case):
    return make_bottoms(case.bottoms, np.random.default_rng(0))


@pytest.mark.parametrize("case", CASES, ids=[c.test_id for c in CASES])
def test_cuda_kernels_match_numpy(case, cuda_standin):
    bottoms = _bottoms(case)
    cuda_standin.clear()
    got = run_case(case, bottoms, None)
    launched = list(cuda_standin)
    cuda_k_enabled = cuda_k.enabled
    try:
        cuda_k.enabled = lambda xp: backend_mod.is_cupy(xp)  # the plain NumPy path
        want = run_case(case, bottoms, None)
    finally:
        cuda_k.enabled = cuda_k_enabled
    for kind, ws, gs in zip(("top", "bottom diff", "param diff", "param"), want, got):
        for i, (w, g) in enumerate(zip(ws, gs)):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=f"{kind} {i}")
    if launched:
        LAUNCHED_TYPES.add(case.type)


def test_every_kernel_layer_launched_a_kernel():
    """Some case of each layer type went through a CUDA kernel (not only the generic path)."""
    if not LAUNCHED_TYPES:
        pytest.skip("the stand-in cases did not run")
    assert set(KERNEL_LAYERS) <= LAUNCHED_TYPES


def test_float32_through_the_kernels(cuda_standin):
    case = next(c for c in CASES if c.type == "Pooling")
    bottoms = _bottoms(case)
    tops = run_case(case, bottoms, None, np.float32)[0]
    assert tops[0].dtype == np.float32 and np.isfinite(tops[0]).all()


def test_a_bad_label_poisons_the_fused_loss(cuda_standin):
    case = next(c for c in CASES if c.type == "SoftmaxWithLoss")
    bottoms = _bottoms(case)
    bottoms[1] = np.full_like(bottoms[1], 1e6)
    from pycaffe_mpi.testing.layer_cases import build_layer

    layer, bb, tb = build_layer(case, bottoms)
    layer.forward(bb, tb)
    assert np.isnan(tb[0].data)


def test_dispatch_only_on_cupy():
    assert not cuda_k.enabled(np)
    assert not backend_mod.is_cupy(np)

    class FakeCupy:
        __name__ = "cupy"

    assert backend_mod.is_cupy(FakeCupy())


def test_launch_covers_every_output(monkeypatch):
    seen = []
    monkeypatch.setattr(backend_mod, "cuda_kernel",
                        lambda src, name, dt: lambda g, b, a: seen.append((g, b)))
    cuda_k.launch("", "k", np.float32, 1000, ())
    cuda_k.launch("", "k", np.float32, 0, ())  # nothing to do: no launch
    cuda_k.launch("", "k", np.float32, 10**12, ())
    assert seen[0] == ((4,), (256,))
    assert seen[1] == ((cuda_k.MAX_BLOCKS,), (256,))  # the grid-stride loop does the rest


def test_kernel_source_prelude():
    assert "typedef float T;" in backend_mod.kernel_source("", np.float32)
    assert "typedef double T;" in backend_mod.kernel_source("", "float64")
    with pytest.raises(Exception, match="float32 and float64"):
        backend_mod.kernel_source("", np.int32)


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_compile_for_the_device(name, dtype, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the device compile check needs the CUDA toolkit")
    src = tmp_path / f"{name}.cu"
    src.write_text(backend_mod.kernel_source(SOURCES[name], dtype))
    r = subprocess.run([nvcc, "--ptx", "-std=c++14", "-arch=sm_80", str(src), "-o",
                        str(tmp_path / f"{name}.ptx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_late_flag_on_the_cpu_is_read_at_once():
    assert backend_mod.LateFlag(np, np.asarray(True)).value() is True
    assert backend_mod.LateFlag(np, np.bool_(False)).value() is False
