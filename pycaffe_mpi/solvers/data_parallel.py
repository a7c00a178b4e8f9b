"""Data-parallel training: R replicas of the net average their gradients before every update.

Caffe's multi-GPU training (``caffe train --gpu 0,1,2,3``: P2PSync/NCCL), over MPI ranks and
combined with model parallelism. With ``replicas`` R > 1 a world of W ranks runs R copies of a
net planned for M = W / R ranks (:mod:`pycaffe_mpi.comm.replicas`: world rank
``w = k * M + m`` is model rank m of replica k). For each replica:

* its net sees model ranks only: ``mpi_rank`` rules, MPIBroadcast/MPIGather groups and
  ``mpi_param.root`` refer to 0..M-1, and its comm layers talk inside the replica;
* its train net's data layers read their own part of each source: replica k of R reads record i
  only when ``i mod R == k`` (Caffe's ``DataLayer::Skip``), so R replicas at batch B/R read
  exactly the records one process at batch B reads;
* it is seeded with ``random_seed + w`` (dropout, crops and mirrors differ per replica) and
  then takes replica 0's weights (a broadcast), so all start identical; before the first
  iteration (after ``--weights`` or a resume) the replicas compare a digest of their weights
  and refuse to start when they differ;
* after the ``iter_size`` forward/backward passes, the accumulated diffs are summed over the
  replicas and divided by R (:class:`~pycaffe_mpi.comm.replicas.BucketedAllreduce`, started
  bucket by bucket during the last backward pass; after it with ``layer_wise_reduce: false``),
  before the solver's normalisation,
  regularisation and update, as Caffe does; the loss shown is the replicas' mean;
* only replica 0 builds and runs the test nets and displays (Caffe's root solver) and writes
  the weights; every replica writes the run-time state that is its own (data positions and
  random generators) next to replica 0's ``.solverstate``, as
  ``<prefix>_iter_<N>[_rank_<m>]_replica_<k>.solverstate``.

The effective batch is R x batch_size and the learning rate is not rescaled (Caffe's rule).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.comm import Comm
from pycaffe_mpi.comm import replicas as replicas_mod
from pycaffe_mpi.proto import caffe_pb2

LOGGER = logging.getLogger("pycaffe_mpi")


def replica_state_path(state_path: str, replica: int) -> str:
    """Where replica ``replica`` keeps its own run-time state beside ``state_path``."""
    stem = state_path[:-len(".h5")] if state_path.endswith(".h5") else state_path
    stem = stem[:-len(".solverstate")] if stem.endswith(".solverstate") else stem
    return f"{stem}_replica_{replica}.solverstate"


class DataParallel:
    """The solver's side of data parallelism (created by :func:`setup`).

    Attributes:
        groups: this rank's place and communicators
            (:class:`~pycaffe_mpi.comm.replicas.ReplicaGroups`).
        bucket_mb: bucket size in MB (None: a quarter of the gradients, between 64 KB and
            4 MB, :func:`~pycaffe_mpi.comm.replicas.default_bucket_bytes`); overlap: start
            buckets during backward (False: all at the end, for measuring what overlap saves).
        comm_seconds: time waited for the Allreduce in the last iteration;
        backward_seconds: time of the last backward pass that the buckets overlapped.
    """

    def __init__(self, groups: replicas_mod.ReplicaGroups, bucket_mb: float | None,
                 overlap: bool = True) -> None:
        self.groups = groups
        self.bucket_mb = None if bucket_mb is None else float(bucket_mb)
        self.overlap = overlap
        self.reducer: replicas_mod.BucketedAllreduce | None = None
        self._ready_at: dict[int, list[int]] = {}
        self.comm_seconds = 0.0
        self.backward_seconds = 0.0

    @property
    def replica(self) -> int:
        return self.groups.replica

    @property
    def replicas(self) -> int:
        return self.groups.replicas

    @property
    def is_root_replica(self) -> bool:
        return self.groups.is_root_replica

    # -- set-up ---------------------------------------------------------------------------------
    def attach(self, net: Any, layer_wise_reduce: bool = True) -> None:
        """Prepare ``net`` (the train net): split its data sources, take replica 0's weights
        and plan the gradient buckets (collective over the replicas). ``layer_wise_reduce``
        (the solver field, Caffe's default true) starts buckets during backward; false starts
        them all after it. Unlike Caffe, shared weights are fine: a shared parameter's bucket
        waits for its last user."""
        self.overlap = self.overlap and bool(layer_wise_reduce)
        for layer in net.layers:
            # a bagging member's bootstrap sample is drawn from its (per-replica) generator:
            # every replica must read replica 0's sample, each its own share of it
            order = getattr(layer, "bootstrap_indices", None)
            if order is not None and self.groups.across.size > 1:
                self.groups.across.bcast(order, 0)
        for layer in net.layers:
            split = getattr(layer, "set_replica", None)
            if callable(split):
                split(self.replica, self.replicas)
            elif not self.is_root_replica:  # replica 0 warns for all
                continue
            elif getattr(layer, "is_data", False) and layer.type not in ("Input", "DummyData"):
                LOGGER.warning("%s layer %s cannot split its data between replicas: every "
                               "replica reads the same records", layer.type, layer.name)
            elif layer.type == "Python":
                # NOTE: Caffe refuses too ("PythonLayer does not support CLI Multi-GPU"); a
                # user layer's data and state are its own, so say what it means here
                LOGGER.warning("Python layer %s runs in every replica: a Python data layer "
                               "must split its data itself (each replica reads the same "
                               "records otherwise)", layer.name)
        params = net.learnable_params
        replicas_mod.broadcast_from_root(self.groups.across, [p.data for p in params])
        ready = _ready_layers(net)
        itemsize = params[0].diff.dtype.itemsize if params else 4
        sizes = [p.count for p in params]
        limit = (replicas_mod.default_bucket_bytes(sum(sizes) * itemsize)
                 if self.bucket_mb is None else int(self.bucket_mb * 2**20))
        buckets = replicas_mod.plan_buckets(sizes, ready, limit, itemsize)
        self.reducer = replicas_mod.BucketedAllreduce(self.groups.across, params, buckets,
                                                      net.backend.xp)
        self._ready_at = {}
        for b, idx in enumerate(buckets):
            self._ready_at.setdefault(min(ready[i] for i in idx), []).append(b)
        LOGGER.info("Data parallel: replica %d of %d (model rank %d of %d); %d gradient "
                    "bucket(s), %.3g MB", self.replica, self.replicas, self.groups.model_rank,
                    self.groups.layout.model_size, len(buckets), self.reducer.nbytes / 2**20)

    def check_weights(self, net: Any, iteration: int) -> None:
        """Refuse to train unless every replica holds the same weights at the same iteration
        (collective over the world: every rank fails together)."""
        to_host = net.backend.to_host
        d = replicas_mod.digest([p.data for p in net.learnable_params], to_host)
        replicas_mod.check_agree(
            self.groups, (int(iteration), d), "the (iteration, weights digest) they "
            "start from", "give every rank the same --weights / --snapshot (one per model "
            "rank, not per replica)")

    # -- each iteration -------------------------------------------------------------------------
    def forward_backward(self, net: Any) -> float:
        """The last pass of an iteration: forward, then backward layer by layer, starting
        each gradient bucket as soon as the layers it covers are done."""
        loss = net.forward_loss()
        t0 = time.perf_counter()
        reducer = self.reducer
        assert reducer is not None, "attach() the train net first"
        for i in range(len(net.layers) - 1, -1, -1):
            net.backward_from_to(i, i)
            if self.overlap:
                for b in self._ready_at.get(i, ()):
                    reducer.start(b)
                reducer.progress()
        self.backward_seconds = time.perf_counter() - t0
        return loss

    def finish(self, loss: float) -> float:
        """Wait for the buckets (the diffs become the replicas' mean); return the mean loss."""
        reducer = self.reducer
        assert reducer is not None, "attach() the train net first"
        t0 = time.perf_counter()
        reducer.finish()
        mean = reducer.mean_scalar(float(loss))
        self.comm_seconds = time.perf_counter() - t0
        return mean

    def mean_loss(self, loss: float) -> float:
        """The mean of ``loss`` over the replicas (collective over the replicas)."""
        reducer = self.reducer
        assert reducer is not None, "attach() the train net first"
        return reducer.mean_scalar(float(loss))

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot(self, solver: Any, write_root: Any) -> str:
        """Replica 0 writes the weights and solver state (``write_root()``); every other
        replica writes only its own run-time state beside it."""
        if self.is_root_replica:
            return write_root()
        state = caffe_pb2.SolverState(iter=solver.iter, current_step=solver.current_step)
        for entry in solver.solver_state().layer_state:
            state.layer_state.add().CopyFrom(entry)
        path = replica_state_path(solver._snapshot_filename(".solverstate"), self.replica)
        LOGGER.info("Snapshotting replica %d's run-time state to %s", self.replica, path,
                    extra={"all_ranks": True})
        io.write_proto_binary(path, state)
        return path

    def restore(self, solver: Any, path: str, restore_root: Any) -> None:
        """Every replica reads replica 0's snapshot (weights, history, iteration), then its own
        run-time state when the run that wrote it had this replica (else it starts its data
        where replica 0's stood, with its own generators)."""
        restore_root(path)
        if self.is_root_replica:
            return
        own = replica_state_path(path, self.replica)
        if not os.path.exists(own):
            LOGGER.warning("%s not found: replica %d resumes from replica 0's data position "
                           "and generators", own, self.replica, extra={"all_ranks": True})
            return
        state = io.read_proto_binary(own, caffe_pb2.SolverState())
        if int(state.iter) != solver.iter:
            raise errors.SnapshotError(f"{own}: iteration {state.iter}, but {path} is at "
                                       f"iteration {solver.iter}")
        solver._restore_layer_states(state, own)


def _ready_layers(net: Any) -> list[int]:
    """For each learnable parameter, the lowest index of the layers that use it."""
    by_diff = {id(p.diff): i for i, p in enumerate(net.learnable_params)}
    by_blob = {id(p): i for i, p in enumerate(net.learnable_params)}
    ready = [len(net.layers)] * len(net.learnable_params)
    for li, layer in enumerate(net.layers):
        for b in layer.blobs:
            j = by_blob.get(id(b), by_diff.get(id(b.diff)))
            if j is not None:
                ready[j] = min(ready[j], li)
    return [0 if r == len(net.layers) else r for r in ready]


def resolve_replicas(flag: int | None, field: int, log: logging.Logger = LOGGER) -> int:
    """The replica count: ``flag`` (``--replicas``, ``replicas=``) when given, else the solver's
    ``replicas`` field when set (not 0), else 1. A flag that overrides a different field says so."""
    if flag is not None:
        if int(field) != 0 and int(field) != int(flag):
            log.info("--replicas %d overrides the solver's replicas: %d", int(flag), int(field))
        return int(flag)
    return int(field) if int(field) != 0 else 1  # a negative field: setup() refuses it


def model_ranks(param: Any) -> int:
    """The ranks one copy of the solver's train net needs (its ``mpi_rank`` rules and comm-layer
    roots; 1 for a plain net, and when the net cannot be read here: the solver says why)."""
    from pycaffe_mpi import netparam
    from pycaffe_mpi.comm import plan

    try:
        for field in ("net_param", "train_net_param"):
            if param.HasField(field):
                return plan.ranks_needed(getattr(param, field))[0]
        for field in ("net", "train_net"):
            if param.HasField(field):
                return plan.ranks_needed(netparam.read_net(getattr(param, field)).param)[0]
    except (OSError, errors.PycaffeError):
        pass
    return 1


def setup(world: Comm | None, replicas: int, bucket_mb: float | None = None,
          overlap: bool = True) -> DataParallel | None:
    """Split ``world`` into ``replicas`` replicas (collective); None when there is one."""
    if int(replicas) < 1:
        raise errors.SolverError(f"replicas must be >= 1, got {replicas}")
    if int(replicas) == 1:
        return None
    if world is None:
        from pycaffe_mpi import comm as comm_mod

        world = comm_mod.world()
    # NOTE: ranks that disagree would create different groups and wait forever (the Solver's
    # settings agreement has compared the count over the world already; this guards others)
    asked = world.allgather_obj(int(replicas))
    if len(set(asked)) > 1:
        raise errors.SolverError(
            "the ranks disagree on the number of replicas: " + ", ".join(
                f"rank {r}: {n}" for r, n in enumerate(asked)) + "; give every rank the same "
            "--replicas or solver field replicas")
    groups = replicas_mod.split(world, int(replicas))
    return DataParallel(groups, bucket_mb, overlap)
