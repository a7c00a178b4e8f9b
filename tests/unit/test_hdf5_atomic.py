"""HDF5 snapshots are written like binary ones: tagged temporary names, stale ones removed, and
a failed write (a full disk) a WriteError that keeps the previous file and leaves no temp."""

from __future__ import annotations

import errno
import os
import re

import h5py
import numpy as np
import pytest

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi import snapshot_hdf5 as h5
from pycaffe_mpi.proto import caffe_pb2


def state(it: int) -> caffe_pb2.SolverState:
    s = caffe_pb2.SolverState(iter=it, learned_net="x.caffemodel.h5", current_step=1)
    s.history.add().CopyFrom(pio.array_to_blobproto(np.arange(6.0).reshape(2, 3)))
    return s


def test_temp_name_is_tagged_and_replaced(tmp_path, monkeypatch):
    target = tmp_path / "s.solverstate.h5"
    seen = []
    real = h5py.Group.create_dataset

    def spy(self, name, *a, **k):
        seen.extend(os.listdir(tmp_path))
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", spy)
    h5.write_solverstate(target, state(3))
    assert any(re.fullmatch(r"\.s\.solverstate\.h5\.[0-9a-f]{8}-\d+-[0-9a-f]{12}\.tmp", n)
               for n in seen)
    assert os.listdir(tmp_path) == ["s.solverstate.h5"]
    assert h5.read_solverstate(target).iter == 3


def test_stale_temp_of_a_killed_writer_is_removed(tmp_path):
    target = tmp_path / "m.solverstate.h5"
    stale = pio.temp_path(target).replace(f"-{os.getpid()}-", "-999999999-")
    with open(stale, "wb") as f:
        f.write(b"half a file")
    h5.write_solverstate(target, state(1))
    assert sorted(os.listdir(tmp_path)) == ["m.solverstate.h5"]


@pytest.mark.parametrize("first", [True, False])
def test_full_disk_is_a_write_error_and_keeps_the_old_file(tmp_path, monkeypatch, first):
    target = tmp_path / "f.solverstate.h5"
    if not first:
        h5.write_solverstate(target, state(5))

    def full(self, name, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(pio.WriteError) as info:
        h5.write_solverstate(target, state(6))
    e = info.value
    assert isinstance(e, errors.PycaffeError) and isinstance(e, OSError)
    assert e.errno == errno.ENOSPC and "free some space" in str(e)
    assert ("nothing was written" if first else "previous file is unchanged") in str(e)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ([] if first else ["f.solverstate.h5"])
    if not first:
        assert h5.read_solverstate(target).iter == 5


def test_other_errors_pass_through_and_clean_up(tmp_path, monkeypatch):
    def boom(self, name, *a, **k):
        raise ValueError("not an OSError")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(ValueError):
        h5.write_solverstate(tmp_path / "v.h5", state(1))
    assert os.listdir(tmp_path) == []
