"""Data-parallel replicas: the replica groups, the weight digest check, bucketed Allreduce.

A world of W ranks trained with R replicas runs R copies of a net planned for M = W / R
model-parallel ranks. World rank ``w`` is model rank ``m = w % M`` of replica ``k = w // M``
(replica-major: each replica is a block of consecutive world ranks, so with ranks placed
node by node a replica's model-parallel traffic, one exchange per layer, stays on a node and
only the gradient Allreduce, once per iteration, crosses nodes)::

    world rank:   0    1    2    3          (W = 4, R = 2, M = 2)
    replica k:    0    0    1    1          model group = the ranks of one replica
    model rank m: 0    1    0    1          replica group = one model rank across replicas

Two kinds of communicator come out of :func:`split`: ``model`` (the M ranks of this replica:
the net's ``mpi_rank`` rules and its MPIBroadcast/MPIGather groups refer to it) and ``across``
(the R ranks holding the same model rank: they own the same parameters and average their
gradients). :class:`BucketedAllreduce` does that averaging: parameters are packed, in the order
backward finishes them, into contiguous buckets of about ``bucket_mb`` MB; each bucket's
non-blocking ``Iallreduce`` starts as soon as the last layer it covers is done, and all are
waited for before the update (Caffe's ``layer_wise_reduce``). MPI calls stay in this package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.comm import Comm, MPIComm, SelfComm

#: Largest default bucket in MB (PyTorch DDP uses 25 MB for GPUs; on CPUs and small nets
#: starting early gains more than fewer, larger messages).
BUCKET_MB = 4.0


def default_bucket_bytes(total_bytes: int) -> int:
    """A quarter of the gradients, between 64 KB and :data:`BUCKET_MB`: even a small net gets
    a few buckets, so its first ones travel while backward computes the rest."""
    return int(min(BUCKET_MB * 2**20, max(total_bytes / 4, 64 * 2**10)))


# -- planning (pure: every rank computes the same) ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each world rank sits: replica ``k`` and model rank ``m`` (see the module doc)."""

    world_size: int
    replicas: int

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise errors.PycaffeError(f"--replicas must be >= 1, got {self.replicas}")
        if self.world_size % self.replicas:
            raise errors.PycaffeError(
                f"--replicas {self.replicas} (or the solver's replicas) does not divide the "
                f"{self.world_size} MPI ranks of this job: each replica takes world_size / "
                "replicas ranks (start "
                f"{self.replicas} x the ranks the net needs, e.g. mpiexec -n "
                f"{self.replicas * max(1, self.world_size // self.replicas)})")

    @property
    def model_size(self) -> int:
        """M: the ranks one replica of the net runs on."""
        return self.world_size // self.replicas

    def place(self, world_rank: int) -> tuple[int, int]:
        """``(replica k, model rank m)`` of a world rank."""
        return divmod(int(world_rank), self.model_size)

    def world_rank(self, replica: int, model_rank: int) -> int:
        return int(replica) * self.model_size + int(model_rank)

    def model_members(self, replica: int) -> list[int]:
        """World ranks of replica ``replica``, in model-rank order."""
        return [self.world_rank(replica, m) for m in range(self.model_size)]

    def across_members(self, model_rank: int) -> list[int]:
        """World ranks holding ``model_rank``, in replica order (replica 0 first: the root)."""
        return [self.world_rank(k, model_rank) for k in range(self.replicas)]


def plan_buckets(sizes: Sequence[int], ready: Sequence[int], bucket_bytes: int,
                 itemsize: int) -> list[list[int]]:
    """Group parameters into buckets in the order backward finishes them.

    Args:
        sizes: element count of each learnable parameter (the net's order).
        ready: for each parameter, the lowest index of the layers that use it: its gradient
            is final once backward has passed that layer (shared parameters: the last user).
        bucket_bytes: a bucket closes once it holds at least this many bytes.
        itemsize: bytes per element.

    Returns:
        Lists of parameter indices; bucket 0 is ready first.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-ready[i], -i))
    buckets: list[list[int]] = []
    current: list[int] = []
    nbytes = 0
    for i in order:
        current.append(i)
        nbytes += int(sizes[i]) * itemsize
        if nbytes >= bucket_bytes:
            buckets.append(current)
            current, nbytes = [], 0
    if current:
        buckets.append(current)
    return buckets



def gpu_devices(world_size: int, ids: Sequence[int], replicas: int | None,
                model_ranks: int, replicas_from: str = "--replicas") -> tuple[int, list[int]]:
    """Caffe's ``--gpu 0,1,2,3`` under MPI: ``(replicas, device of each world rank)``.

    A list of G ids is read one of two ways. *One per replica* (Caffe's multi-GPU form):
    G replicas, every rank of replica k on device ``ids[k]``; it applies when ``replicas``
    is G, or when ``replicas`` is None and ``world_size == G x model_ranks``. *One per rank*
    (MPI-Caffe's rule for every flag): rank w on ``ids[w]``; it applies when G is the world
    size and the first form does not. A single id is every rank's device.

    Args:
        world_size: W, the MPI ranks of the job.
        ids: the device ids, in the order given.
        replicas: R when given (by ``--replicas`` or the solver's ``replicas`` field, named
            by ``replicas_from`` in errors), None when not.
        model_ranks: M, the ranks one copy of the net needs (its ``mpi_rank`` rules); only
            read when ``replicas`` is None.

    Raises:
        PycaffeError: when the list fits neither form, naming both ways to fix it.
    """
    ids, w = [int(i) for i in ids], int(world_size)
    g = len(ids)
    if g == 0:
        raise errors.PycaffeError("--gpu: no device id given")
    if g == 1:
        return (replicas or 1), ids * w
    if replicas is not None:
        if g == replicas and w % g == 0:
            m = w // g
            return g, [ids[r // m] for r in range(w)]
        if g == w:
            return replicas, ids
        raise errors.PycaffeError(
            f"--gpu {','.join(map(str, ids))} lists {g} devices, but {replicas_from} is "
            f"{replicas} on {w} MPI ranks: give one device per replica ({replicas} ids) or one "
            f"per rank ({w} ids), or drop {replicas_from} to run {g} replicas (mpiexec -n "
            f"{g} x the ranks the net needs)")
    m = max(1, int(model_ranks))
    if g * m == w:
        return g, [ids[r // m] for r in range(w)]
    if g == w:
        return 1, ids
    if w == 1:
        raise errors.PycaffeError(
            f"one process drives one GPU: --gpu {','.join(map(str, ids))} trains {g} replicas "
            f"with one process each; start them with mpiexec (mpiexec -n {g * m} pycaffe-mpi "
            f"train ... --gpu {','.join(map(str, ids))})")
    raise errors.PycaffeError(
        f"--gpu {','.join(map(str, ids))} lists {g} devices for {w} MPI ranks: as {g} "
        f"replicas of this net ({m} rank{'s' if m > 1 else ''} each) the job needs "
        f"mpiexec -n {g * m}; or give one id per rank ({w} ids), or --replicas R with R ids")

# -- the communicators ------------------------------------------------------------------------
@dataclasses.dataclass
class ReplicaGroups:
    """This rank's place and communicators (see :func:`split`)."""

    world: Comm
    layout: Layout
    replica: int
    model_rank: int
    model: Comm
    across: Comm

    @property
    def replicas(self) -> int:
        return self.layout.replicas

    @property
    def is_root_replica(self) -> bool:
        return self.replica == 0


def split(world: Comm, replicas: int) -> ReplicaGroups:
    """Split ``world`` into R replicas (collective over ``world``).

    With one replica ``model`` is the world itself; with one rank per replica the model
    communicator is a size-1 stand-in (no MPI calls inside a replica).
    """
    layout = Layout(world.size, int(replicas))
    k, m = layout.place(world.rank)
    model: Comm | None = world
    across: Comm | None = SelfComm()
    if layout.replicas > 1:
        # NOTE: group creation is collective over the world: every rank creates every group,
        # in the same order, and keeps the one it belongs to
        model = None
        for r in range(layout.replicas):
            g = world.create_group(layout.model_members(r))
            if g is not None:
                g.label = f"replica {r}"
                model = g
        across = None
        for mr in range(layout.model_size):
            g = world.create_group(layout.across_members(mr))
            if g is not None:
                g.label = f"the replicas of model rank {mr}"
                across = g
    if model is not None and model.size == 1:
        model = SelfComm()
    assert model is not None and across is not None  # every rank is in one of each
    return ReplicaGroups(world, layout, k, m, model, across)


# -- agreeing on the weights ------------------------------------------------------------------
def digest(arrays: Sequence[Any], to_host: Any = np.asarray) -> str:
    """sha256 of the arrays' bytes (shapes and dtype included), hex."""
    h = hashlib.sha256()
    for a in arrays:
        host = np.ascontiguousarray(to_host(a))
        h.update(f"{host.dtype.str}{host.shape}".encode())
        h.update(host.tobytes())
    return h.hexdigest()


def broadcast_from_root(across: Comm, arrays: Sequence[Any]) -> None:
    """Every replica's ``arrays`` become replica 0's (collective over ``across``)."""
    if across.size <= 1:
        return
    for a in arrays:
        across.bcast(a, root=0)


def check_agree(groups: ReplicaGroups, value: Any, what: str, hint: str) -> None:
    """Raise on every rank of the world unless, for each model rank, every replica holds the
    same ``value`` as replica 0 (collective over the world, so all ranks fail together)."""
    if groups.replicas <= 1:
        return
    rows = groups.world.allgather_obj((groups.replica, groups.model_rank, value))
    root = {m: v for k, m, v in rows if k == 0}
    bad = [(k, m, v) for k, m, v in rows if v != root[m]]
    if not bad:
        return
    k, m, v = bad[0]
    others = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise errors.SolverError(
        f"the replicas disagree on {what}: replica {k} of model rank {m} (world rank "
        f"{groups.layout.world_rank(k, m)}) has {v!r}, replica 0 has {root[m]!r}{others}; "
        f"{hint}")


# -- averaging the gradients -----------------------------------------------------------------
class BucketedAllreduce:
    """Sums parameter diffs over ``across`` bucket by bucket and divides by its size.

    Args:
        across: the replicas of this model rank.
        params: the learnable parameter blobs (their ``diff`` arrays are read and written).
        buckets: parameter indices per bucket (:func:`plan_buckets`).
        xp: the array module of the diffs.

    :meth:`start` copies one bucket's diffs into its contiguous buffer and starts a
    non-blocking Allreduce on it; :meth:`progress` lets MPI move data while backward
    computes (MPICH progresses non-blocking collectives only inside MPI calls);
    :meth:`finish` waits for every bucket (starting any not yet started) and writes the
    averages back into the diffs.
    """

    def __init__(self, across: Comm, params: Sequence[Any], buckets: Sequence[Sequence[int]],
                 xp: Any = np) -> None:
        self.across, self.params, self.buckets = across, list(params), [list(b) for b in buckets]
        self.xp = xp
        dtype = self.params[0].diff.dtype if self.params else np.float32
        self.buffers = [xp.empty(sum(self.params[i].count for i in b), dtype=dtype)
                        for b in self.buckets]
        self._requests: list[Any] = [None] * len(self.buckets)
        self._staged: list[tuple[Any, bool]] = [(None, False)] * len(self.buckets)
        self.started = [False] * len(self.buckets)
        #: seconds spent waiting in :meth:`finish` (the communication backward did not hide)
        self.wait_seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers)

    def start(self, i: int) -> None:
        """Pack bucket ``i`` and start its Allreduce."""
        buf, off = self.buffers[i], 0
        for j in self.buckets[i]:
            n = self.params[j].count
            buf[off:off + n] = self.params[j].diff.reshape(-1)
            off += n
        self.started[i] = True
        if self.across.size <= 1:
            return
        if isinstance(self.across, MPIComm):
            from mpi4py import MPI

            host, staged = self.across.staging.to_mpi(buf, f"bucket{i}")
            self._staged[i] = (host, staged)
            self._requests[i] = self.across.comm.Iallreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        else:  # another Comm (a test double): a blocking sum
            out = buf.copy()
            self.across.reduce_sum(buf, out, 0)
            self.across.bcast(out, 0)
            buf[...] = out

    def progress(self) -> None:
        """Give MPI a chance to move the started buckets' data."""
        live = [r for r in self._requests if r is not None]
        if live:
            from mpi4py import MPI

            MPI.Request.Testall(live)

    def finish(self) -> None:
        """Wait for every bucket; each diff becomes the mean over the replicas."""
        for i, was in enumerate(self.started):
            if not was:
                self.start(i)
        live = [r for r in self._requests if r is not None]
        t0 = time.perf_counter()
        if live:
            from mpi4py import MPI

            if isinstance(self.across, MPIComm):
                self.across._call("Wait(Iallreduce)", MPI.Request.Waitall, live)
            else:
                MPI.Request.Waitall(live)
        self.wait_seconds = time.perf_counter() - t0
        n = self.across.size
        for i, b in enumerate(self.buckets):
            host, staged = self._staged[i]
            buf = self.buffers[i]
            if staged:
                self.across.staging.from_mpi(host, buf, True)
            if n > 1:
                buf /= n  # NOTE: a division, not * (1/n): exact for every power of two
            off = 0
            for j in b:
                p = self.params[j]
                p.diff[...] = buf[off:off + p.count].reshape(p.diff.shape)
                off += p.count
        self._requests = [None] * len(self.buckets)
        self._staged = [(None, False)] * len(self.buckets)
        self.started = [False] * len(self.buckets)

    def mean_scalar(self, value: float) -> float:
        """The mean of ``value`` over the replicas (a blocking Allreduce of one number)."""
        if self.across.size <= 1:
            return value
        arr = np.array([float(value)], dtype=np.float64)
        out = np.empty_like(arr)
        if isinstance(self.across, MPIComm):
            from mpi4py import MPI

            self.across._call("Allreduce", self.across.comm.Allreduce, arr, out, op=MPI.SUM)
        else:
            self.across.reduce_sum(arr, out, 0)
            self.across.bcast(out, 0)
        return float(out[0]) / self.across.size
