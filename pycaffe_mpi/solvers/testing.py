"""One averaging path for test passes: the solver's ``Solver::Test`` and ``pycaffe-mpi test``.

:func:`average_outputs` runs a net forward ``iterations`` times and returns the mean loss and
the mean of every output element, as both Caffe's solver test pass and ``caffe test`` report
them (means over batches, element by element, in output order).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class TestScores:
    """The result of :func:`average_outputs`.

    Attributes:
        loss: the mean over batches of the net's total weighted loss.
        outputs: ``(name, means)`` per output blob, ``means`` a float64 vector with one mean per
            element of that blob.
        iterations: how many batches were averaged.
    """

    loss: float
    outputs: list[tuple[str, np.ndarray]]
    iterations: int

    def flat(self) -> list[float]:
        """Every output element's mean in output order (Caffe's ``test_score``)."""
        return [float(v) for _, vals in self.outputs for v in vals]


def output_values(net: Any) -> list[tuple[str, np.ndarray]]:
    """Each output blob's values, flattened, on the host, as float64."""
    to_host = net.backend.to_host
    return [(name, np.asarray(to_host(net.blobs[name].data), dtype=np.float64).ravel())
            for name in net.output_blob_names]


def average_outputs(net: Any, iterations: int,
                    before_batch: Callable[[int], bool] | None = None,
                    after_batch: Callable[[int, float, list[tuple[str, np.ndarray]]], Any]
                    | None = None) -> TestScores | None:
    """Run ``iterations`` forward passes of ``net``; the mean loss and output elements.

    Args:
        net: a built Net (its data layers supply the batches).
        iterations: the number of batches.
        before_batch: called with the batch index before each pass; returning False stops the
            pass and makes the result None (the solver's stop request).
        after_batch: called with the batch index, its loss and its output values after each
            pass (``pycaffe-mpi test`` logs every batch).
    """
    sums: np.ndarray | None = None
    names: list[tuple[str, int]] = []
    loss = 0.0
    for i in range(iterations):
        if before_batch is not None and not before_batch(i):
            return None
        batch_loss = net.forward_loss()
        loss += batch_loss
        values = output_values(net)
        if after_batch is not None:
            after_batch(i, batch_loss, values)
        flat = np.concatenate([v for _, v in values]) if values else np.zeros(0)
        if sums is None:
            sums = flat.copy()
            names = [(name, len(v)) for name, v in values]
        else:
            sums += flat
    if sums is None:
        return TestScores(math.nan, [], 0)
    means = sums / iterations
    outputs, k = [], 0
    for name, n in names:
        outputs.append((name, means[k:k + n]))
        k += n
    return TestScores(loss / iterations, outputs, iterations)
