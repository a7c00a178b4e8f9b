"""Rank mistakes under a real ``mpiexec -n 3``: every rank ends, non-zero, within the timeout,
with a located ``error:`` line and no traceback (a bad root or rank list must not leave ranks
waiting in a collective)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import harness
import pytest

from pycaffe_mpi.testing import mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                                  reason=str(mpirun.mpi_unavailable_reason()))]

MPI = "models/cifar10_mpi/train_test.prototxt"
BROADCAST = 'name: "broadcast_pool2"'

CASES = [
    ("root-not-member", lambda t: t.replace(BROADCAST, BROADCAST + " include { mpi_rank: 1 "
                                            "mpi_rank: 2 }"), "mpi_param.root"),
    ("root-outside-world", lambda t: t.replace("root: 0", "root: 9", 1), "root"),
    ("rank-outside-world", lambda t: t.replace(BROADCAST, BROADCAST + " include { mpi_rank: 0 "
                                               "mpi_rank: 5 }"), "rank"),
]


@pytest.mark.parametrize(("mutate", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rank_mistakes_end_every_rank(mutate, word: str, fuzz_dir: Path):
    text = harness.localise_net((harness.ROOT / MPI).read_text(), fuzz_dir)
    path = fuzz_dir / "mpi_net.prototxt"
    path.write_text(mutate(text))
    done = mpirun.run_mpi(3, [sys.executable, "-m", "pycaffe_mpi.cli", "test", "--model", path,
                              "--iterations", "1"], timeout=90, cwd=harness.ROOT)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [x for x in done.stderr.splitlines() if re.search(r"\berror: ", x)]
    assert lines, done.stderr[-2000:]
    assert any(str(path) in x and word in x for x in lines), lines


def test_ranks_given_different_nets_fail_together(fuzz_dir: Path):
    """Per-rank ``--model a,a,b`` where b's broadcast has another root: the digest check
    refuses before the first collective, on every rank."""
    text = harness.localise_net((harness.ROOT / MPI).read_text(), fuzz_dir)
    good, bad = fuzz_dir / "mpi_good.prototxt", fuzz_dir / "mpi_bad.prototxt"
    good.write_text(text)
    bad.write_text(text.replace("mpi_param { root: 0 }", "mpi_param { root: 1 }", 1))
    done = mpirun.run_mpi(3, [sys.executable, "-m", "pycaffe_mpi.cli", "test", "--model",
                              f"{good},{good},{bad}", "--iterations", "1"], timeout=90,
                          cwd=harness.ROOT)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"\berror: ", done.stderr), done.stderr[-2000:]
