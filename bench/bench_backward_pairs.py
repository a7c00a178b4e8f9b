"""A net's backward with its in-place BatchNorm + Scale pairs taken together and apart.

``Net.backward_from_to`` lets an in-place Scale right after an in-place BatchNorm take both
gradients in one call (``Scale.backward_with``, listed in ``net.backward_pairs``); emptying
``net.backward_pairs`` runs every layer's backward alone. Both ways run in this process on one
training net (the zoo's ResNet-50 at batch 8 and MobileNet v1 at batch 16, float32) after one
forward, alternating, best of several rounds after an untimed one; it prints each one's
backward time, the pairs' count and the ratio. Run it with OpenBLAS's machine overrides unset
(they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_backward_pairs.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pycaffe_mpi.layer import TRAIN  # noqa: E402
from pycaffe_mpi.net import Net  # noqa: E402
from pycaffe_mpi.testing import zoo  # noqa: E402

NETS = {"resnet50": (zoo.resnet50, 8), "mobilenet_v1": (zoo.mobilenet_v1, 16)}


def time_backward(name: str, batch: int, size: int, rounds: int) -> tuple[int, float, float]:
    """(pairs, best backward together, best backward apart) in seconds."""
    build = NETS[name][0]
    net = Net(build(batch=batch, size=size, loss=True), TRAIN, seed=1)
    try:
        rng = np.random.default_rng(0)
        net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
        net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].shape)
        net.forward_loss()
        pairs = dict(net.backward_pairs)
        best = {True: float("inf"), False: float("inf")}
        for r in range(rounds + 1):  # round 0 warms up (first-use allocations)
            for together in (True, False):
                net.backward_pairs = pairs if together else {}
                t0 = time.perf_counter()
                net.backward_all()
                if r:
                    best[together] = min(best[together], time.perf_counter() - t0)
        return len(pairs), best[True], best[False]
    finally:
        net.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="batch 1 (a smoke test)")
    args = ap.parse_args()
    print(f"backward of a training net (float32), best of {args.rounds} alternating rounds")
    for name, (_, batch) in NETS.items():
        batch, size = (1 if args.small else batch), 224
        pairs, together, apart = time_backward(name, batch, size, args.rounds)
        print(f"  {name:<13} b{batch:<3} {size}x{size}: {pairs} pairs, together "
              f"{together * 1e3:8.1f} ms, apart {apart * 1e3:8.1f} ms, "
              f"together / apart = {together / apart:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
