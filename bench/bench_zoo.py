"""Train-step time of well-known ImageNet nets (ResNet-50, MobileNet v1, ...), layer by layer.

Builds each net with :mod:`pycaffe_mpi.testing.zoo` (the shapes of the public deploy files, a
label input and SoftmaxWithLoss on top), fills its input with N(0, 1) data and random labels,
and prints, in one run: the mean forward+backward time per step, images per second, and each
layer type's share of the step (forward and backward summed over the layers of that type), with
the slowest single layers. It is the baseline the CPU speed work measures itself against; ratios
between nets and layer types are what carries over between machines. ``bench/bench_cpu.py``
times ResNet-50 and MobileNet v1 against their GEMM floor and PyTorch in one run; this one
covers the rest of the zoo.

Run it with OpenBLAS's machine overrides unset (they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_zoo.py \
        [--nets resnet50,mobilenet_v1] [--batch 8] [--size 224] [--steps 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pycaffe_mpi.net import Net  # noqa: E402
from pycaffe_mpi.testing import zoo  # noqa: E402


def step_times(net: Net, steps: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean step seconds and per-layer forward / backward seconds over ``steps`` steps
    (after one warm-up step)."""
    n = len(net.layers)
    net.forward_from_to(0, n - 1)
    net.backward_from_to(n - 1, 0)
    fwd, bwd = np.zeros(n), np.zeros(n)
    t0 = time.perf_counter()
    for _ in range(steps):
        for i in range(n):
            t = time.perf_counter()
            net.forward_from_to(i, i)
            fwd[i] += time.perf_counter() - t
        for i in range(n - 1, -1, -1):
            t = time.perf_counter()
            net.backward_from_to(i, i)
            bwd[i] += time.perf_counter() - t
    return (time.perf_counter() - t0) / steps, fwd / steps, bwd / steps


def bench(name: str, batch: int, size: int, steps: int) -> None:
    param = zoo.NETS[name](batch=batch, size=size, loss=True)
    net = Net(param, 0, seed=1)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 1000, net.blobs["label"].shape)
    step, fwd, bwd = step_times(net, steps)
    by_type: dict[str, float] = collections.defaultdict(float)
    for layer, f, b in zip(net.layers, fwd, bwd):
        by_type[layer.type] += f + b
    total = fwd.sum() + bwd.sum()
    print(f"\n{name}: batch {batch}, {size}x{size}: step {step * 1e3:.0f} ms "
          f"(forward {fwd.sum() * 1e3:.0f} ms, backward {bwd.sum() * 1e3:.0f} ms), "
          f"{batch / step:.1f} images/s, peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("  share of the step by layer type:")
    for t, s in sorted(by_type.items(), key=lambda kv: -kv[1]):
        print(f"    {t:<18} {100 * s / total:5.1f}%  {s * 1e3:8.1f} ms")
    print("  slowest layers:")
    order = np.argsort(-(fwd + bwd))[:8]
    for i in order:
        print(f"    {net.layer_names[i]:<28} {net.layers[i].type:<14} "
              f"fwd {fwd[i] * 1e3:7.1f} ms  bwd {bwd[i] * 1e3:7.1f} ms")
    net.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="resnet50,mobilenet_v1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"{os.cpu_count()} CPUs")
    for name in args.nets.split(","):
        bench(name, args.batch, args.size, args.steps)


if __name__ == "__main__":
    main()
