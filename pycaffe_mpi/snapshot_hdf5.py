"""HDF5 snapshots (``snapshot_format: HDF5``): ``.caffemodel.h5`` and ``.solverstate.h5``.

The layouts are BVLC Caffe's, so files go both ways between Caffe and us:

* ``.caffemodel.h5`` (``Net::ToHDF5``): group ``data`` with one group per layer (every layer,
  in net order, even those without parameters), holding one dataset per parameter blob named
  by its index (``"0"``, ``"1"``, ...) in the net's dtype. A parameter that shares another
  layer's blob (``param { name: ... }`` seen before) is not written: its owner holds it. With
  ``snapshot_diff`` a group ``diff`` of the same shape holds every gradient, shared or not.
* ``.solverstate.h5`` (``SGDSolver::SnapshotSolverStateToHDF5``): scalar int datasets
  ``iter`` and ``current_step``, a string dataset ``learned_net`` (the ``.caffemodel.h5``
  path), and a group ``history`` with datasets ``"0"`` .. ``"k"`` (the update rule's history
  blobs, in learnable-parameter order).
* Our extension, ignored by Caffe: a group ``pycaffe_mpi/layer_state`` with one uint8
  dataset per layer run-time state (attribute ``layer`` = its name), which makes a resumed
  run continue exactly (data positions, random generators); see
  :meth:`pycaffe_mpi.layer.Layer.get_state`.

Files are written to a temporary file in the target directory, flushed to disk, then moved
over the target with ``os.replace``, so a reader sees the old file or the whole new one; a
failed write (a full disk) is a :class:`~pycaffe_mpi.snapshot.WriteError` that leaves the old
file and no temporary file, and a killed writer's temporary file is removed by the next write.
Reading a solver state gives back a ``SolverState`` message so the solver restores binary and
HDF5 states through one path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as pio
from pycaffe_mpi.proto import caffe_pb2

_EXT_GROUP = "pycaffe_mpi/layer_state"


def _h5py() -> Any:
    import h5py  # a dependency, imported late so `import pycaffe_mpi` stays light

    return h5py


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file, by content (as Caffe's ``H5Fis_hdf5``)."""
    path = os.fspath(path)
    return os.path.isfile(path) and bool(_h5py().is_hdf5(path))


@contextlib.contextmanager
def _atomic_h5(path: str | os.PathLike) -> Iterator[Any]:
    """An open, empty HDF5 file that replaces ``path`` only once it is completely written.

    As :func:`pycaffe_mpi.snapshot.atomic_write`: stale temporary files of killed writers of
    ``path`` are removed first, the new file gets a tagged temporary name
    (:func:`~pycaffe_mpi.snapshot.temp_path`), and any ``OSError`` (a full disk) becomes a
    :class:`~pycaffe_mpi.snapshot.WriteError` with the previous ``path`` unchanged and no
    temporary file left behind.
    """
    with pio.atomic_target(path) as tmp, _h5py().File(tmp, "w") as f:
        yield f


def _open(path: str | os.PathLike, what: str) -> Any:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise errors.SnapshotError(f"HDF5 {what} file {path!r} does not exist")
    try:
        return _h5py().File(path, "r")
    except OSError as e:
        raise errors.SnapshotError(f"cannot read {what} file {path!r} as HDF5: {e}") from None


# -- weights ----------------------------------------------------------------------------------
def _owned(net: Any) -> list[list[bool]]:
    """Per layer, per parameter blob: whether the blob owns itself (Caffe's param_owners_ == -1):
    a named ParamSpec seen in an earlier blob makes this one a share."""
    seen: set[str] = set()
    out = []
    for lp, layer in zip(net.param.layer, net.layers):
        flags = []
        for j in range(len(layer.blobs)):
            name = lp.param[j].name if j < len(lp.param) else ""
            flags.append(not name or name not in seen)
            if name:
                seen.add(name)
        out.append(flags)
    return out


def write_caffemodel(path: str | os.PathLike, net: Any, write_diff: bool = False) -> None:
    """Write ``net``'s parameters (and diffs with ``write_diff``) as a ``.caffemodel.h5``."""
    to_host = net.backend.to_host
    dtype = np.dtype(net.dtype)
    with _atomic_h5(path) as f:
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        for lp, layer, owned in zip(net.param.layer, net.layers, _owned(net)):
            gdata = data.create_group(lp.name)
            gdiff = diff.create_group(lp.name) if diff is not None else None
            for j, blob in enumerate(layer.blobs):
                if owned[j]:
                    gdata.create_dataset(str(j), data=np.asarray(to_host(blob.data), dtype))
                if gdiff is not None:
                    gdiff.create_dataset(str(j), data=np.asarray(to_host(blob.diff), dtype))


def load_caffemodel(net: Any, path: str | os.PathLike) -> None:
    """Copy the weights of a ``.caffemodel.h5`` into ``net`` by layer name, with Caffe's
    ``CopyTrainedLayersFromHDF5`` checks: source layers the net lacks are skipped; a layer may
    not have more datasets than blobs; a missing dataset is allowed only for a shared blob;
    shapes must match exactly."""
    path = os.fspath(path)
    owned = dict(zip((lp.name for lp in net.param.layer), _owned(net)))
    with _open(path, "weights") as f:
        if "data" not in f:
            raise errors.SnapshotError(f"{path}: no group 'data'; is it a .caffemodel.h5?")
        for name, group in f["data"].items():
            if name not in net.layer_dict:
                continue
            layer = net.layer_dict[name]
            if len(group) > len(layer.blobs):
                raise errors.SnapshotError(
                    f'{path}: incompatible number of blobs for layer "{name}": '
                    f"{len(group)} in the file, {len(layer.blobs)} in the net")
            for j, blob in enumerate(layer.blobs):
                if str(j) not in group:
                    if not owned.get(name, [True] * (j + 1))[j]:
                        continue  # a shared blob: its owner layer carries it
                    raise errors.SnapshotError(
                        f'{path}: incompatible number of blobs for layer "{name}": dataset '
                        f"data/{name}/{j} is missing")
                arr = np.asarray(group[str(j)])
                if tuple(arr.shape) != tuple(blob.shape):
                    raise errors.ShapeError(
                        f'{path}: cannot copy param {j} weights from layer "{name}"; shape '
                        f"mismatch. Source param shape is {tuple(arr.shape)}; target param "
                        f"shape is {tuple(blob.shape)}. To learn this layer's parameters from "
                        "scratch rather than copying from a saved net, rename the layer.")
                blob.data[...] = net.backend.asarray(arr, net.dtype)


# -- solver state -----------------------------------------------------------------------------
def write_solverstate(path: str | os.PathLike, state: Any,
                      dtype: Any = np.float32) -> None:
    """Write a ``SolverState`` message as a ``.solverstate.h5`` (history in ``dtype``, the
    net's), with its layer run-time states in our extension group."""
    with _atomic_h5(path) as f:
        f.create_dataset("iter", data=np.int32(state.iter))
        # NOTE: a fixed-length string, as HDF5's H5LTmake_dataset_string writes it for Caffe
        f.create_dataset("learned_net", data=np.bytes_(state.learned_net.encode()))
        f.create_dataset("current_step", data=np.int32(state.current_step))
        history = f.create_group("history")
        for i, bp in enumerate(state.history):
            history.create_dataset(str(i), data=pio.blobproto_to_array(bp).astype(dtype))
        ext = f.create_group(_EXT_GROUP)
        for i, entry in enumerate(state.layer_state):
            ds = ext.create_dataset(str(i), data=np.frombuffer(entry.state, np.uint8))
            ds.attrs["layer"] = entry.layer


def _scalar(f: Any, name: str, path: str) -> Any:
    if name in f:
        return f[name][()]
    if name in f.attrs:
        return f.attrs[name]
    raise errors.SnapshotError(f"{path}: no '{name}'; is it a .solverstate.h5?")


def read_solverstate(path: str | os.PathLike) -> Any:
    """Read a ``.solverstate.h5`` (ours or Caffe's) into a ``SolverState`` message."""
    path = os.fspath(path)
    state = caffe_pb2.SolverState()
    with _open(path, "solver state") as f:
        state.iter = int(_scalar(f, "iter", path))
        state.current_step = int(_scalar(f, "current_step", path))
        if "learned_net" in f or "learned_net" in f.attrs:
            raw = _scalar(f, "learned_net", path)
            raw = raw.item() if isinstance(raw, np.ndarray) else raw
            state.learned_net = (raw.decode() if isinstance(raw, bytes) else str(raw)) \
                .rstrip("\x00")
        if "history" not in f:
            raise errors.SnapshotError(f"{path}: no group 'history'; is it a .solverstate.h5?")
        history = f["history"]
        for i in range(len(history)):
            if str(i) not in history:
                raise errors.SnapshotError(f"{path}: history dataset {i} is missing")
            arr = np.asarray(history[str(i)])
            state.history.add().CopyFrom(
                pio.array_to_blobproto(arr, double=arr.dtype == np.float64))
        if _EXT_GROUP in f:
            ext = f[_EXT_GROUP]
            for i in range(len(ext)):
                ds = ext[str(i)]
                state.layer_state.add(layer=str(ds.attrs["layer"]),
                                      state=np.asarray(ds, np.uint8).tobytes())
    return state


# -- the solver's snapshot ----------------------------------------------------------------------
def snapshot(solver: Any, filename: Any) -> str:
    """Write ``solver``'s HDF5 snapshot: ``filename(".caffemodel.h5")`` then
    ``filename(".solverstate.h5")`` (Caffe's names); returns the solver state's path.

    Args:
        solver: a :class:`pycaffe_mpi.solvers.Solver` (its net, ``param.snapshot_diff``,
            ``solver_state(learned_net)`` and ``log`` are used).
        filename: ``extension -> path`` (the solver's snapshot naming, ranks included).
    """
    model_filename = filename(".caffemodel.h5")
    solver.log.info("Snapshotting to HDF5 file %s", model_filename)
    write_caffemodel(model_filename, solver.net, solver.param.snapshot_diff)
    state_filename = filename(".solverstate.h5")
    solver.log.info("Snapshotting solver state to HDF5 file %s", state_filename)
    write_solverstate(state_filename, solver.solver_state(model_filename), solver.net.dtype)
    return state_filename
