"""Weight fillers (Caffe's ``FillerParameter``): constant, uniform, gaussian, positive_unitball,
xavier, msra, bilinear.

fan_in = count / shape[0], fan_out = count / shape[1] (count for 1-D blobs);
n = fan_in, fan_out or their mean, per ``variance_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors

FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2


def _fan_n(shape: Sequence[int], variance_norm: int) -> float:
    count = int(np.prod(shape))
    fan_in = count / shape[0] if len(shape) else 1.0
    fan_out = count / shape[1] if len(shape) > 1 else float(count)
    if variance_norm == AVERAGE:
        return (fan_in + fan_out) / 2.0
    if variance_norm == FAN_OUT:
        return fan_out
    return fan_in


def fill(filler: Any, shape: Sequence[int], rng: np.random.Generator,
         dtype: Any = np.float32) -> np.ndarray:
    """Draw a host array of ``shape`` as ``filler`` (a ``FillerParameter``) says.

    No filler set means Caffe's default: ``constant`` with value 0.
    """
    shape = tuple(int(d) for d in shape)
    kind = filler.type if filler is not None else "constant"
    if kind != "gaussian" and filler is not None and filler.sparse >= 0:
        raise errors.NetError(f'filler "{kind}": sparsity is supported by the gaussian filler only')
    if kind == "constant":
        out = np.full(shape, filler.value if filler is not None else 0.0)
    elif kind == "uniform":
        out = rng.uniform(filler.min, filler.max, shape)
    elif kind == "gaussian":
        out = rng.normal(filler.mean, filler.std, shape)
        if filler.sparse >= 0:
            if len(shape) < 2:
                raise errors.NetError("sparse gaussian filler needs a blob of at least 2 axes")
            keep = rng.random(shape) < filler.sparse / shape[0]
            out = out * keep
    elif kind == "positive_unitball":
        out = rng.uniform(0.0, 1.0, shape)
        rows = out.reshape(shape[0], -1)
        rows /= rows.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        scale = np.sqrt(3.0 / _fan_n(shape, filler.variance_norm))
        out = rng.uniform(-scale, scale, shape)
    elif kind == "msra":
        out = rng.normal(0.0, np.sqrt(2.0 / _fan_n(shape, filler.variance_norm)), shape)
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise errors.NetError(
                f"bilinear filler needs a 4-D blob with square kernels, got {shape}")
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        x = np.arange(k)
        w1 = 1 - np.abs(x / f - c)
        out = np.broadcast_to(np.outer(w1, w1), shape)
    else:
        hint = errors.did_you_mean(kind, FILLERS)
        raise errors.NetError(f'unknown filler type "{kind}"{hint}')
    return np.ascontiguousarray(out, dtype=dtype)


FILLERS = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear")
