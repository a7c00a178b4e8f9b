"""Finite-difference gradient checking of a layer (Caffe's GradientChecker, in float64).

The layer output feeds a fixed random projection objective E = Σ_t Σ r_t ⊙ top_t, so
top_t.diff = r_t. Every element x of each checked bottom and parameter is perturbed by ±h and
(E(x+h) − E(x−h)) / 2h is compared to the analytic gradient:
|analytic − numeric| ≤ threshold · max(|analytic|, |numeric|, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer


def _forward(layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob],
             reseed: Callable[[], None] | None) -> None:
    if reseed is not None:
        reseed()
    layer.reshape(bottom, top)
    layer.forward(bottom, top)


def check_gradient(
    layer: Layer,
    bottom: Sequence[Blob],
    top: Sequence[Blob],
    check_bottoms: Sequence[int],
    stepsize: float = 1e-4,
    threshold: float = 1e-5,
    kink: float = 0.0,
    kink_range: float = -1.0,
    seed: int = 1701,
    reseed: Callable[[], None] | None = None,
) -> list[str]:
    """Check d E / d(bottoms in ``check_bottoms`` and every param); return failure messages.

    ``reseed`` is called before every forward so stochastic layers repeat their draws.
    """
    rng = np.random.default_rng(seed)
    _forward(layer, bottom, top, reseed)
    proj = [rng.standard_normal(t.shape) for t in top]

    def objective() -> float:
        _forward(layer, bottom, top, reseed)
        return float(sum(np.sum(np.asarray(t.data, np.float64) * r) for t, r in zip(top, proj)))

    objective()
    for t, r in zip(top, proj):
        t.diff[...] = r
    for p in layer.blobs:
        p.diff[...] = 0
    for b in bottom:
        b.diff[...] = 0
    pdown = [i in check_bottoms for i in range(len(bottom))]
    layer.backward(top, pdown, bottom)
    targets = [(f"bottom {i}", bottom[i]) for i in check_bottoms]
    targets += [(f"param {j}", p) for j, p in enumerate(layer.blobs)]
    analytic = [np.array(b.diff, np.float64, copy=True) for _, b in targets]
    failures = []
    for (what, blob), grad in zip(targets, analytic):
        flat = blob.data.reshape(-1)
        gflat = grad.reshape(-1)
        for k in range(flat.size):
            x0 = float(flat[k])
            if kink_range > 0 and abs(x0 - kink) <= kink_range:
                continue
            flat[k] = x0 + stepsize
            fp = objective()
            flat[k] = x0 - stepsize
            fm = objective()
            flat[k] = x0
            num = (fp - fm) / (2 * stepsize)
            ana = float(gflat[k])
            scale = max(abs(ana), abs(num), 1.0)
            if abs(ana - num) > threshold * scale:
                failures.append(f"{what} element {k}: analytic {ana:.8g} vs numeric {num:.8g}")
                if len(failures) > 10:
                    return failures
    _forward(layer, bottom, top, reseed)
    return failures
