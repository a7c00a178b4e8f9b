"""Snapshot writes survive a full disk and clean up after killed writers.

A full disk (a write raising ENOSPC) leaves the previous file intact and no temporary file,
and ends in our WriteError (also an OSError). Temporary files that a killed run left beside a
target are removed by the next write of that target; a live writer's file is left alone.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _FullDisk:
    """A file object whose writes fail as on a full disk, after a first partial write."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))


def test_full_disk_keeps_the_previous_snapshot_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "lenet_iter_100.caffemodel"
    pio.atomic_write(target, b"the previous snapshot")
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    with pytest.raises(pio.WriteError) as info:
        pio.atomic_write(target, b"x" * 100_000)
    e = info.value
    assert isinstance(e, OSError) and isinstance(e, errors.PycaffeError)
    assert e.errno == errno.ENOSPC and e.filename == str(target)
    assert str(target) in str(e) and "No space left on device" in str(e)
    assert "previous file is unchanged" in str(e) and "free some space" in str(e)
    assert target.read_bytes() == b"the previous snapshot"
    assert os.listdir(tmp_path) == [target.name]


def test_full_disk_on_a_first_snapshot_leaves_nothing(tmp_path, full_disk):
    with pytest.raises(pio.WriteError, match="nothing was written"):
        pio.atomic_write(tmp_path / "a.solverstate", b"state")
    assert os.listdir(tmp_path) == []


def test_net_save_on_a_full_disk(tmp_path, monkeypatch):
    p = text_format.Parse('layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                          'inner_product_param { num_output: 2 weight_filler { type: "gaussian" '
                          "} } } input: 'x' input_shape { dim: 1 dim: 3 }",
                          caffe_pb2.NetParameter())
    net = Net(p, 0)
    target = tmp_path / "net.caffemodel"
    net.save(str(target))
    before = target.read_bytes()
    net.params["ip"][0].data[...] = 42
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    with pytest.raises(errors.PycaffeError, match="No space left"):
        net.save(str(target))
    assert target.read_bytes() == before and os.listdir(tmp_path) == [target.name]


def test_write_proto_binary_on_a_full_disk(tmp_path, full_disk):
    with pytest.raises(pio.WriteError):
        pio.write_binaryproto(tmp_path / "mean.binaryproto", np.ones((3, 2, 2)))
    assert os.listdir(tmp_path) == []


# -- stale temporary files ------------------------------------------------------------------
KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pycaffe_mpi import snapshot as pio

    def hang(fd):  # the data are written; the process is killed before the rename
        print("writing", flush=True)
        time.sleep(600)

    os.fsync = hang
    pio.atomic_write(sys.argv[1], b"half-written snapshot")
""")


def test_killed_writers_temp_file_is_cleaned_at_the_next_write(tmp_path):
    target = tmp_path / "net_iter_10.solverstate"
    pio.atomic_write(target, b"iteration 0")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].startswith(f".{target.name}.")
        pio.atomic_write(target, b"iteration 5")  # the writer is alive: its file stays
        assert os.listdir(tmp_path).count(temps[0]) == 1
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert target.read_bytes() == b"iteration 5"
    pio.atomic_write(target, b"iteration 10")
    assert sorted(os.listdir(tmp_path)) == [target.name]
    assert target.read_bytes() == b"iteration 10"


def _touch(path, age_s=0.0):
    path.write_bytes(b"partial")
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def test_stale_rules(tmp_path):
    target = tmp_path / "m.caffemodel"
    host = pio._host_tag()
    other = "0123abcd" if host != "0123abcd" else "fedc3210"
    # a pid that surely no longer runs: a child that has exited and been reaped
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    files = {
        f".m.caffemodel.{host}-{dead}-0123456789ab.tmp": (0, True),           # killed here
        f".m.caffemodel.{host}-{os.getppid()}-0123456789ab.tmp": (0, False),  # alive
        f".m.caffemodel.{host}-{os.getpid()}-0123456789ab.tmp": (0, False),   # ours
        f".m.caffemodel.{other}-{dead}-0123456789ab.tmp": (60, False),        # other host
        f".m.caffemodel.{other}-{dead}-ba9876543210.tmp": (2 * 3600, True),   # ... long ago
        ".m.caffemodel.0123456789ab.tmp": (60, False),                        # old naming
        ".m.caffemodel.ba9876543210.tmp": (3600, True),                       # ... long ago
        f".other.caffemodel.{host}-{dead}-0123456789ab.tmp": (0, False),      # another target
        ".m.caffemodel.notes.txt": (7200, False),                            # not our pattern
    }
    for name, (age, _) in files.items():
        _touch(tmp_path / name, age)
    removed = {os.path.basename(p) for p in pio.remove_stale_temps(target)}
    assert removed == {name for name, (_, stale) in files.items() if stale}
    pio.atomic_write(target, b"new")
    left = set(os.listdir(tmp_path))
    assert left == {target.name} | {n for n, (_, stale) in files.items() if not stale}


def test_temp_names_carry_host_and_pid(tmp_path):
    name = os.path.basename(pio.temp_path(tmp_path / "a.caffemodel"))
    assert name.startswith(f".a.caffemodel.{pio._host_tag()}-{os.getpid()}-")
    assert name.endswith(".tmp")
    assert pio._TAG_RE.fullmatch(name[len(".a.caffemodel."):])
