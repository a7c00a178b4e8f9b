"""Mistakes in comm-layer nets fail on every rank with one clear message, and the job ends
promptly with a non-zero code (tests/mpi/workers/bad_specs.py, 3 ranks); a failed job leaves no
shared-memory files behind."""

from __future__ import annotations

import re
import sys

import pytest

from pycaffe_mpi.comm import segments
from pycaffe_mpi.testing import mpirun

EXPECT = {
    "digest": r"the ranks' nets disagree at comm layer #1: rank 0 has nothing, rank 1 has "
              r'MPIGather "extra"',
    "root_not_member": r'layer "g" \(type MPIGather\), field mpi_param.root: root 2 is not a '
                       r"member of the layer's group \(world ranks \[0, 1\]\)",
    "gather_shapes": r"members' bottoms must have the same shape, got group rank 0 \(world rank "
                     r"0\) \(2, 3\), group rank 1 \(world rank 1\) \(2, 4\), group rank 2 "
                     r"\(world rank 2\) \(2, 3\)",
    "gather_reshape": r"members' bottoms must have the same shape, got group rank 0 \(world "
                      r"rank 0\) \(2, 3\), group rank 1 \(world rank 1\) \(2, 3\), group "
                      r"rank 2 \(world rank 2\) \(3, 3\)",
    "gather_tops": r"field top: group rank 0 \(world rank 0\) has 2 top blob\(s\), expected 3; "
                   r"the root has one top per member of the layer's group \(3 members",
    "bcast_no_bottom": r'layer "bc" \(type MPIBroadcast\), field bottom: group rank 0 \(world '
                       r"rank 0\) has 0 bottom blob\(s\), expected 1",
    "dtypes": r"field dtype: members build their nets in different dtypes \(group rank 0 "
              r"\(world rank 0\) float64, group rank 1 \(world rank 1\) float32, group rank 2 "
              r"\(world rank 2\) float64\)",
}


@pytest.mark.parametrize("case", list(EXPECT))
def test_every_rank_fails_with_one_message(mpi, case):
    proc = mpi.run(3, "bad_specs", case, timeout=30)
    out = mpi.output(proc)
    assert proc.returncode != 0, out
    assert "NO ERROR" not in proc.stdout, out
    for r in range(3):
        # NOTE: ranks share the pipe, so one rank's line may run into another's
        line = re.search(rf"\[rank {r}/3\] ERROR NetError: (.*?)(?=\[rank \d/3\]|\n|$)",
                         proc.stdout)
        assert line, f"rank {r} did not report the error\n{out}"
        assert re.search(EXPECT[case], line.group(1)), f"rank {r}: {line.group(1)}\n{out}"
    assert proc.seconds < 15, f"the job took {proc.seconds:.1f} s to end\n{out}"


ABORT = """
from pycaffe_mpi import comm
world = comm.world()
world.barrier()
if world.rank == 1:
    world.abort(3)
world.barrier()
"""


def test_abort_leaves_no_shared_memory_files(mpi, tmp_path):
    """MPI_Abort leaves MPICH's shared-memory segment files in /dev/shm (RAM) for good; the
    framework's abort removes their names first (the launcher's own clean-up is off here)."""
    script = tmp_path / "abort.py"
    script.write_text(ABORT)
    before = segments.files()
    proc = mpirun.run_mpi(3, [sys.executable, script], timeout=30, clean=False)
    assert proc.returncode != 0, mpi.output(proc)
    assert mpirun.remove_leftover_segments(before) == [], "the aborted job left segment files"


def test_launcher_removes_a_failed_jobs_segment_files(mpi):
    """``python -m mpi4py`` aborts through MPI_Abort alone; run_mpi removes what it left."""
    before = segments.files()
    proc = mpi.run(3, "bad_specs", "gather_shapes", timeout=30)
    assert proc.returncode != 0, mpi.output(proc)
    assert mpirun.remove_leftover_segments(before) == [], "run_mpi left segment files"
