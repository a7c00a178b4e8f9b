"""End to end on real CIFAR-10: the main job, an MCL (k = 1) ensemble of four CIFAR10-Quick
members over 3 MPI ranks, trains as the README says, and rank 0 reports the ensemble metrics
and writes the oracle assignment matrix at each test interval.

Slow (about half an hour on 2 cores): run with ``python -m pytest -m slow``. Needs
``python tools/get_cifar10.py`` first; skips without the data or without MPI.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\[rank 0/3\]\s+Test net output #\d+: (\w+) = (\S+)")


def test_outputs(log: str) -> list[dict[str, list[float]]]:
    """Rank 0's test outputs, one dict per test pass (name -> values in order)."""
    passes: list[dict[str, list[float]]] = []
    for line in log.splitlines():
        if "[rank 0/3]" in line and "Testing net" in line:
            passes.append({})
        m = METRIC.search(line)
        if m and passes:
            passes[-1].setdefault(m.group(1), []).append(float(m.group(2)))
    return passes


test_outputs.__test__ = False  # a helper, not a test


@pytest.mark.slow
def test_cifar10_mcl_main_job(tmp_path, cifar10, solver_copy, train_over_three_ranks):
    solver = solver_copy("solvers/cifar10_mcl.prototxt", "mcl")
    out = train_over_three_ranks(solver, timeout=5400)
    passes = test_outputs(out.stderr)
    assert len(passes) == 11  # iterations 0, 500, ..., 5000
    last = passes[-1]
    assert len(last["member_accuracy"]) == 4
    # specialised members: the oracle is far above the ensemble mean and every member
    assert last["oracle_accuracy"][0] >= 0.85, last
    assert last["oracle_accuracy"][0] > last["ensemble_accuracy"][0] + 0.1, last
    assert max(last["member_accuracy"]) < last["oracle_accuracy"][0] - 0.2, last
    with open(tmp_path / "mcl_iter_5000_ensemble_accuracy_assignment.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["member", *map(str, range(10))] and len(rows) == 5
    shares = [[float(v) for v in row[1:]] for row in rows[1:]]
    assert all(abs(sum(col) - 1) < 1e-3 for col in zip(*shares))
    for r in range(3):
        assert (tmp_path / f"mcl_iter_5000_rank_{r}.caffemodel").is_file()
