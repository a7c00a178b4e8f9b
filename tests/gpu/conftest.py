"""GPU test fixtures: the ``cuda_standin`` switch (see gpu_support.py) and the skip reason in
pytest's header."""

from __future__ import annotations

import shutil
from typing import Any

import gpu_support
import pytest

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.kernels import cuda as cuda_k


def pytest_report_header(config: Any) -> str:
    return gpu_support.gpu_skip_reason() or \
        f"GPU tests: {backend_mod.gpu_count()} CUDA device(s)"


@pytest.fixture()
def cuda_standin(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Run the CUDA dispatch of every layer on NumPy arrays through host-compiled kernels;
    yields the launch log."""
    if shutil.which("g++") is None:
        pytest.skip("the CUDA stand-in needs a host C++ compiler (g++)")
    monkeypatch.setattr(backend_mod, "cuda_kernel", gpu_support.host_cuda_kernel)
    monkeypatch.setattr(cuda_k, "enabled", lambda xp: True)
    gpu_support.LAUNCHES.clear()
    return gpu_support.LAUNCHES
