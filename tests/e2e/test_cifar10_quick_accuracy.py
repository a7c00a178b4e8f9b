"""End to end on real CIFAR-10: BVLC's CIFAR10-Quick schedule reaches Caffe's accuracy (read
from the run's results file).

Slow (about ten minutes on 2 cores): run with ``python -m pytest -m slow``. Needs
``python tools/get_cifar10.py`` first; skips without the data.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cifar10_quick_reaches_74_percent(tmp_path, cifar10, solver_copy, test_passes):
    solver = solver_copy("models/cifar10_quick/solver.prototxt", "quick")
    out = subprocess.run([sys.executable, "-m", "pycaffe_mpi.cli", "train", "--solver",
                          str(solver)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = [p["accuracy"] for p in test_passes(tmp_path / "quick")]
    assert acc and acc[-1] >= 0.74, acc
