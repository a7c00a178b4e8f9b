"""Data-parallel scaling: measured on this machine, modelled for 8-256 ranks.

Part 1 (measured). CIFAR10-Quick (synthetic DummyData of CIFAR-10's shape, ``--batch`` images per
replica, Caffe's rule: the effective batch grows with the replicas) trained with ``--replicas N``
at N = 1, 2 (and oversubscribed 3, 4) ranks under the venv's ``mpiexec``; BLAS threads are split
cores / ranks (``pycaffe_mpi._threads``; one process runs with all cores' threads and with one).
For each N: the step time, images/s and its ratio to the faster one-process run; the Allreduce
time with every bucket started after backward (no overlap) and the wait left at the end of the
step when buckets start during backward (overlap), and the share of the Allreduce that backward
hid (the wait also holds any load imbalance between the ranks). All from the same run.

Part 2 (modelled). For CIFAR10-Quick (batch 100), NiN (CIFAR-10, batch 128) and ResNet-50
(ImageNet, batch 32) per replica: the compute time of one step (forward + backward measured
here on one core, in a child process with one BLAS thread; ResNet-50 and NiN at a small batch,
scaled linearly; ``--compute_ms NET=MS`` replaces a measurement, e.g. with a GPU's time) and
the gradient bytes (float32 parameters), then the step time on n ranks over common
interconnects with a ring Allreduce in buckets::

    t_comm(n) = 2 (n-1)/n * bytes / bandwidth + buckets * 2 (n-1) * latency
    t_step(n) = t_forward + max(t_backward, t_comm(n))    (backward ~ 2/3 of compute, overlapped)

printed as a table with, per net and interconnect, the first n at which t_comm exceeds the
compute time (communication dominates), and plotted with matplotlib (``--plot``).

Run (a few minutes on 2 cores; ``--quick``: about 30 s, numbers only prove it runs)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_scaling.py \\
        --plot docs/data_parallel_scaling.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# NOTE: pycaffe_mpi first: under mpiexec it sets the BLAS threads per rank before NumPy loads.
import pycaffe_mpi  # noqa: E402,F401

# isort: split
import _nets  # noqa: E402
import numpy as np  # noqa: E402

from pycaffe_mpi import solvers  # noqa: E402
from pycaffe_mpi.proto import caffe_pb2  # noqa: E402

NET = os.path.join(ROOT, "models", "cifar10_quick", "train_test.prototxt")

#: name: (bandwidth GB/s per link as MPI sees it, latency s per message step)
INTERCONNECTS = {
    "1 GbE": (0.117, 50e-6),
    "10 GbE": (1.17, 20e-6),
    "25 GbE": (2.9, 10e-6),
    "IB EDR 100 Gb/s": (11.5, 2e-6),
    "IB HDR 200 Gb/s": (23.0, 1.5e-6),
}
MODEL_RANKS = (8, 16, 32, 64, 128, 256)
BUCKET_MB = 4.0  # the largest default bucket (pycaffe_mpi.comm.replicas)


# -- part 1: the worker (one per rank under mpiexec) --------------------------------------------
def make_solver(batch: int, replicas: int, comm: Any) -> solvers.Solver:
    sp = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.004,
                                   lr_policy="fixed", max_iter=10**6, display=0,
                                   random_seed=1, solver_mode=caffe_pb2.SolverParameter.CPU)
    sp.net_param.CopyFrom(_nets.with_dummy_data(NET, batch))
    return solvers.Solver(sp, comm=comm, replicas=replicas)


def timed_steps(solver: Any, iters: int) -> tuple[float, float, float]:
    """(step s, Allreduce wait s, backward s), medians over ``iters`` steps."""
    steps, waits, backs = [], [], []
    dp = solver.dp
    for _ in range(iters):
        t = time.perf_counter()
        solver.step(1)
        steps.append(time.perf_counter() - t)
        waits.append(dp.comm_seconds if dp else 0.0)
        backs.append(dp.backward_seconds if dp else 0.0)
    return float(np.median(steps)), float(np.median(waits)), float(np.median(backs))


def worker(batch: int, iters: int) -> None:
    from pycaffe_mpi import comm as comm_mod

    world = comm_mod.world()
    solver = make_solver(batch, world.size, world)
    try:
        solver.step(2)  # warm-up: allocations, first-touch of buffers
        step_on, wait_on, back_on = timed_steps(solver, iters)
        step_off = wait_off = 0.0
        if solver.dp is not None:
            solver.dp.overlap = False
            step_off, wait_off, _ = timed_steps(solver, iters)
    finally:
        solver.close()
    if world.rank == 0:
        nbytes = sum(p.count for p in solver.net.learnable_params) * 4
        print("RESULT " + json.dumps({
            "ranks": world.size, "batch": batch, "step_s": step_on, "wait_overlap_s": wait_on,
            "backward_s": back_on, "step_no_overlap_s": step_off, "allreduce_s": wait_off,
            "bytes": nbytes, "threads": os.environ.get("OPENBLAS_NUM_THREADS", "")}),
            flush=True)


def measure(ranks: list[int], batch: int, iters: int) -> list[dict]:
    from pycaffe_mpi.testing import mpirun

    out = []
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch),
           "--iters", str(iters)]
    # NOTE: one process is measured with all cores' BLAS threads and with one: on a loaded
    # machine multi-threaded BLAS can lose to one thread, and the better one is the baseline
    settings = [(n, None) for n in ranks]
    if 1 in ranks and (os.cpu_count() or 1) > 1:
        settings.insert(ranks.index(1) + 1, (1, "1"))
    for n, threads in settings:
        env = dict(os.environ)
        if threads:
            env.update({v: threads for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                             "MKL_NUM_THREADS")})
        proc = mpirun.run_mpi(n, cmd, timeout=600, cwd=ROOT, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{n} ranks failed (rc {proc.returncode})")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        out.append(json.loads(line[len("RESULT "):]))
    return out


def report_measured(rows: list[dict]) -> None:
    cores = os.cpu_count()
    print(f"\n== measured: CIFAR10-Quick, batch {rows[0]['batch']} per replica, "
          f"{cores} cores, BLAS threads = cores / ranks ==")
    print(f"{'ranks':>5} {'threads':>7} {'step ms':>8} {'img/s':>8} {'vs 1':>6} "
          f"{'allreduce ms':>12} {'left after bwd ms':>17} {'hidden':>7} {'grad MB':>8}")
    base = max((r["batch"] / r["step_s"] for r in rows if r["ranks"] == 1), default=None)
    for r in rows:
        ips = r["ranks"] * r["batch"] / r["step_s"]
        base = base or ips
        if r["ranks"] > 1:
            hidden = 1.0 - r["wait_overlap_s"] / r["allreduce_s"] if r["allreduce_s"] else 0.0
            comm = (f"{1e3 * r['allreduce_s']:12.2f} {1e3 * r['wait_overlap_s']:17.2f} "
                    f"{100 * max(0.0, hidden):6.0f}%")
        else:
            comm = f"{'-':>12} {'-':>17} {'-':>7}"
        print(f"{r['ranks']:>5} {r['threads']:>7} {1e3 * r['step_s']:8.1f} {ips:8.0f} "
              f"{ips / base:6.2f} {comm} {r['bytes'] / 2**20:8.3f}")
    print("(vs 1: against the faster one-process run; the machine's other load counts too)")
    if any(r["ranks"] > (cores or 1) for r in rows):
        print(f"(ranks beyond {cores} cores are oversubscribed: the ratio shows the cost, "
              "not a speed-up)")


# -- part 2: the model ---------------------------------------------------------------------------
def nin(batch: int) -> caffe_pb2.NetParameter:
    """Network in Network for CIFAR-10 (Lin et al. 2014, the Caffe model zoo's layout) on
    DummyData: three mlpconv blocks (a conv and two 1x1 convs, ReLU after each)."""
    from google.protobuf import text_format

    t = f"""name: "nin"
layer {{ name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param {{
  shape {{ dim: {batch} dim: 3 dim: 32 dim: 32 }} shape {{ dim: {batch} }}
  data_filler {{ type: "gaussian" std: 50 }} data_filler {{ type: "constant" value: 1 }} }} }}
"""
    bottom = "data"
    blocks = [(("conv1", 192, 5, 2), ("cccp1", 160, 1, 0), ("cccp2", 96, 1, 0), "MAX"),
              (("conv2", 192, 5, 2), ("cccp3", 192, 1, 0), ("cccp4", 192, 1, 0), "AVE"),
              (("conv3", 192, 3, 1), ("cccp5", 192, 1, 0), ("cccp6", 10, 1, 0), "GLOBAL")]
    for b, (*convs, pool) in enumerate(blocks, start=1):
        for name, num, k, pad in convs:
            t += (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" '
                  f'top: "{name}" convolution_param {{ num_output: {num} kernel_size: {k} '
                  f'pad: {pad} weight_filler {{ type: "gaussian" std: 0.05 }} }} }}\n'
                  f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" '
                  f'top: "{name}" }}\n')
            bottom = name
        kind = "MAX" if pool == "MAX" else "AVE"
        shape = "global_pooling: true" if pool == "GLOBAL" else "kernel_size: 3 stride: 2"
        t += (f'layer {{ name: "pool{b}" type: "Pooling" bottom: "{bottom}" top: "pool{b}" '
              f"pooling_param {{ pool: {kind} {shape} }} }}\n")
        bottom = f"pool{b}"
    t += (f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{bottom}" '
          'bottom: "label" top: "loss" }\n')
    return text_format.Merge(t, caffe_pb2.NetParameter())


def compute_time(param: Any, iters: int) -> tuple[float, int]:
    """(seconds of one forward+backward, gradient bytes as float32) of a net, one process."""
    from pycaffe_mpi.net import Net

    net = Net(param, 0)
    try:
        net.forward_backward()  # warm-up
        t = time.perf_counter()
        for _ in range(iters):
            net.forward_backward()
        seconds = (time.perf_counter() - t) / iters
        return seconds, sum(p.count for p in net.learnable_params) * 4
    finally:
        net.close()


def model_nets(quick: bool, overrides: dict[str, float]) -> list[tuple[str, int, float, int]]:
    """(name, batch per replica, compute s at that batch, gradient bytes) for the three nets."""
    from pycaffe_mpi.testing import zoo

    # (name, nominal batch, measured batch, builder)
    nets = [("CIFAR10-Quick", 100, 20 if quick else 100,
             lambda b: _nets.with_dummy_data(NET, b)),
            ("NiN", 128, 2 if quick else 16, nin),
            ("ResNet-50", 32, 1, lambda b: zoo.resnet50(batch=b, size=224))]
    out = []
    for name, batch, measured_at, build in nets:
        seconds, nbytes = compute_time(build(measured_at), 1 if quick or batch != 100 else 3)
        seconds *= batch / measured_at
        out.append((name, batch, seconds, nbytes))
    return out


def one_core_compute(quick: bool, overrides: dict[str, float]
                     ) -> list[tuple[str, int, float, int]]:
    """:func:`model_nets` measured in a child process with one BLAS thread (one core per
    replica: steadier than all cores on a shared machine), then ``overrides`` applied."""
    import subprocess

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--compute_worker"]
    proc = subprocess.run(cmd + (["--quick"] if quick else []), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit("measuring the compute times failed")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("NETS "))
    nets = [tuple(n) for n in json.loads(line[len("NETS "):])]
    return [(name, batch, overrides[name] / 1e3 if name in overrides else sec, nbytes)
            for name, batch, sec, nbytes in nets]


def n_buckets(nbytes: float) -> int:
    from pycaffe_mpi.comm import replicas

    return max(1, math.ceil(nbytes / replicas.default_bucket_bytes(int(nbytes))))


def ring_allreduce_s(n: int, nbytes: float, gbps: float, latency: float) -> float:
    buckets = n_buckets(nbytes)
    return 2 * (n - 1) / n * nbytes / (gbps * 1e9) + buckets * 2 * (n - 1) * latency


def step_s(compute: float, comm: float) -> float:
    fwd, bwd = compute / 3, 2 * compute / 3
    return fwd + max(bwd, comm)


def report_model(nets: list[tuple[str, int, float, int]], plot: str | None) -> None:
    print("\n== modelled: ring Allreduce time (ms) on n ranks; compute / step at 256 ranks "
          "(backward overlapped); where communication starts to dominate ==")
    for name, batch, compute, nbytes in nets:
        print(f"\n{name}: batch {batch}/replica, compute {1e3 * compute:.1f} ms/step, "
              f"gradients {nbytes / 2**20:.1f} MB in "
              f"{n_buckets(nbytes)} bucket(s)")
        print(f"{'interconnect':>17} " + " ".join(f"{n:>7}" for n in MODEL_RANKS)
              + f" {'eff@256':>7}  comm > compute from")
        for ic, (gbps, lat) in INTERCONNECTS.items():
            comm = [ring_allreduce_s(n, nbytes, gbps, lat) for n in MODEL_RANKS]
            eff = compute / step_s(compute, comm[-1])
            dominant = next((n for n in range(2, 4097)
                             if ring_allreduce_s(n, nbytes, gbps, lat) > compute), None)
            print(f"{ic:>17} " + " ".join(f"{1e3 * t:7.2f}" for t in comm)
                  + f" {eff:7.2f}  {f'{dominant} ranks' if dominant else 'never (<= 4096)'}")
    if plot:
        draw(nets, plot)
        print(f"\nwrote {plot}")


def draw(nets: list[tuple[str, int, float, int]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 4), squeeze=False)
    ranks = [2**k for k in range(1, 9)]
    for ax, (name, _batch, compute, nbytes) in zip(axes[0], nets):
        for ic, (gbps, lat) in INTERCONNECTS.items():
            eff = [compute / step_s(compute, ring_allreduce_s(n, nbytes, gbps, lat))
                   for n in ranks]
            ax.plot(ranks, eff, marker="o", ms=3, label=ic)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("ranks (replicas)")
        ax.set_ylabel("scaling efficiency (compute / step)")
        ax.set_title(f"{name}: {nbytes / 2**20:.1f} MB grads, {1e3 * compute:.0f} ms compute",
                     fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compute_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", default="1,2,3,4", help="rank counts to measure (default 1,2,3,4)")
    ap.add_argument("--batch", type=int, default=50, help="images per replica (default 50)")
    ap.add_argument("--iters", type=int, default=8, help="timed steps per setting (default 8)")
    ap.add_argument("--quick", action="store_true", help="a few seconds: 1,2 ranks, small "
                    "batches, 3 steps; numbers only prove the bench runs")
    ap.add_argument("--compute_ms", action="append", default=[], metavar="NET=MS",
                    help="use MS as NET's compute time per step (e.g. ResNet-50=95 for a GPU)")
    ap.add_argument("--plot", default=None, help="write the efficiency plot here (PNG)")
    ap.add_argument("--model_only", action="store_true", help="skip the measured part")
    args = ap.parse_args()
    if args.worker:
        worker(args.batch, args.iters)
        return 0
    if args.compute_worker:
        print("NETS " + json.dumps(model_nets(args.quick, {})))
        return 0
    if args.quick:
        args.ranks, args.batch, args.iters = "1,2", 10, 3
    overrides = {k: float(v) for k, v in (s.split("=", 1) for s in args.compute_ms)}
    if not args.model_only:
        report_measured(measure([int(r) for r in args.ranks.split(",")], args.batch,
                                args.iters))
    report_model(one_core_compute(args.quick, overrides), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
