"""The prepared device check stays runnable: the script parses, the benchmark's dry run works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    r = subprocess.run([bash, "-n", os.path.join(ROOT, "bench", "gpu_check.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bench_gpu_dry_run_on_the_cpu():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--dry-run",
                        "--nets", "quick100", "--no-torch"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quick100 (batch 2): pycaffe-mpi step" in r.stdout


def test_bench_gpu_without_a_device_says_so():
    if "cupy" in sys.modules or shutil.which("nvidia-smi"):
        pytest.skip("a GPU may be present")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--nets",
                        "quick100"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "no usable CUDA device" in r.stderr
