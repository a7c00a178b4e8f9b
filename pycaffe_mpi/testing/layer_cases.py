"""The layer-case registry that drives the generic layer tests.

Each layer family module in :mod:`pycaffe_mpi.testing.cases` calls :func:`add_case` once per
configuration worth testing. The generic suite (``tests/layers/test_layers.py``) then checks for
every case: forward against the NumPy ``reference``, a float64 finite-difference gradient check of
bottoms and parameters, ``propagate_down``, parameter-diff accumulation, reshape, and (for
neurons) in-place use. A registered layer type without a case fails the suite.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TRAIN, Layer

BottomSpec = Sequence[int] | Callable[[np.random.Generator], np.ndarray]
Reference = Callable[[list[np.ndarray], Layer], list[np.ndarray]]


@dataclasses.dataclass
class LayerCase:
    """One configuration of one layer type.

    Attributes:
        type: the layer's prototxt type.
        id: a unique, readable id (shown in test names).
        proto: LayerParameter text *without* name/type/bottom/top (e.g. ``"relu_param { ... }"``).
        bottoms: per bottom, a shape (filled N(0,1)) or a function ``rng -> array``.
        reference: ``(bottom arrays, layer) -> top arrays`` in NumPy (float64). The layer is
            passed so the reference can read its (filled) parameters, ``layer.blobs[i].data``.
        ntop: number of tops.
        phase: TRAIN (0) or TEST (1).
        grad: run the gradient check (False for layers without a gradient, e.g. data).
        grad_bottoms: bottom indices to check; None = every bottom the layer lets back-propagate.
        stepsize, threshold: finite-difference step and tolerance |a-n| <= thr*max(|a|,|n|,1).
        kink, kink_range: skip elements whose value lies within kink_range of kink (non-smooth).
        reshape: bottoms for a second forward after a reshape; None = same shapes with axis 0
            grown by one (when all bottoms are shapes); () = skip.
        in_place: also run with top 0 = bottom 0 and compare.
        stochastic: reseed ``layer.rng`` before every forward.
        rtol, atol: forward comparison tolerances.
        prepare: called with the layer after setup, before reshape (e.g. to hand a
            MemoryData layer its arrays); None = nothing.
    """

    type: str
    id: str
    proto: str = ""
    bottoms: Sequence[BottomSpec] = ()
    reference: Reference | None = None
    ntop: int = 1
    phase: int = TRAIN
    grad: bool = True
    grad_bottoms: Sequence[int] | None = None
    stepsize: float = 1e-4
    threshold: float = 1e-5
    kink: float = 0.0
    kink_range: float = -1.0
    reshape: Sequence[BottomSpec] | None = None
    in_place: bool = False
    stochastic: bool = False
    rtol: float = 1e-5
    atol: float = 1e-6
    prepare: Callable[[Layer], None] | None = None

    @property
    def test_id(self) -> str:
        return f"{self.type}-{self.id}"


CASES: list[LayerCase] = []


def add_case(case: LayerCase) -> LayerCase:
    """Register a case (ids must be unique per type)."""
    if any(c.test_id == case.test_id for c in CASES):
        raise ValueError(f"duplicate layer case {case.test_id}")
    CASES.append(case)
    return case


def all_cases() -> list[LayerCase]:
    """Every registered case, after importing each module in ``pycaffe_mpi.testing.cases``."""
    from pycaffe_mpi.testing import cases

    for info in pkgutil.iter_modules(cases.__path__):
        importlib.import_module(f"{cases.__name__}.{info.name}")
    return list(CASES)


def make_bottoms(specs: Sequence[BottomSpec], rng: np.random.Generator) -> list[np.ndarray]:
    """Arrays for ``specs``: shapes become N(0, 1) draws, callables are called with ``rng``."""
    out = []
    for s in specs:
        out.append(np.asarray(s(rng), dtype=np.float64) if callable(s)
                   else rng.standard_normal(tuple(s)))
    return out


def grown(specs: Sequence[BottomSpec]) -> Sequence[BottomSpec] | None:
    """The default reshape: axis 0 of every shape grown by one (None if any spec is callable)."""
    if not specs or any(callable(s) for s in specs):
        return None
    return [(s[0] + 1, *s[1:]) if len(s) else s for s in specs]


def layer_param(case: LayerCase, nbottom: int, ntop: int) -> Any:
    """The case's LayerParameter with name, type and generated bottom/top names."""
    from google.protobuf import text_format

    from pycaffe_mpi.proto import caffe_pb2

    p = caffe_pb2.LayerParameter()
    text_format.Merge(case.proto, p)
    p.name = f"{case.type.lower()}_under_test"
    p.type = case.type
    del p.bottom[:]
    del p.top[:]
    p.bottom.extend(f"b{i}" for i in range(nbottom))
    p.top.extend(f"t{i}" for i in range(ntop))
    return p


def build_layer(case: LayerCase, bottoms: list[np.ndarray], dtype: Any = np.float64,
                seed: int = 1701, backend: Any = None) -> tuple[Layer, list[Blob], list[Blob]]:
    """Instantiate, set up and reshape the case's layer as the Net would (CPU by default)."""
    from pycaffe_mpi import registry

    cls = registry.layer_class(case.type)
    param = layer_param(case, len(bottoms), case.ntop)
    layer = cls(param, phase=case.phase, dtype=dtype, rng=np.random.default_rng(seed),
                backend=backend)
    bblobs = [to_blob(a, dtype, backend) for a in bottoms]
    tblobs = [Blob((), dtype, backend) for _ in range(case.ntop)]
    layer.check_counts(len(bblobs), len(tblobs))
    layer.setup(bblobs, tblobs)
    if case.prepare is not None:
        case.prepare(layer)
    layer.reshape(bblobs, tblobs)
    return layer, bblobs, tblobs


def to_blob(arr: np.ndarray, dtype: Any = np.float64, backend: Any = None) -> Blob:
    b = Blob(arr.shape, dtype, backend)
    b.data[...] = arr if backend is None else backend.asarray(arr)
    return b
