"""CIFAR10-Quick train-step time against the floor of its own matrix products.

Prints, in one run: the time of one SGD train step (forward + backward + update) at batch 100
and 350; the time of the same net's GEMMs alone, done as whole-batch NumPy matmuls (the floor a
NumPy implementation cannot beat); their ratio; and each layer's share of the step.

Run it with OpenBLAS's machine overrides unset (they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_cifar10_quick.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import _nets  # noqa: E402

from pycaffe_mpi import solvers  # noqa: E402
from pycaffe_mpi.proto import caffe_pb2  # noqa: E402

NET = os.path.join(ROOT, "models", "cifar10_quick", "train_test.prototxt")


def bench_net(batch: int) -> caffe_pb2.NetParameter:
    """CIFAR10-Quick with its Data layers swapped for synthetic DummyData of the same shape."""
    return _nets.with_dummy_data(NET, batch)


def make_solver(batch: int) -> solvers.Solver:
    sp = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.004,
                                   lr_policy="fixed", max_iter=10**6, display=0,
                                   random_seed=1, solver_mode=0)
    sp.net_param.CopyFrom(bench_net(batch))
    return solvers.Solver(sp)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_shapes(net) -> list[tuple[str, int, int, int, int]]:
    """(layer, groups, m, k, n) for every matrix product one forward+backward of ``net`` needs:
    ``groups`` independent (m, k) @ (k, n) products, as a grouped (e.g. depthwise) convolution
    has one per group."""
    out = []
    for i, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        bottom, top = net.bottom_vecs[i], net.top_vecs[i]
        needs_dx = any(net.bottom_need_backward[i])
        if layer.type == "Convolution":
            g = layer.layer_param.convolution_param.group or 1
            w = layer.blobs[0].shape  # (Cout, Cin/g, kh, kw)
            m, k = w[0] // g, int(np.prod(w[1:]))
            n = top[0].shape[0] * int(np.prod(top[0].shape[2:]))
            out += [(name, g, m, k, n), (name, g, m, n, k)]  # forward, weight grad
            if needs_dx:
                out.append((name, g, k, m, n))  # data grad
        elif layer.type == "InnerProduct":
            b = bottom[0].shape[0]
            kk = bottom[0].count // b
            m = top[0].shape[1]
            out += [(name, 1, b, kk, m), (name, 1, m, b, kk)]
            if needs_dx:
                out.append((name, 1, b, m, kk))
    return out


def gemm_flops(shapes) -> float:
    """Floating-point operations (2 m k n per product) of ``gemm_shapes``' products."""
    return float(sum(2 * g * m * k * n for _, g, m, k, n in shapes))


def time_gemms(shapes, repeats: int) -> dict[str, float]:
    """Best time of each layer's products, in seconds, each done as one whole-batch NumPy
    matmul (over the groups of a grouped convolution: a stacked matmul or an einsum, whichever
    is faster; a depthwise convolution's products are thin, where einsum often wins)."""
    rng = np.random.default_rng(0)
    per_layer: dict[str, float] = {}
    for name, g, m, k, n in shapes:
        lead = (g,) if g > 1 else ()
        a = rng.standard_normal((*lead, m, k), dtype=np.float32)
        b = rng.standard_normal((*lead, k, n), dtype=np.float32)
        c = np.empty((*lead, m, n), np.float32)
        np.matmul(a, b, out=c)
        t = best_of(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), repeats)
        if g > 1:
            t = min(t, best_of(lambda a=a, b=b, c=c: np.einsum("gmk,gkn->gmn", a, b, out=c),
                               repeats))
        per_layer[name] = per_layer.get(name, 0.0) + t
        del a, b, c
    return per_layer


def layer_times(net, repeats: int) -> list[float]:
    """Best forward + best backward time of each layer, in seconds."""
    n = len(net.layers)
    fwd, bwd = [float("inf")] * n, [float("inf")] * n
    for _ in range(repeats):
        for i in range(n):
            t = time.perf_counter()
            net.forward_from_to(i, i)
            fwd[i] = min(fwd[i], time.perf_counter() - t)
        for i in range(n - 1, -1, -1):
            t = time.perf_counter()
            net.backward_from_to(i, i)
            bwd[i] = min(bwd[i], time.perf_counter() - t)
    return [f + b for f, b in zip(fwd, bwd)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats (best is kept)")
    ap.add_argument("--batches", default="100,350")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of training before timing")
    ap.add_argument("--rounds", type=int, default=4, help="timing rounds spread over time")
    args = ap.parse_args()
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var} is set; OpenBLAS runs at reduced speed here "
                  "(run with env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)")
    batches = [int(b) for b in args.batches.split(",")]
    if len(batches) > 1:
        # NOTE: each batch size in a fresh process: timing the second in the process that ran
        # the first measured up to 1.7x slower steps on this VM (allocator/page-fault effects)
        for b in batches:
            subprocess.run([sys.executable, __file__, "--batches", str(b), "--repeats",
                            str(args.repeats), "--warmup", str(args.warmup), "--rounds",
                            str(args.rounds)], check=True)
        return 0
    for batch in batches:
        solver = make_solver(batch)
        net = solver.net
        # NOTE: a fresh process on this VM often runs the conv layers ~2x slower for its first
        # several seconds; warm up for a while so the numbers are the steady state.
        t_warm = time.perf_counter()
        while time.perf_counter() - t_warm < args.warmup:
            solver.step(1)
        # NOTE: this VM has slow phases of several seconds (the conv layers' memory traffic
        # runs ~2x slower); rounds of step and per-layer timings spread over time, keeping the
        # best of each, measure the steady state.
        step, per = float("inf"), None
        for _ in range(args.rounds):
            step = min(step, best_of(lambda s=solver: s.step(1), args.repeats))
            times = layer_times(net, max(3, args.repeats // 2))
            per = times if per is None else [min(a, b) for a, b in zip(per, times)]
        floor_parts = time_gemms(gemm_shapes(net), args.repeats)
        floor = sum(floor_parts.values())
        print(f"batch {batch}: train step {step * 1e3:7.1f} ms | GEMMs alone {floor * 1e3:6.1f} ms"
              f" | step / GEMM floor = {step / floor:.2f}x")
        total = sum(per)
        print(f"  per-layer forward+backward (sum {total * 1e3:.1f} ms; update and overhead "
              f"{(step - total) * 1e3:.1f} ms):")
        for name, t in zip(net.layer_names, per):
            g = floor_parts.get(name)
            gtxt = f"  (GEMMs {g * 1e3:5.1f} ms, {t / g:4.2f}x)" if g else ""
            print(f"    {name:>10s} {t * 1e3:7.2f} ms {100 * t / step:5.1f}%{gtxt}")
        net.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
