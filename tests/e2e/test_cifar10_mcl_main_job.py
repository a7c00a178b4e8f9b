"""End to end on real CIFAR-10: the main job, an MCL (k = 1) ensemble of four CIFAR10-Quick
members over 3 MPI ranks, trains as the README says, and rank 0 reports the ensemble metrics
(read from its results file) and writes the oracle assignment matrix at each test interval.

Slow (about half an hour on 2 cores): run with ``python -m pytest -m slow``. Needs
``python tools/get_cifar10.py`` first; skips without the data or without MPI.
"""

from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_cifar10_mcl_main_job(tmp_path, cifar10, solver_copy, train_over_three_ranks,
                              test_passes):
    solver = solver_copy("solvers/cifar10_mcl.prototxt", "mcl")
    train_over_three_ranks(solver, timeout=5400)
    passes = test_passes(tmp_path / "mcl")
    assert len(passes) == 11  # iterations 0, 500, ..., 5000
    last = passes[-1]
    members = [last[f"member_accuracy_{m}"] for m in range(4)]
    assert "member_accuracy_4" not in last
    # specialised members: the oracle is far above the ensemble mean and every member
    assert last["oracle_accuracy"] >= 0.85, last
    assert last["oracle_accuracy"] > last["ensemble_accuracy"] + 0.1, last
    assert max(members) < last["oracle_accuracy"] - 0.2, last
    with open(tmp_path / "mcl_iter_5000_ensemble_accuracy_assignment.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["member", *map(str, range(10))] and len(rows) == 5
    shares = [[float(v) for v in row[1:]] for row in rows[1:]]
    assert all(abs(sum(col) - 1) < 1e-3 for col in zip(*shares))
    for r in range(3):
        assert (tmp_path / f"mcl_iter_5000_rank_{r}.caffemodel").is_file()
