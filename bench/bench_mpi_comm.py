"""What the MPI comm layers cost in a TreeNet train step, and their speed against raw MPI.

Runs ``models/cifar10_mpi`` (CIFAR10-Quick as a 3-rank TreeNet) at batch 100 with its Data layers
swapped for synthetic DummyData of the same shape, and prints, measured in one run:

1. the share of a train step (forward + backward + update, ``Solver.step(1)``) spent in the comm
   layers (their reshape + forward + backward, timed inside the step), on rank 0 and the maximum
   over ranks. "as trained" counts everything inside the comm calls, including the time a rank
   waits there for the others (ranks 1 and 2 wait in the broadcast while rank 0 computes the
   trunk: that is load imbalance, not communication). "transfer only" puts a barrier before
   every comm call and counts neither the barrier nor its wait;
2. each comm layer's forward and backward alone against raw mpi4py buffer collectives
   (Bcast/Reduce for MPIBroadcast, Gather/Scatter for MPIGather) moving the same bytes between
   the same ranks, on preallocated arrays: times, GB/s and their ratio. MPIBroadcast's root
   returns from forward once its sends are posted (it finishes them at its next forward or in
   backward), so its forward's rank-0 time is posting; the members' time (the maximum in
   brackets) is the transfer.

``python bench/bench_mpi_comm.py`` launches itself under the venv's ``mpiexec -n 3``. Run it with
OpenBLAS's machine overrides unset (they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_mpi_comm.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# NOTE: pycaffe_mpi first: under mpiexec it sets the BLAS threads per rank before NumPy loads.
import pycaffe_mpi  # noqa: E402,F401

# isort: split
import _nets  # noqa: E402
import numpy as np  # noqa: E402

from pycaffe_mpi import comm as comm_mod  # noqa: E402
from pycaffe_mpi import solvers  # noqa: E402
from pycaffe_mpi.net import COMM_TYPES  # noqa: E402
from pycaffe_mpi.proto import caffe_pb2  # noqa: E402

NET = os.path.join(ROOT, "models", "cifar10_mpi", "train_test.prototxt")
RANKS = 3


# -- the launcher ------------------------------------------------------------------------------
def launch(argv: list[str]) -> int:
    from pycaffe_mpi.testing import mpirun

    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    try:
        proc = mpirun.run_mpi(RANKS, cmd, timeout=600, cwd=ROOT)
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
    return proc.returncode


# -- the net -----------------------------------------------------------------------------------
def bench_net(batch: int) -> caffe_pb2.NetParameter:
    """The TreeNet with its TRAIN Data layer swapped for DummyData (same tops, same rank rule)
    and its TEST Data layer dropped."""
    return _nets.with_dummy_data(NET, batch)


def make_solver(batch: int, comm: Any) -> solvers.Solver:
    sp = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.004,
                                   lr_policy="fixed", max_iter=10**6, display=0,
                                   random_seed=1, solver_mode=caffe_pb2.SolverParameter.CPU)
    sp.net_param.CopyFrom(bench_net(batch))
    return solvers.Solver(sp, comm=comm)


# -- timing the comm layers inside the step ------------------------------------------------------
class CommTimer:
    """Wraps the comm layers' reshape/forward/backward (instance attributes) to time them."""

    METHODS = ("reshape", "forward", "backward")

    def __init__(self, net: Any) -> None:
        self.layers = [(n, lay) for n, lay in zip(net.layer_names, net.layers)
                       if lay.type in COMM_TYPES]
        self.barrier_first = False
        self.by_call: dict[str, float] = {}  # "layer.method" -> seconds inside those calls
        self.waited = 0.0  # seconds in the barriers put before them
        for name, layer in self.layers:
            for method in self.METHODS:
                setattr(layer, method, self._wrap(f"{name}.{method}", layer,
                                                  getattr(layer, method)))

    def _wrap(self, key: str, layer: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            if self.barrier_first:
                t = time.perf_counter()
                layer.comm.barrier()
                self.waited += time.perf_counter() - t
            t = time.perf_counter()
            out = fn(*args)
            self.by_call[key] = self.by_call.get(key, 0.0) + time.perf_counter() - t
            return out
        return timed

    @property
    def spent(self) -> float:
        return sum(self.by_call.values())

    def reset(self) -> None:
        self.by_call = {}
        self.waited = 0.0


def share_in_step(solver: Any, timer: CommTimer, iters: int, barrier_first: bool,
                  world: Any) -> tuple[float, float, dict[str, float]]:
    """Per iteration on this rank: step seconds (barrier waits excluded), comm seconds, and
    comm seconds by ``layer.method``."""
    timer.barrier_first = barrier_first
    step = 0.0
    timer.reset()
    for _ in range(iters):
        world.barrier()
        t = time.perf_counter()
        solver.step(1)
        step += time.perf_counter() - t
    step -= timer.waited
    return (step / iters, timer.spent / iters,
            {k: v / iters for k, v in timer.by_call.items()})


# -- comm layers alone against raw MPI ------------------------------------------------------------
def median_time(group: Any, reps: int, fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> float:
    """Median over ``reps`` of ``fn(*args, **kwargs)``, every rank starting together (the
    barrier before each call is not timed)."""
    times = []
    for _ in range(reps):
        group.barrier()
        t = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def compare_with_raw(net: Any, reps: int) -> list[tuple[str, int, float, float]]:
    """Per comm layer and direction: (what, bytes, layer seconds, raw mpi4py seconds)."""
    rows = []
    for i, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        if layer.type not in COMM_TYPES:
            continue
        bottom, top = net.bottom_vecs[i], net.top_vecs[i]
        group, root = layer.comm, layer.comm_root
        raw = group.comm  # the group's mpi4py communicator
        is_root = group.rank == root
        pdown = net.bottom_need_backward[i]
        fwd = median_time(group, reps, layer.forward, bottom, top)
        bwd = median_time(group, reps, layer.backward, top, pdown, bottom)
        if layer.type == "MPIBroadcast":
            buf = np.empty_like(top[0].data)
            red = np.empty_like(buf) if is_root else None
            rows.append((f"{name} forward  (Bcast)", buf.nbytes, fwd,
                         median_time(group, reps, raw.Bcast, buf, root)))
            rows.append((f"{name} backward (Reduce)", buf.nbytes, bwd,  # Reduce's op: SUM
                         median_time(group, reps, raw.Reduce, buf, red, root=root)))
        else:
            send = np.empty_like(bottom[0].data)
            recv = np.empty((group.size, *send.shape), send.dtype) if is_root else None
            nbytes = send.nbytes * (group.size - 1)  # what the root receives / sends
            rows.append((f"{name} forward  (Gather)", nbytes, fwd,
                         median_time(group, reps, raw.Gather, send, recv, root)))
            rows.append((f"{name} backward (Scatter)", nbytes, bwd,
                         median_time(group, reps, raw.Scatter, recv, send, root)))
    return rows


# -- the worker ------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    world = comm_mod.world()
    rank, size = world.rank, world.size
    solver = make_solver(args.batch, world)
    timer = CommTimer(solver.net)
    for _ in range(args.warmup):
        solver.step(1)
    results = {}
    for mode, barrier_first in (("as trained", False), ("transfer only", True)):
        results[mode] = world.gather_obj(
            share_in_step(solver, timer, args.iters, barrier_first, world), 0)
    timer.barrier_first = False
    rows = compare_with_raw(solver.net, args.reps)
    all_rows = world.gather_obj(rows, 0)
    if rank != 0:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"bench_mpi_comm: models/cifar10_mpi (CIFAR10-Quick TreeNet), batch {args.batch}, "
          f"DummyData, float32, {size} ranks on {cores} cores")
    if size > (cores or 1):
        print(f"NOTE: {size} ranks on {cores} cores oversubscribe the CPU: ranks take turns on "
              "the cores, so waits and step times are longer than with a core per rank")
    print(f"BLAS threads per rank: {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
          f"MPIR_CVAR_ENABLE_HEAVY_YIELD={os.environ.get('MPIR_CVAR_ENABLE_HEAVY_YIELD', '')}; "
          f"{args.warmup} warm-up + {args.iters} timed steps per mode")
    print(f"comm layers in the step: {', '.join(f'{n} ({lay.type})' for n, lay in timer.layers)}"
          " (reshape + forward + backward)")
    for mode, per_rank in results.items():
        shares = [c / s for s, c, _ in per_rank]
        print(f"\n[{mode}]")
        for r, (s, c, by_call) in enumerate(per_rank):
            parts = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in by_call.items())
            print(f"  rank {r}: step {s * 1e3:8.2f} ms, comm {c * 1e3:7.3f} ms, "
                  f"share {100 * c / s:6.2f}%   ({parts} ms)")
        print(f"  comm share of the step: rank 0 {100 * shares[0]:.2f}%, "
              f"max over ranks {100 * max(shares):.2f}%  (aim < 2%; paper: 0.49%)")
    print(f"\n[comm layers alone vs raw mpi4py, same bytes, median of {args.reps}; "
          "times on rank 0, max over ranks in brackets]")
    print(f"  {'what':36s} {'bytes':>9s} {'layer ms':>17s} {'raw ms':>17s} {'layer GB/s':>10s} "
          f"{'raw GB/s':>9s} {'layer/raw':>9s}")
    for k, (what, nbytes, t_layer, t_raw) in enumerate(rows):
        max_layer = max(rr[k][2] for rr in all_rows)
        max_raw = max(rr[k][3] for rr in all_rows)
        print(f"  {what:36s} {nbytes:9d} {t_layer * 1e3:7.3f} [{max_layer * 1e3:7.3f}] "
              f"{t_raw * 1e3:7.3f} [{max_raw * 1e3:7.3f}] {nbytes / t_layer / 1e9:10.2f} "
              f"{nbytes / t_raw / 1e9:9.2f} {t_layer / t_raw:9.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--reps", type=int, default=50, help="repetitions of each comm call alone")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not comm_mod.launched_by_mpiexec():
        return launch(sys.argv[1:] if argv is None else list(argv))
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
