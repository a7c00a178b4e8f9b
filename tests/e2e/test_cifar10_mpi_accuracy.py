"""End to end on real CIFAR-10 over 3 MPI ranks: the CIFAR10-Quick TreeNet trains and rank 0
reports its test accuracy.

Slow (about ten minutes on 2 cores): run with ``python -m pytest -m slow``. Needs
``python tools/get_cifar10.py`` first; skips without the data or without MPI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cifar10_treenet_over_three_ranks(tmp_path, cifar10, solver_copy,
                                          train_over_three_ranks):
    solver = solver_copy("models/cifar10_mpi/solver.prototxt", "mpi")
    out = train_over_three_ranks(solver, timeout=3600)
    acc = [float(a) for a in re.findall(r"\[rank 0/3\]\s+Test net output #0: accuracy = (\S+)",
                                        out.stderr)]
    assert acc and acc[-1] >= 0.70, acc
    for r in range(3):
        assert (tmp_path / f"mpi_iter_5000_rank_{r}.caffemodel").is_file()
