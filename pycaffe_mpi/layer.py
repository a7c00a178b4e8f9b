"""The Layer contract, pycaffe-style.

A layer subclass overrides ``setup(bottom, top)``, ``reshape(bottom, top)``,
``forward(bottom, top)`` and ``backward(top, propagate_down, bottom)``. The Net runs the
template around them (Caffe's ``Layer::SetUp``): count checks, setup, reshape, loss weights.

Contract for kernels:
- arrays are ``self.xp`` arrays (NumPy or CuPy), never imported directly;
- ``forward`` writes the tops; ``backward`` writes (overwrites) ``bottom[i].diff`` only where
  ``propagate_down[i]`` is true, and *adds* into parameter diffs (the solver clears them);
- randomness comes from ``self.rng`` (a NumPy Generator owned by the net, reseedable in tests).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors, fillers
from pycaffe_mpi.blob import Blob, BlobVec

TRAIN = 0
TEST = 1


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a layer learns from its net at construction (the ``ctx`` argument of a Layer).

    Attributes:
        location: "file:line" of the layer in its prototxt ("" when unknown); errors name it.
        rank, world_size: this process's MPI world rank and the number of processes.
        comm_group: for comm layers, ``(group Comm, root's rank in the group, members' world
            ranks)``; None elsewhere (and for a comm layer built alone: a one-member group).
        net_name: the net's ``name``.
        user: the ``ctx`` object given to the Net (or Solver), passed through untouched.
    """

    location: str = ""
    rank: int = 0
    world_size: int = 1
    comm_group: tuple[Any, int, Sequence[int]] | None = None
    net_name: str = ""
    user: Any = None


class Layer:
    """Base class of every layer (built-in and ``type: "Python"`` user layers).

    Class attributes declare arity, checked by the Net before ``setup``:
    ``exact_num_bottom``, ``min_bottom``, ``max_bottom``, ``exact_num_top``, ``min_top``,
    ``max_top`` (``None`` = unchecked); ``is_loss`` gives top 0 a default ``loss_weight`` of 1.
    ``allow_force_backward(i)`` tells whether bottom i can take a gradient (labels cannot).
    """

    type: ClassVar[str] = ""
    exact_num_bottom: ClassVar[int | None] = None
    min_bottom: ClassVar[int | None] = None
    max_bottom: ClassVar[int | None] = None
    exact_num_top: ClassVar[int | None] = None
    min_top: ClassVar[int | None] = None
    max_top: ClassVar[int | None] = None
    is_loss: ClassVar[bool] = False
    is_data: ClassVar[bool] = False

    def __init__(
        self,
        param: Any = None,
        phase: int = TRAIN,
        backend: backend_mod.Backend | None = None,
        dtype: Any = np.float32,
        rng: np.random.Generator | None = None,
        ctx: Any = None,
    ) -> None:
        if param is None:
            from pycaffe_mpi.proto import caffe_pb2

            param = caffe_pb2.LayerParameter(name=self.type or "layer", type=self.type)
        self.layer_param = param
        self.name: str = param.name
        self.phase = phase
        self.backend = backend or backend_mod.CPU
        self.xp = self.backend.xp
        self.dtype = np.dtype(dtype)
        self.rng = rng if rng is not None else np.random.default_rng(1701)
        self.ctx = ctx
        self.blobs = BlobVec(self.dtype, self.backend)
        self.param_str: str = param.python_param.param_str if param.HasField("python_param") else ""
        self.loss_weights: list[float] = []
        # "file:line" of the layer in its prototxt, from the Net's LayerContext
        self.location: str = ctx.location if isinstance(ctx, LayerContext) else ""

    # -- the four methods a layer overrides --------------------------------------------------
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Read parameters, create ``self.blobs``. Called once."""

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Shape the tops (and internal buffers) from the bottoms."""
        raise NotImplementedError(f"{type(self).__name__}.reshape")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        """Default: no gradient (data layers, Accuracy)."""

    # -- run-time state (saved in .solverstate so a resumed run continues exactly) ---------------
    def get_state(self) -> bytes:
        """Opaque bytes of this layer's run-time state: by default its random generator."""
        return json.dumps(_rng_state(self.rng)).encode()

    def set_state(self, state: bytes) -> None:
        """Restore what :meth:`get_state` returned."""
        _set_rng_state(self.rng, json.loads(state))

    # -- hooks ---------------------------------------------------------------------------------
    def sync_flag(self, flag: bool) -> bool:
        """Agree on a backward flag with the other ranks sharing this layer (comm layers
        override this with a collective); a local layer keeps its own flag."""
        return flag

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def begin_test_pass(self) -> None:
        """Called before the forward passes of one test pass (``Solver.test``, ``pycaffe-mpi
        test``); metric layers that accumulate over the whole pass reset here."""

    def end_test_pass(self) -> Any:
        """Called after a test pass; returns what the layer measured over the whole pass for a
        report writer outside it (e.g. EnsembleAccuracy's oracle assignment), or None.
        Layers never write report files themselves (see :meth:`Net.end_test_pass`)."""
        return None

    def new_blob(self, shape: Sequence[int]) -> Blob:
        """A fresh blob on this layer's device and dtype (for parameters or buffers)."""
        return Blob(shape, self.dtype, self.backend)

    def init_param_blobs(self, shapes: Sequence[Sequence[int]], param_field: str,
                         filler_fields: Sequence[str | None], default: Any = None) -> None:
        """Caffe's "parameters given? skip initialization" step of a layer's setup.

        Blobs the Net already put in ``self.blobs`` (loaded from weights or shared with another
        layer) are kept once their shapes match ``shapes``; otherwise one blob per shape is
        created and filled in order, so the draws from ``self.rng`` follow Caffe's blob order.

        Args:
            shapes: the parameter shapes in Caffe's blob order.
            param_field: the layer's parameter message, e.g. ``"inner_product_param"``.
            filler_fields: per shape, the ``FillerParameter`` field of that message that fills
                it (e.g. ``"weight_filler"``), or None for ``default``.
            default: the filler of a blob whose field is None or unset (None = constant 0).
        """
        want = [tuple(int(d) for d in s) for s in shapes]
        if len(self.blobs) > 0:
            got = [tuple(b.shape) for b in self.blobs]
            self.require(got == want, param_field,
                         f"expected parameter shapes {want}, got {got}; to learn this layer "
                         "from scratch, rename it")
            return
        message = getattr(self.layer_param, param_field)
        for shape, name in zip(want, filler_fields, strict=True):
            filler = default
            if name is not None and message.HasField(name):
                filler = getattr(message, name)
            blob = self.new_blob(shape)
            blob.data[...] = self.xp.asarray(fillers.fill(
                filler, shape, self.rng, self.dtype, self, f"{param_field}.{name or 'filler'}"))
            self.blobs.append(blob)

    def require(self, cond: Any, field: str, msg: str) -> None:
        errors.require(cond, self.layer_param, field, msg, location=self.location)

    def check_counts(self, n_bottom: int, n_top: int) -> None:
        """Caffe's ``CheckBlobCounts``, with the layer named in the error."""
        where = errors.layer_where(self.layer_param, self.location)

        def chk(n: int, exact: int | None, lo: int | None, hi: int | None, what: str) -> None:
            if exact is not None and n != exact:
                raise errors.NetError(f"{where} takes exactly {exact} {what} blob(s), got {n}")
            if lo is not None and n < lo:
                raise errors.NetError(f"{where} takes at least {lo} {what} blob(s), got {n}")
            if hi is not None and n > hi:
                raise errors.NetError(f"{where} takes at most {hi} {what} blob(s), got {n}")
        chk(n_bottom, self.exact_num_bottom, self.min_bottom, self.max_bottom, "bottom")
        chk(n_top, self.exact_num_top, self.min_top, self.max_top, "top")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def count_of(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """Caffe's ``Blob::count(start, end)``: product of ``shape[start:end]``, 1 when empty."""
    return int(np.prod(shape[start:end], dtype=np.int64))


def canonical_axis(layer: Layer, axis: int, num_axes: int, field: str) -> int:
    """Caffe's ``CanonicalAxisIndex``: ``axis`` in [−num_axes, num_axes) made non-negative;
    out of range is the layer's error on ``field``."""
    layer.require(-num_axes <= axis < num_axes, field,
                  f"axis {axis} out of range for a {num_axes}-D bottom")
    return axis + num_axes if axis < 0 else axis


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
