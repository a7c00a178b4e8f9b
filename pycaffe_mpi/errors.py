"""User-facing error types and the ``require`` check (our Caffe ``CHECK``).

Every error a user can cause by a mistake in a prototxt, a flag or a data file is raised as a
:class:`PycaffeError`. The CLI prints those as one clear message, never as a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class PycaffeError(Exception):
    """Base class of every error caused by user input (prototxt, flags, files)."""


class PrototxtError(PycaffeError):
    """A text-format mistake or an unknown name in a net or solver prototxt."""


class NetError(PycaffeError):
    """A net that parses but cannot be built (unknown type, bad blob name, bad shapes)."""


class ShapeError(NetError):
    """Shapes that do not fit together."""


class SolverError(PycaffeError):
    """A solver setting that cannot be honoured."""


class DataError(PycaffeError):
    """Missing or malformed data (LMDB, mean file, dataset files)."""


class SnapshotError(PycaffeError):
    """A .caffemodel / .solverstate that does not match the net."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``'; did you mean "x"?'`` for the closest candidate, or ``''``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def layer_where(layer_param: Any, location: str = "") -> str:
    """Describe a layer as ``file:line: layer "name" (type T)``; the location when known."""
    where = f'layer "{layer_param.name}" (type {layer_param.type})'
    return f"{location}: {where}" if location else where


def require(cond: Any, layer_param: Any, field: str, msg: str, exc: type = NetError,
            location: str = "") -> None:
    """Raise ``exc`` naming the layer, its type, the field and ``msg`` unless ``cond`` holds.

    Args:
        cond: the condition that must be true.
        layer_param: the layer's ``LayerParameter`` (or anything with ``name``/``type``).
        field: the prototxt field at fault (e.g. ``"convolution_param.kernel_size"``).
        msg: what was expected and what was found, and how to fix it.
    """
    if not cond:
        raise exc(f"{layer_where(layer_param, location)}, field {field}: {msg}")
