"""Winograd's convolutions against im2col + GEMM, layer by layer, in one run.

For the 3x3 and 5x5 layers of ResNet-50 (batch 8) and CIFAR10-Quick (batch 100 and 350) it
times one :class:`~pycaffe_mpi.kernels.conv_plan.ConvPlan` forward, input gradient and weight
gradient as the layer runs them (Winograd, ``engine: DEFAULT``) and with ``engine: CAFFE``
(im2col + GEMM), alternating, best of several rounds, on the cores the training uses, and
prints both and their ratio (and the largest difference of the outputs, relative to their
scale). Run it with OpenBLAS's machine overrides unset (they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_winograd.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pycaffe_mpi.kernels import conv_plan, threads  # noqa: E402

# (name, N, C, O, H=W, kernel, pad)
LAYERS = [
    ("ResNet-50 res2 3x3, b8", 8, 64, 64, 56, 3, 1),
    ("ResNet-50 res3 3x3, b8", 8, 128, 128, 28, 3, 1),
    ("ResNet-50 res4 3x3, b8", 8, 256, 256, 14, 3, 1),
    ("CIFAR10-Quick conv2, b100", 100, 32, 32, 16, 5, 2),
    ("CIFAR10-Quick conv3, b100", 100, 32, 64, 8, 5, 2),
    ("CIFAR10-Quick conv2, b350", 350, 32, 32, 16, 5, 2),
    ("CIFAR10-Quick conv3, b350", 350, 32, 64, 8, 5, 2),
]
SMALL = [("small 3x3", 2, 16, 16, 9, 3, 1), ("small 5x5", 2, 16, 16, 8, 5, 2)]


def one_layer(n: int, c: int, o: int, h: int, k: int, pad: int,
              rounds: int) -> tuple[float, float, int, float]:
    """Best forward + input gradient + weight gradient time of Winograd and of im2col, the
    Winograd tile ``m`` and the outputs' largest difference over their largest value."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, h), dtype=np.float32)
    w = rng.standard_normal((o, c, k, k), dtype=np.float32) / np.float32(np.sqrt(c * k * k))
    bias = rng.standard_normal(o, dtype=np.float32)
    plans = {}
    for wino in (True, False):
        plan = conv_plan.ConvPlan(np, np.float32, c, o, 1, (k, k), (1, 1), (pad, pad), (1, 1),
                                  winograd=wino)
        plan.reshape(n, (h, h))
        plans[wino] = plan
    out = plans[True].out
    dy = rng.standard_normal((n, o, *out), dtype=np.float32)
    assert x.dtype == w.dtype == bias.dtype == dy.dtype == np.float32
    bufs = {wino: (np.empty((n, o, *out), np.float32), np.empty_like(x), np.zeros_like(w))
            for wino in plans}

    def step(wino: bool) -> None:
        y, dx, dw = bufs[wino]
        plans[wino].forward(x, w, y, bias)
        plans[wino].backward(dy, x, w, dw, dx)

    best = {True: float("inf"), False: float("inf")}
    for wino in plans:
        step(wino)  # warm-up (numba's first call, scratch)
    for _ in range(rounds):
        for wino in plans:
            t0 = time.perf_counter()
            step(wino)
            best[wino] = min(best[wino], time.perf_counter() - t0)
    ref = bufs[False][0]
    err = float(np.abs(bufs[True][0] - ref).max() / np.abs(ref).max())
    return best[True], best[False], plans[True].winograd, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny layers (a smoke test)")
    args = ap.parse_args()
    print(f"forward + input gradient + weight gradient, float32, {threads.count()} lanes, best "
          f"of {args.rounds} alternating rounds")
    print(f"  {'layer':<28} {'Winograd':>10} {'im2col':>10}  ratio  max|diff|/max|y|")
    for name, n, c, o, h, k, pad in SMALL if args.small else LAYERS:
        wino, im2col, m, err = one_layer(n, c, o, h, k, pad, args.rounds)
        tag = f"F({m}x{m}, {k}x{k})" if m else "im2col (not taken)"
        print(f"  {name:<28} {wino * 1e3:8.1f} ms {im2col * 1e3:8.1f} ms  {wino / im2col:4.2f}x"
              f"  {err:.1e}  {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
