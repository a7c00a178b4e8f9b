"""Audit of issue 8: every registered layer type documents its shapes and formulas, and a type
without a gradient in Caffe either refuses backward or passes nothing, as Caffe does.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from pycaffe_mpi import errors, registry
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import build_layer, make_bottoms

CASES = layer_cases.all_cases()
TYPES = registry.layer_type_list()
USER_DEFINED = {"Python"}  # shapes and formulas are the user's class's
NO_GRADIENT = sorted({c.type for c in CASES} - {c.type for c in CASES if c.grad})


def _docs(cls: type) -> str:
    """The class's docstring and those of the project's bases it inherits a block from."""
    return "\n".join(k.__doc__ or "" for k in cls.__mro__
                     if k.__module__.startswith("pycaffe_mpi.layer_types"))


@pytest.mark.parametrize("type_", sorted(set(TYPES) - USER_DEFINED))
def test_docstring_has_shapes_and_formulas(type_: str) -> None:
    cls = registry.layer_class(type_)
    own = cls.__doc__ or ""
    assert "Shapes:" in _docs(cls), f"{type_}: no Shapes: block"
    assert "forward" in own.lower() or re.search(r"\b(y|top(\[\w+\])*) =", own), \
        f"{type_}: no forward formula"
    assert "backward" in own.lower() or "dE/" in own or "gradient" in own.lower(), \
        f"{type_}: neither a gradient formula nor a word on its (missing) backward"


def test_types_without_gradient_are_known() -> None:
    # the list the next test runs over: data layers, metrics and non-differentiable maps
    assert {"Accuracy", "ArgMax", "Threshold", "Data", "HDF5Output"} <= set(NO_GRADIENT)


@pytest.mark.parametrize("type_", NO_GRADIENT)
def test_backward_refuses_or_passes_nothing(type_: str) -> None:
    case = next(c for c in CASES if c.type == type_)
    layer, bb, tb = build_layer(case, make_bottoms(case.bottoms, np.random.default_rng(0)))
    if case.stochastic:
        layer.rng = np.random.default_rng(7)
    layer.forward(bb, tb)
    for b in bb:
        b.diff[...] = np.nan
    for t in tb:
        t.diff[...] = 1
    try:
        layer.backward(tb, [True] * len(bb), bb)
    except (NotImplementedError, errors.PycaffeError) as e:
        assert layer.name in str(e), f"the refusal does not name the layer: {e}"
        return
    for i, b in enumerate(bb):
        assert np.isnan(b.diff).all(), f"{type_} wrote bottom {i}'s diff in a backward it lacks"
    if type(layer).backward is not Layer.backward:
        for p in layer.blobs:
            assert not np.any(p.diff), f"{type_} changed a parameter diff"
