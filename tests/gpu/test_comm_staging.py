"""Device buffers and MPI without a GPU: both paths of :class:`pycaffe_mpi.comm.device.Staging`
(CUDA-aware hand-over and pinned-host staging) with a stand-in device array, through
:class:`pycaffe_mpi.comm.MPIComm` over a stand-in one-process mpi4py communicator; and the
device each rank takes by its local rank."""

from __future__ import annotations

import types

import numpy as np
import pytest

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi.comm import device as device_mod


class DeviceArray:
    """Stands in for a CuPy array: its data is reachable only through get/set."""

    def __init__(self, values):
        self._a = np.array(values)
        self.shape, self.dtype = self._a.shape, self._a.dtype
        self.flags = self._a.flags

    def get(self, out=None):
        if out is None:
            return self._a.copy()
        out[...] = self._a
        return out

    def set(self, host):
        self._a[...] = host

    def __array__(self, *a, **k):  # MPI must never read a device array as host memory
        raise AssertionError("device array read as a host array")


class OneRankMPI:
    """A stand-in mpi4py communicator of size 1 that records the buffers it was handed."""

    def __init__(self):
        self.handed = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def _see(self, *bufs):
        self.handed.extend(b for b in bufs if b is not None)

    def Bcast(self, buf, root=0):
        self._see(buf)

    def Reduce(self, s, r, op=None, root=0):
        from mpi4py import MPI

        self._see(r)
        if s is not MPI.IN_PLACE and r is not None:
            self._see(s)
            _write(r, _read(s))

    def Gather(self, s, r, root=0):
        from mpi4py import MPI

        if s is MPI.IN_PLACE:  # the root's row is already in r
            self._see(r)
            return
        self._see(s, r)
        _write(r, _read(s)[None])

    def Scatter(self, s, r, root=0):
        self._see(s, r)
        _write(r, _read(s)[0])

    def Allgather(self, s, r):
        self._see(s, r)
        _write(r, _read(s)[None])


def _read(b):
    return b.get() if isinstance(b, DeviceArray) else b


def _write(b, values):
    if isinstance(b, DeviceArray):
        b.set(values)
    else:
        b[...] = values


@pytest.fixture()
def fake_device(monkeypatch):
    synced = []
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: synced.append(1))))
    real = backend_mod.get_array_module
    monkeypatch.setattr(backend_mod, "get_array_module",
                        lambda a: fake if isinstance(a, DeviceArray) else real(a))
    return synced


@pytest.fixture(autouse=True)
def _mpi4py_constants():
    pytest.importorskip("mpi4py")  # MPIComm takes IN_PLACE and SUM from it (no MPI started)


def _comm(cuda_aware):
    allocs = []

    def alloc(shape, dtype):
        allocs.append(tuple(shape))
        return np.empty(shape, dtype)

    mpi = OneRankMPI()
    return comm_mod.MPIComm(mpi, device_mod.Staging(cuda_aware, alloc)), mpi, allocs


def test_staged_collectives_go_through_host_buffers(fake_device):
    comm, mpi, allocs = _comm(cuda_aware=False)
    src = DeviceArray(np.arange(6.0).reshape(2, 3))
    dst = DeviceArray(np.zeros((1, 2, 3)))
    comm.gather(src, dst, 0)
    np.testing.assert_array_equal(dst.get()[0], src.get())
    comm.allgather(src, dst)
    np.testing.assert_array_equal(dst.get()[0], src.get())
    out = DeviceArray(np.zeros((2, 3)))
    comm.reduce_sum(src, out, 0)
    np.testing.assert_array_equal(out.get(), src.get())
    comm.scatter(DeviceArray(np.ones((1, 2, 3))), out, 0)
    np.testing.assert_array_equal(out.get(), 1)
    comm.bcast(out, 0)
    assert all(isinstance(b, np.ndarray) for b in mpi.handed)  # MPI saw host memory only
    assert not fake_device  # no device synchronisation needed: get() waits for the data
    n = len(allocs)
    comm.gather(src, dst, 0)
    assert len(allocs) == n  # staging buffers are reused


def test_root_waiting_paths_with_device_arrays(fake_device):
    """gather in place keeps the root's row; bcast_nowait takes the blocking, staged path for a
    device array; gather_checked stages its data and returns the headers; MPI sees host memory
    only."""
    comm, mpi, _ = _comm(cuda_aware=False)
    dst = DeviceArray(np.full((1, 3), 7.0))
    comm.gather(None, dst, 0)
    np.testing.assert_array_equal(dst.get(), 7.0)
    buf = DeviceArray(np.arange(3.0))
    comm.bcast_nowait(buf, 0).wait()
    np.testing.assert_array_equal(buf.get(), np.arange(3.0))
    headers = np.zeros((1, 2), np.int64)
    comm.gather_checked(DeviceArray(np.arange(3.0)), np.array([3, 5]), dst, headers, 0)
    np.testing.assert_array_equal(dst.get()[0], np.arange(3.0))
    np.testing.assert_array_equal(headers, [[3, 5]])
    assert all(isinstance(b, np.ndarray) for b in mpi.handed)


def test_in_place_reduce_of_a_device_array(fake_device):
    comm, _, _ = _comm(cuda_aware=False)
    buf = DeviceArray(np.full(4, 2.0))
    comm.reduce_sum(buf, buf, 0)
    np.testing.assert_array_equal(buf.get(), 2.0)


def test_cuda_aware_mpi_gets_the_device_buffers(fake_device):
    comm, mpi, allocs = _comm(cuda_aware=True)
    src = DeviceArray(np.arange(4.0))
    dst = DeviceArray(np.zeros((1, 4)))
    comm.gather(src, dst, 0)
    comm.bcast(src, 0)
    assert mpi.handed and all(isinstance(b, DeviceArray) for b in mpi.handed)
    assert not allocs
    assert fake_device  # the stream was synchronised before MPI read device memory
    np.testing.assert_array_equal(dst.get()[0], src.get())


def test_numpy_arrays_are_never_staged():
    comm, mpi, allocs = _comm(cuda_aware=False)
    a, b = np.arange(3.0), np.zeros((1, 3))
    comm.gather(a, b, 0)
    assert not allocs and mpi.handed[0] is a
    np.testing.assert_array_equal(b[0], a)


def test_group_communicators_share_the_decision():
    staging = device_mod.Staging(cuda_aware=True)
    assert comm_mod.MPIComm(OneRankMPI(), staging).staging is staging


@pytest.mark.parametrize(("env", "want"), [
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}, 3), ({"MPI_LOCALRANKID": "1"}, 1),
    ({"SLURM_LOCALID": "2"}, 2), ({"PMI_RANK": "5"}, None), ({"MPI_LOCALRANKID": "x"}, None)])
def test_local_rank_from_the_launcher(env, want):
    assert device_mod.local_rank_from_env(env) == want


def test_local_rank_from_a_shared_memory_split():
    node = types.SimpleNamespace(Get_rank=lambda: 2, Free=lambda: None)
    world = types.SimpleNamespace(Split_type=lambda kind: node)
    assert device_mod.local_rank(world) == 2


def test_devices_by_local_rank():
    assert [device_mod.device_for_local_rank(r, 2) for r in range(5)] == [0, 1, 0, 1, 0]
    assert device_mod.device_for_local_rank(2, 8) == 2
    with pytest.raises(ValueError):
        device_mod.device_for_local_rank(0, 0)


def test_gpu_all_without_a_device_says_so(monkeypatch):
    from pycaffe_mpi import cli, errors

    monkeypatch.setattr(backend_mod, "gpu_count", lambda: 0)
    with pytest.raises(errors.PycaffeError, match="no CUDA device"):
        cli.choose_backend("all")


def test_gpu_all_takes_the_device_of_the_local_rank(monkeypatch):
    from pycaffe_mpi import cli

    monkeypatch.setattr(backend_mod, "gpu_count", lambda: 2)
    monkeypatch.setattr(backend_mod, "Backend", lambda kind, dev: (kind, dev))
    monkeypatch.setattr(comm_mod, "world", lambda: comm_mod.SelfComm())
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert cli.choose_backend("all") == ("gpu", 1)
