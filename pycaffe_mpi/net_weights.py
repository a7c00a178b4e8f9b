"""A Net's weights in and out: Caffe's ``CopyTrainedLayersFrom`` and ``ToProto``.

:func:`copy_trained_layers` copies parameter blobs into a built net by layer name from a
``.caffemodel`` (binary NetParameter, V0/V1 upgraded; HDF5 judged by content) or a
NetParameter, with Caffe's checks (blob count, shape; a 4-axis legacy shape matches its
squeezed form) and two warnings Caffe does not give: a file that loads no layer at all, and
weights that bring NaN or Inf. :func:`to_proto` is the reverse (a ``.caffemodel``'s content).
The :class:`~pycaffe_mpi.net.Net` methods of the same names call these.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors, snapshot_hdf5, upgrade
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger("pycaffe_mpi")


def copy_trained_layers(net: Any, source: str | os.PathLike | Any) -> None:
    """Copy the blobs of ``source`` (a weights file path or a NetParameter) into ``net``'s
    layers of the same name; source layers the net lacks are ignored."""
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if snapshot_hdf5.is_hdf5(path):  # by content, as Caffe's H5Fis_hdf5
            snapshot_hdf5.load_caffemodel(net, path)
            return
        src = io.read_proto_binary(path, caffe_pb2.NetParameter())
    else:
        path, src = "<NetParameter>", caffe_pb2.NetParameter()
        src.CopyFrom(source)
    upgrade.upgrade_net_as_needed(path, src)  # V0/V1 .caffemodel files
    copied, nonfinite = [], []
    for sl in src.layer:
        if sl.name not in net.layer_dict:
            log.info("Ignoring source layer %s", sl.name)
            continue
        log.debug("Copying source layer %s", sl.name)
        layer = net.layer_dict[sl.name]
        load_layer_blobs(net, layer, sl.blobs, path)
        if len(sl.blobs):
            copied.append(sl.name)
        if any(not bool(net.backend.xp.isfinite(b.data).all()) for b in layer.blobs):
            nonfinite.append(sl.name)
    # NOTE: Caffe copies silently; a file that matches nothing (a mean .binaryproto, an
    # empty or foreign model) would leave the net at its random initial weights
    learnable = [n for n, lay in zip(net.layer_names, net.layers) if len(lay.blobs)]
    if learnable and not copied:
        log.warning("WEIGHTS NOT LOADED: %s copied no layer into net %s (the file has %d "
                    "layer(s) with weights, none named like this net's learnable layers "
                    "%s); the net keeps its initial weights", path, net.name,
                    sum(1 for sl in src.layer if len(sl.blobs)), learnable[:8])
    if nonfinite:
        log.warning("NON-FINITE WEIGHTS: %s brought NaN or Inf values into layer(s) %s",
                    path, nonfinite)


def load_layer_blobs(net: Any, layer: Any, blob_protos: Sequence[Any], path: str) -> None:
    """Copy saved blobs into ``layer``'s parameters, with Caffe's checks (``path`` names the
    file in errors)."""
    name = layer.name
    if len(blob_protos) != len(layer.blobs):
        raise errors.SnapshotError(
            f'{path}: incompatible number of blobs for layer "{name}": '
            f"{len(blob_protos)} in the file, {len(layer.blobs)} in the net")
    for j, (bp, blob) in enumerate(zip(blob_protos, layer.blobs)):
        arr = io.blobproto_to_array(bp)
        if tuple(arr.shape) != tuple(blob.shape):
            legacy = arr.size == blob.count and \
                _legacy_shape(arr.shape) == _legacy_shape(blob.shape)
            if not legacy:
                raise errors.ShapeError(
                    f'{path}: cannot copy param {j} weights from layer "{name}"; '
                    f"shape mismatch. Source param shape is {tuple(arr.shape)}; target "
                    f"param shape is {tuple(blob.shape)}. To learn this layer's "
                    "parameters from scratch rather than copying from a saved net, "
                    "rename the layer.")
            arr = arr.reshape(blob.shape)
        blob.data[...] = net.backend.asarray(arr, net.dtype)


def to_proto(net: Any, write_diff: bool = False) -> Any:
    """``net`` as a NetParameter with each layer's blobs (a .caffemodel's content)."""
    out = caffe_pb2.NetParameter(name=net.name)
    for lp, layer in zip(net.param.layer, net.layers):
        dst = out.layer.add()
        dst.CopyFrom(lp)
        del dst.blobs[:]
        for b in layer.blobs:
            diff = net.backend.to_host(b.diff) if write_diff else None
            dst.blobs.add().CopyFrom(io.array_to_blobproto(
                net.backend.to_host(b.data), diff, double=net.dtype == np.float64))
    return out


def _legacy_shape(shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(shape)
    return (1,) * (4 - len(s)) + s if len(s) <= 4 else s
