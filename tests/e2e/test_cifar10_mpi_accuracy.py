"""End to end on real CIFAR-10 over 3 MPI ranks: the CIFAR10-Quick TreeNet trains and rank 0
reports its test accuracy (read from its results file).

Slow (about ten minutes on 2 cores): run with ``python -m pytest -m slow``. Needs
``python tools/get_cifar10.py`` first; skips without the data or without MPI.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_cifar10_treenet_over_three_ranks(tmp_path, cifar10, solver_copy,
                                          train_over_three_ranks, test_passes):
    solver = solver_copy("models/cifar10_mpi/solver.prototxt", "mpi")
    train_over_three_ranks(solver, timeout=3600)
    acc = [p["accuracy"] for p in test_passes(tmp_path / "mpi")]
    assert acc and acc[-1] >= 0.70, acc
    for r in range(3):
        assert (tmp_path / f"mpi_iter_5000_rank_{r}.caffemodel").is_file()
