"""Solver snapshots: writing and resuming ``.caffemodel`` + ``.solverstate`` pairs.

``<snapshot_prefix>_iter_<N>.caffemodel`` then ``.solverstate`` (with several MPI ranks
``<prefix>_iter_<N>_rank_<R>.*``; ``.h5`` twins with snapshot_format HDF5), both written
atomically, the weights first. Besides Caffe's fields the ``.solverstate`` carries
``layer_state`` entries (data cursors, random generators of the train and test nets, and NumPy's
global generator), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from pycaffe_mpi import errors, snapshot_hdf5
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.proto import caffe_pb2

# Reserved LayerRuntimeState names: test-net layers and NumPy's legacy global generator.
_TEST_STATE_PREFIX = "@test_net{}/"
_NUMPY_STATE = "@numpy.random"


def _history_to_proto(arr: np.ndarray) -> Any:
    if arr.dtype == np.float64:  # as Caffe's Blob<double>::ToProto: exact, in double_data
        bp = caffe_pb2.BlobProto()
        bp.shape.dim.extend(arr.shape)
        bp.double_data.extend(arr.ravel().tolist())
        return bp
    return io.array_to_blobproto(arr)


class SnapshotMixin:
    """The snapshot half of :class:`~pycaffe_mpi.solvers.solver.Solver` (it provides ``param``,
    ``net``, ``test_nets``, ``rule``, ``iter``, ``current_step``, ``rank``, ``size``, ``log``)."""

    param: Any
    net: Any
    test_nets: list[Any]
    rule: Any
    iter: int
    current_step: int
    rank: int
    size: int
    log: Any
    _lr: float | None

    def _snapshot_filename(self, extension: str) -> str:
        rank = f"_rank_{self.rank}" if self.size > 1 else ""
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{rank}{extension}"

    def snapshot(self) -> str:
        """Write ``<prefix>_iter_<N>.caffemodel`` then ``.solverstate`` (both atomically;
        ``.caffemodel.h5`` / ``.solverstate.h5`` with snapshot_format HDF5); returns the
        solver state's path."""
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            return snapshot_hdf5.snapshot(self, self._snapshot_filename)
        model_filename = self._snapshot_filename(".caffemodel")
        self.log.info("Snapshotting to binary proto file %s", model_filename)
        io.write_proto_binary(model_filename, self.net.to_proto(self.param.snapshot_diff))
        state = self.solver_state(model_filename)
        state_filename = self._snapshot_filename(".solverstate")
        self.log.info("Snapshotting solver state to binary proto file %s", state_filename)
        io.write_proto_binary(state_filename, state)
        return state_filename

    def solver_state(self, learned_net: str = "") -> Any:
        """The ``SolverState`` message of the current state (what a snapshot writes)."""
        state = caffe_pb2.SolverState(iter=self.iter, current_step=self.current_step)
        if learned_net:
            state.learned_net = learned_net
        to_host = self.net.backend.to_host
        for h in self.rule.history:
            state.history.add().CopyFrom(_history_to_proto(np.asarray(to_host(h))))
        for name, blob in self.net.get_layer_states():
            state.layer_state.add(layer=name, state=blob)
        for i, net in enumerate(self.test_nets):
            prefix = _TEST_STATE_PREFIX.format(i)
            for name, blob in net.get_layer_states():
                state.layer_state.add(layer=prefix + name, state=blob)
        state.layer_state.add(layer=_NUMPY_STATE, state=_numpy_global_state())
        return state

    def restore(self, path: str) -> None:
        """Resume from a ``.solverstate``: weights (``learned_net``), iteration, lr step,
        update history and layer run-time states."""
        if path.endswith(".h5"):  # Caffe picks the format by this suffix
            state = snapshot_hdf5.read_solverstate(path)
        else:
            state = io.read_proto_binary(path, caffe_pb2.SolverState())
        if state.learned_net:
            self.net.copy_trained_layers_from(_resolve_learned_net(state.learned_net, path))
        self._restore_history(state, path)
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)
        self._lr = None
        self._restore_layer_states(state, path)

    def _restore_history(self, state: Any, path: str) -> None:
        history = self.rule.history
        if len(state.history) != len(history):
            raise errors.SnapshotError(
                f"{path}: Incorrect length of history blobs: the file has {len(state.history)}, "
                f"the {self.rule.type} solver of this net needs {len(history)} "
                f"({self.rule.num_history_sets} per learnable parameter); was it written for "
                "another net or solver type?")
        self.log.info("SGDSolver: restoring history")
        for i, (bp, h) in enumerate(zip(state.history, history)):
            arr = io.blobproto_to_array(bp)
            if tuple(arr.shape) != tuple(h.shape):
                legacy = not bp.HasField("shape") and arr.size == h.size
                if not legacy:
                    raise errors.SnapshotError(
                        f"{path}: history blob {i} has shape {tuple(arr.shape)}, but learnable "
                        f"parameter {i % max(1, len(self.net.learnable_params))} of this net has "
                        f"shape {tuple(h.shape)}; was the snapshot written for another net?")
                arr = arr.reshape(h.shape)
            h[...] = self.net.backend.asarray(arr, h.dtype)

    def _restore_layer_states(self, state: Any, path: str = "<SolverState>") -> None:
        train, tests = [], [[] for _ in self.test_nets]
        for entry in state.layer_state:
            name = entry.layer
            if name == _NUMPY_STATE:
                _guarded(path, "NumPy's global random generator", _set_numpy_global_state,
                         entry.state)
                continue
            for i in range(len(self.test_nets)):
                prefix = _TEST_STATE_PREFIX.format(i)
                if name.startswith(prefix):
                    tests[i].append((name[len(prefix):], entry.state))
                    break
            else:
                train.append((name, entry.state))
        for net, states, what in [(self.net, train, "train net"),
                                  *((n, st, f"test net #{i}")
                                    for i, (n, st) in enumerate(zip(self.test_nets, tests)))]:
            unknown = [name for name, _ in states if name not in net.layer_dict]
            if unknown:
                # NOTE: a renamed or removed layer; the run goes on, but not as it would have
                self.log.warning("%s: the %s has no layer named %s; their saved run-time state "
                                 "(random generators, data cursors) is ignored, so the resumed "
                                 "run will not repeat the original exactly", path, what,
                                 ", ".join(f'"{n}"' for n in dict.fromkeys(unknown)))
            for name, raw in states:
                if name in net.layer_dict:
                    _guarded(path, f'layer "{name}" of the {what}',
                             net.layer_dict[name].set_state, raw)


def _guarded(path: str, what: str, restore: Any, raw: bytes) -> None:
    """``restore(raw)``; a damaged state is a SnapshotError naming the file and the layer."""
    try:
        restore(raw)
    except errors.PycaffeError as e:
        raise errors.SnapshotError(f"{path}: cannot restore the run-time state (layer_state) "
                                   f"of {what}: {e}") from e
    except Exception as e:  # a damaged entry: bad JSON, wrong keys or values
        raise errors.SnapshotError(
            f"{path}: the run-time state (layer_state) of {what} is damaged "
            f"({type(e).__name__}: {e}); resume from another snapshot, or start from its "
            ".caffemodel with --weights") from e


def _resolve_learned_net(learned_net: str, state_path: str) -> str:
    """``learned_net`` as written, else next to the ``.solverstate`` (the snapshot moved)."""
    if os.path.exists(learned_net):
        return learned_net
    here = os.path.dirname(os.path.abspath(state_path))
    for candidate in (os.path.join(here, learned_net),
                      os.path.join(here, os.path.basename(learned_net))):
        if os.path.exists(candidate):
            return candidate
    raise errors.SnapshotError(
        f"{state_path}: its weights file {learned_net!r} (learned_net) was not found, neither "
        f"as given nor next to the .solverstate")


def _numpy_global_state() -> bytes:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return json.dumps({"name": name, "keys": [int(k) for k in keys], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}).encode()


def _set_numpy_global_state(raw: bytes) -> None:
    s = json.loads(raw)
    state = (s["name"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
             s["cached"])
    np.random.set_state(state)  # noqa: NPY002
