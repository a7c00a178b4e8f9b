"""The SGD update on the host: one pass (kernels/update_cpu.py) against Caffe's NumPy passes.

Both run in this process on the same parameters (ResNet-50's learnable arrays: 25.6 M float32
values in 321 arrays, momentum 0.9, L2 weight decay 5e-4), alternating, best of several
rounds; it prints each one's time per update and their ratio. The NumPy passes are the base
class :class:`pycaffe_mpi.solvers.rules.UpdateRule`, which has no one-pass kernel; the one
pass is :class:`~pycaffe_mpi.solvers.rules.SGDRule`. Run it with OpenBLAS's machine overrides
unset (they force half-speed kernels here)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_update.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pycaffe_mpi.blob import Blob  # noqa: E402
from pycaffe_mpi.kernels import threads  # noqa: E402
from pycaffe_mpi.proto import caffe_pb2  # noqa: E402
from pycaffe_mpi.solvers import rules  # noqa: E402
from pycaffe_mpi.testing import zoo  # noqa: E402


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The learnable parameters' shapes of the zoo's ResNet-50."""
    from pycaffe_mpi.net import Net

    net = Net(zoo.resnet50(batch=1), phase=0)
    try:
        return [tuple(p.data.shape) for p in net.learnable_params]
    finally:
        net.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    shapes = resnet50_shapes()
    rng = np.random.default_rng(0)
    param = caffe_pb2.SolverParameter(type="SGD", momentum=0.9, weight_decay=5e-4)
    runs = {}
    for name, cls in (("one pass (SGDRule)", rules.SGDRule),
                      ("NumPy passes (UpdateRule)", rules.UpdateRule)):
        blobs = []
        for s in shapes:
            b = Blob(s, np.float32)
            b.data[...] = rng.standard_normal(s, dtype=np.float32)
            blobs.append(b)
        rule = cls(param)
        rule.setup(blobs)
        runs[name] = (rule, blobs)
    ones = [1.0] * len(shapes)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, (rule, blobs) in runs.items():
            for b in blobs:
                b.diff[...] = 1e-3
            t0 = time.perf_counter()
            rule.apply(blobs, ones, ones, 0.01, 0)
            best[name] = min(best[name], time.perf_counter() - t0)
    n = sum(int(np.prod(s)) for s in shapes)
    print(f"SGD update, {n / 1e6:.1f} M float32 parameters in {len(shapes)} arrays "
          f"(ResNet-50), {threads.count()} lanes, best of {args.rounds} alternating rounds")
    for name, t in best.items():
        print(f"  {name:<27} {t * 1e3:8.1f} ms")
    fused, passes = best.values()
    print(f"  one pass / NumPy passes = {fused / passes:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
