"""The ``Python`` layer type: a BVLC pycaffe user layer, run unchanged.

prototxt::

    layer { name: "loss" type: "Python" bottom: "score" bottom: "label" top: "loss"
            python_param { module: "my_layers" layer: "MyLoss" param_str: '{"margin": 2}' }
            loss_weight: 1 }

``module`` is imported (the current working directory is made importable, as ``python`` does
for scripts run from it; otherwise the module must be on ``PYTHONPATH``), class ``layer`` is
looked up in it, and the Net runs an instance of *that* class. The class subclasses
``caffe.Layer``, which is :class:`pycaffe_mpi.layer.Layer`: when no other Caffe is importable,
``import caffe`` is aliased to :mod:`pycaffe_mpi.pycaffe` before the user's module is imported
(see :func:`install_caffe_alias`), so BVLC layer modules need no edit.

How the user's object is built (the one trick in this module): ``registry.layer_class("Python")``
returns :class:`PythonLayer`, a factory whose ``__new__`` takes the arguments every layer
constructor takes (``param, phase, backend, dtype, rng, ctx``), creates an instance of the
user's class, applies ``Layer.__init__`` to it (which sets ``self.param_str`` and
``self.phase``, as Caffe does before ``setup``) and returns it. That object is not a
``PythonLayer``, so Python does not call ``__init__`` on it again. The Net thus builds a Python
layer exactly like a built-in one, and ``type(layer)`` is the user's class.

Caffe semantics kept: a Python layer is not a loss layer (its top 0 gets a loss weight only when
the prototxt gives ``loss_weight``); ``param_str`` reaches the layer as a plain string (parse it
yourself, e.g. with ``json.loads``; nothing here evaluates it); ``share_in_parallel`` is
deprecated upstream and ignored.

NOTE: user layers written for BVLC use NumPy on ``bottom[i].data``; Caffe hands them host
memory even in GPU mode. Here a layer sees arrays of the device its Net runs on, so a NumPy-only
user layer in a GPU net needs its blobs on the host (the Net's business, not this factory's).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import TRAIN, Layer
from pycaffe_mpi.registry import register_layer

# What Layer.__init__ sets; restored after a user ``__init__`` that re-runs it with defaults.
_CORE_ATTRS = ("layer_param", "name", "phase", "backend", "xp", "dtype", "rng", "ctx",
               "blobs", "param_str", "loss_weights", "location")


def install_caffe_alias() -> bool:
    """Make ``import caffe`` (and ``caffe.proto.caffe_pb2``) resolve to pycaffe-mpi.

    Done only when no other ``caffe`` is importable, so a real BVLC installation is never
    shadowed. Returns True when ``caffe`` now is :mod:`pycaffe_mpi.pycaffe`.
    """
    from pycaffe_mpi import proto, pycaffe
    from pycaffe_mpi.proto import caffe_pb2

    if sys.modules.get("caffe") is pycaffe:
        return True
    if "caffe" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("caffe")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return False
    sys.modules["caffe"] = pycaffe
    sys.modules["caffe.proto"] = proto
    sys.modules["caffe.proto.caffe_pb2"] = caffe_pb2
    return True


def _ensure_cwd_importable() -> None:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        # NOTE: appended, not prepended: a user file must not shadow the standard library.
        sys.path.append(cwd)


def _import_module(param: Any, location: str) -> Any:
    where = errors.layer_where(param, location)
    name = param.python_param.module
    if not name:
        raise errors.NetError(f"{where}, field python_param.module: the module holding the "
                              "layer class is required")
    _ensure_cwd_importable()
    install_caffe_alias()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        hint = ""
        if e.name == name or name.startswith(f"{e.name}."):
            hint = (f"; put its directory on PYTHONPATH or run from it (current directory "
                    f"{os.getcwd()})")
        raise errors.NetError(f'{where}: cannot import python_param.module "{name}": '
                              f"{e}{hint}") from e
    except (Exception, SystemExit) as e:  # a syntax error, an exception or sys.exit at the
        # module's top level (under MPI a rank leaving here would leave the others waiting)
        raise errors.NetError(f'{where}: importing python_param.module "{name}" failed: '
                              f"{type(e).__name__}: {e}") from e


def _user_class(param: Any, location: str) -> type:
    """The class named by ``python_param.layer`` in ``python_param.module``."""
    where = errors.layer_where(param, location)
    mod = _import_module(param, location)
    name = param.python_param.layer
    candidates = sorted(k for k, v in vars(mod).items()
                        if isinstance(v, type) and issubclass(v, Layer) and v is not Layer)
    cls = getattr(mod, name, None) if name else None
    if cls is None:
        hint = errors.did_you_mean(name, candidates)
        if not hint:
            hint = f" (layer classes in it: {', '.join(candidates) or 'none'})"
        raise errors.NetError(f'{where}, field python_param.layer: module "{mod.__name__}" has '
                              f'no class "{name}"{hint}')
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        base = ""
        if isinstance(cls, type) and "caffe" in sys.modules and \
                getattr(sys.modules["caffe"], "Layer", Layer) is not Layer:
            base = (f"; the importable caffe ({getattr(sys.modules['caffe'], '__file__', '?')}) "
                    "is another Caffe installation: remove it from PYTHONPATH to run this "
                    "layer with pycaffe-mpi")
        raise errors.NetError(f'{where}, field python_param.layer: "{mod.__name__}.{name}" is '
                              f"not a subclass of caffe.Layer (pycaffe_mpi.layer.Layer){base}")
    return cls


@register_layer("Python")
class PythonLayer(Layer):
    """Factory for ``type: "Python"``: constructing it returns the user's layer instance.

    Params (``python_param``): module (required), layer (required, the class name),
    param_str (""; given to the layer as ``self.param_str``), share_in_parallel (ignored).

    Shapes, forward and backward: whatever the user's class defines. Before ``setup`` the
    instance has ``self.param_str``, ``self.phase`` (0 TRAIN, 1 TEST), ``self.blobs`` (with
    ``add_blob(*shape)``) and everything :class:`~pycaffe_mpi.layer.Layer` provides.
    """

    def __new__(cls, param: Any = None, phase: int = TRAIN, backend: Any = None,
                dtype: Any = np.float32, rng: np.random.Generator | None = None,
                ctx: Any = None) -> Any:
        if param is None:
            raise errors.NetError('a "Python" layer needs its LayerParameter (python_param)')
        user_cls = _user_class(param, getattr(ctx, "location", "") or "")
        obj = object.__new__(user_cls)
        on_device = backend is not None and backend.is_gpu
        # NOTE: as in BVLC, user code sees host (NumPy) arrays even in a GPU net
        Layer.__init__(obj, param, phase, backend_mod.CPU if on_device else backend, dtype,
                       rng, ctx)
        if user_cls.__init__ is not Layer.__init__:
            # BVLC calls ``UserClass(layer_param)``; a user __init__ usually chains to the base
            # with that one argument, which would reset phase, dtype, device and rng.
            saved = {k: obj.__dict__[k] for k in _CORE_ATTRS if k in obj.__dict__}
            try:
                user_cls.__init__(obj, param)
            except (Exception, SystemExit) as e:
                raise user_layer_error(obj, "__init__", e) from e
            obj.__dict__.update(saved)
        if not user_cls.type:
            obj.__dict__["type"] = "Python"  # instance-level: the class keeps its own
        if on_device:
            return HostLayerAdapter(obj, param, phase, backend, dtype, rng, ctx)
        return obj


class HostLayerAdapter(Layer):
    """Runs a user Python layer on host copies of its blobs inside a GPU net.

    BVLC hands Python layers host memory whatever the mode; so does this adapter: bottoms are
    copied device → host before the user's ``reshape``/``forward``, tops host → device after;
    in backward, top diffs go to the host and the bottom diffs come back where
    ``propagate_down``. The user layer's parameter blobs live on the host (the solver updates
    them there).
    """

    type = "Python"

    def __init__(self, inner: Layer, param: Any, phase: int, backend: Any, dtype: Any,
                 rng: np.random.Generator | None, ctx: Any) -> None:
        super().__init__(param, phase, backend, dtype, rng, ctx)
        self.inner = inner
        self.blobs = inner.blobs
        self._bh: list[Blob] = []
        self._th: list[Blob] = []

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.inner.location = self.location
        self.inner.check_counts(len(bottom), len(top))
        self._bh = [Blob((), self.dtype, backend_mod.CPU) for _ in bottom]
        self._th = [Blob((), self.dtype, backend_mod.CPU) for _ in top]
        self._to_host(bottom)
        self.inner.setup(self._bh, self._th)

    def _to_host(self, bottom: Sequence[Blob]) -> None:
        for b, h in zip(bottom, self._bh):
            h.reshape(b.shape)
            h.data[...] = backend_mod.to_host(b.data)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._to_host(bottom)  # the user's reshape may look at the data
        self.inner.reshape(self._bh, self._th)
        for t, h in zip(top, self._th):
            t.reshape(h.shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.inner.forward(self._bh, self._th)
        for t, h in zip(top, self._th):
            t.reshape(h.shape)
            t.data[...] = self.xp.asarray(h.data)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        for t, h in zip(top, self._th):
            h.diff[...] = backend_mod.to_host(t.diff)
        self.inner.backward(self._th, propagate_down, self._bh)
        for b, h, down in zip(bottom, self._bh, propagate_down):
            if down:
                b.diff[...] = self.xp.asarray(h.diff)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return self.inner.allow_force_backward(bottom_index)

    def get_state(self) -> bytes:
        return self.inner.get_state()

    def set_state(self, state: bytes) -> None:
        self.inner.set_state(state)


def is_user_layer(layer: Any) -> bool:
    """Whether ``layer`` runs a user's ``type: "Python"`` class (directly or host-adapted)."""
    param = getattr(layer, "layer_param", None)
    return param is not None and param.type == "Python"


def _user_frames(exc: BaseException) -> str:
    """The traceback of ``exc`` from the first frame outside pycaffe-mpi's own package on:
    the user's code, not the Net that called it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here):
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    if tb is not None:  # format_exception prints the header only when there are frames
        return "".join(lines).rstrip()
    return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()


def user_layer_error(layer: Any, method: str, exc: BaseException) -> errors.NetError:
    """A :class:`~pycaffe_mpi.errors.NetError` for an exception (or ``sys.exit``) raised by a
    user's Python layer: one line naming the layer, its type, file:line, the method and the
    rank, then the user's own traceback (each line tagged ``[rank r/N]`` in an MPI job, so it
    stays attributable when mpiexec interleaves the ranks' output)."""
    param = layer.layer_param
    ctx = getattr(layer, "ctx", None)
    inner = getattr(layer, "inner", layer)
    cls = type(inner)
    rank, size = getattr(ctx, "rank", 0), getattr(ctx, "world_size", 1)
    on = f" on rank {rank}/{size}" if size > 1 else ""
    if isinstance(exc, SystemExit):
        what = (f"called sys.exit({exc.code!r}) in {method}; a layer must raise an exception "
                "instead, so every MPI rank stops together")
    else:
        what = f"raised {type(exc).__name__} in {method}: {exc}"
    head = (f"{errors.layer_where(param, getattr(layer, 'location', ''))}, class "
            f"{cls.__module__}.{cls.__qualname__}{on}: {what}")
    tag = f"[rank {rank}/{size}] " if size > 1 else ""
    body = "\n".join(tag + line for line in _user_frames(exc).splitlines())
    message = f"{head}\n{body}"
    try:
        return _error_class(exc)(message)
    except TypeError:  # an exception type whose constructor wants other arguments
        return errors.NetError(message)


_ERROR_CLASSES: dict[type, type] = {}


def _error_class(exc: BaseException) -> type:
    """NetError, also an instance of the user's exception type where Python allows it, so
    ``except ValueError`` around pycaffe code written for BVLC still catches a layer's
    ValueError (BVLC hands it through unchanged)."""
    kind = type(exc)
    if not isinstance(exc, Exception) or isinstance(exc, errors.PycaffeError):
        return errors.NetError
    if kind not in _ERROR_CLASSES:
        try:
            # NOTE: BaseException's __str__, not e.g. KeyError's, which would quote the message
            _ERROR_CLASSES[kind] = type(f"PythonLayer{kind.__name__}", (errors.NetError, kind),
                                        {"__module__": __name__,
                                         "__str__": BaseException.__str__})
        except TypeError:  # incompatible layouts (e.g. OSError): the plain error
            _ERROR_CLASSES[kind] = errors.NetError
    return _ERROR_CLASSES[kind]
