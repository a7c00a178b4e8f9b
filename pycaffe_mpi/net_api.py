"""The pycaffe Net methods that :class:`pycaffe_mpi.net.Net` does not define itself.

:class:`NetApi` is a base class of ``Net``; it only reads what ``Net`` builds (``layers``,
``layer_names``, ``blobs``, ``inputs``, ``outputs``, ``top_names``, ``bottom_names``,
``blob_loss_weights``, ``param``) and calls its ``forward``/``backward``/``forward_from_to``/
``backward_from_to``. One owner per name: ``blobs``, ``params``, ``layers``, ``layer_dict``,
``inputs``, ``outputs``, ``top_names``, ``bottom_names``, ``blob_loss_weights``, ``forward``,
``backward``, ``reshape``, ``copy_from``, ``save`` and ``clear_param_diffs`` belong to ``Net``.

Here, as in BVLC's ``python/caffe/pycaffe.py`` and ``_caffe.cpp``:

* ``forward_all(blobs=None, **inputs)``: runs the net over inputs of any length in batches of the
  net's batch size (the first axis of its first blob), the last one padded with zeros, and returns
  ``{name: array}`` with the outputs (and ``blobs``) of every batch concatenated, padding dropped.
* ``forward_backward_all(blobs=None, diffs=None, **arrays)``: the same with a backward pass per
  batch; ``arrays`` holds inputs (for forward) and output diffs (for backward); returns
  ``(outputs, input diffs)``.
* ``set_input_arrays(data, labels)``: hands arrays to the first layer, which must be MemoryData.
* ``share_with(other)``, ``save_hdf5(path)``, ``load_hdf5(path)``, ``_forward(start, end)``,
  ``_backward(start, end)``, ``_layer_names``, ``_blobs``, ``_blob_names``,
  ``_blob_loss_weights``, ``_inputs``, ``_outputs``, ``_top_ids(i)``, ``_bottom_ids(i)``.

pycaffe has no batched ``backward_all``: ``Net.backward_all()`` is the full backward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors


class NetApi:
    """pycaffe's batching and introspection methods, mixed into :class:`pycaffe_mpi.net.Net`."""

    # the attributes Net provides (declared for type checkers and readers)
    layers: list[Any]
    layer_names: list[str]
    blobs: Mapping[str, Any]
    inputs: list[str]
    outputs: list[str]
    top_names: Mapping[str, list[str]]
    bottom_names: Mapping[str, list[str]]
    blob_loss_weights: Mapping[str, float]
    backend: Any
    dtype: Any
    param: Any

    # -- pycaffe's private views ---------------------------------------------------------------
    @property
    def _layer_names(self) -> list[str]:
        """Layer names, in net order."""
        return list(self.layer_names)

    @property
    def _blobs(self) -> list[Any]:
        """The blobs, in ``_blob_names`` order."""
        return list(self.blobs.values())

    @property
    def _blob_names(self) -> list[str]:
        """Blob names, in creation order (the order of ``blobs``)."""
        return list(self.blobs)

    @property
    def _blob_loss_weights(self) -> list[float]:
        """Each blob's loss weight, in ``_blob_names`` order (0 for blobs that are no loss)."""
        return [float(self.blob_loss_weights.get(n, 0.0)) for n in self.blobs]

    @property
    def _inputs(self) -> list[int]:
        """Indices of the input blobs in ``_blob_names``."""
        names = self._blob_names
        return [names.index(n) for n in self.inputs]

    @property
    def _outputs(self) -> list[int]:
        """Indices of the output blobs in ``_blob_names``."""
        names = self._blob_names
        return [names.index(n) for n in self.outputs]

    def _top_ids(self, i: int) -> list[int]:
        """Indices (in ``_blob_names``) of layer ``i``'s tops."""
        names = self._blob_names
        return [names.index(n) for n in self.top_names[self.layer_names[i]]]

    def _bottom_ids(self, i: int) -> list[int]:
        """Indices (in ``_blob_names``) of layer ``i``'s bottoms."""
        names = self._blob_names
        return [names.index(n) for n in self.bottom_names[self.layer_names[i]]]

    def _forward(self, start: int, end: int) -> float:
        """Caffe's ``ForwardFromTo``: layers ``start..end`` inclusive; returns their loss."""
        return self.forward_from_to(start, end)  # type: ignore[attr-defined]

    def _backward(self, start: int, end: int) -> None:
        """Caffe's ``BackwardFromTo``: layers ``start`` down to ``end`` inclusive."""
        self.backward_from_to(start, end)  # type: ignore[attr-defined]

    def share_with(self, other: Any) -> None:
        """Caffe's ``ShareTrainedLayersWith``: use ``other``'s parameter blobs, by layer name."""
        self.share_trained_layers_with(other)  # type: ignore[attr-defined]

    def save_hdf5(self, filename: str) -> None:
        """Write the weights as an HDF5 ``.caffemodel.h5`` (Caffe's ``Net::ToHDF5``)."""
        from pycaffe_mpi import snapshot_hdf5

        snapshot_hdf5.write_caffemodel(filename, self)

    def load_hdf5(self, filename: str) -> None:
        """Copy weights from a ``.caffemodel.h5`` by layer name (``CopyTrainedLayersFromHDF5``)."""
        from pycaffe_mpi import snapshot_hdf5

        snapshot_hdf5.load_caffemodel(self, filename)

    # -- batching ------------------------------------------------------------------------------
    def _batch(self, arrays: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        """Cut ``{name: array}`` (equal first axes) into batches of the net's batch size.

        The batch size is the first axis of the net's first blob; the last batch is padded
        with zeros.
        """
        if not arrays:
            return
        lengths = {name: len(arr) for name, arr in arrays.items()}
        num = next(iter(lengths.values()))
        if len(set(lengths.values())) != 1:
            raise errors.NetError(f"the arrays to batch differ in length: {lengths}")
        first = next(iter(self.blobs.values()))
        batch_size = int(first.shape[0]) if first.shape else 1
        if batch_size < 1:
            raise errors.NetError("the net's batch size (first axis of its first blob) is 0")
        for i in range(0, num - num % batch_size, batch_size):
            yield {name: np.asarray(arr[i:i + batch_size]) for name, arr in arrays.items()}
        rest = num % batch_size
        if rest:
            batch = {}
            for name, arr in arrays.items():
                tail = np.asarray(arr[num - rest:])
                pad = np.zeros((batch_size - rest, *tail.shape[1:]), dtype=tail.dtype)
                batch[name] = np.concatenate([tail, pad])
            yield batch

    def forward_all(self, blobs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        """Run forward over ``inputs`` in batches; return outputs (and ``blobs``), concatenated.

        Args:
            blobs: extra blob names to return besides the outputs.
            **inputs: input blob name -> array whose first axis runs over examples (any length).

        Returns:
            ``{name: ndarray}`` with one row per input example (the padding of the last batch
            is dropped).
        """
        if not inputs:
            raise errors.NetError("forward_all() needs input arrays (name=array); to run the "
                                  "net on its data layers use forward()")
        names = list(dict.fromkeys([*self.outputs, *(blobs or [])]))
        collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for batch in self._batch(inputs):
            outs = self.forward(blobs=list(blobs or []), **batch)  # type: ignore[attr-defined]
            for n in names:
                collected[n].append(np.array(self.backend.to_host(outs[n])))
        num = len(next(iter(inputs.values())))
        return {n: _concat(parts)[:num] for n, parts in collected.items()}

    def forward_backward_all(self, blobs: Sequence[str] | None = None,
                             diffs: Sequence[str] | None = None,
                             **arrays: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Forward and backward over ``arrays`` in batches.

        Args:
            blobs: extra blobs whose data to return, as in ``forward``.
            diffs: extra blobs whose diff to return, as in ``backward``.
            **arrays: input blob arrays (fed to forward) and output blob diffs (fed to
                backward), each with a first axis over examples; missing ones are taken from
                the net (data layers, loss weights).

        Returns:
            ``(outputs, input_diffs)``: ``{name: ndarray}`` each, concatenated over batches,
            padding dropped.
        """
        if not arrays:
            raise errors.NetError("forward_backward_all() needs input arrays or output diffs "
                                  "(name=array)")
        unknown = [n for n in arrays if n not in self.inputs and n not in self.outputs]
        if unknown:
            raise errors.NetError(f"{unknown} are neither inputs {self.inputs} nor outputs "
                                  f"{self.outputs} of this net")
        out_names = list(dict.fromkeys([*self.outputs, *(blobs or [])]))
        diff_names = list(dict.fromkeys([*self.inputs, *(diffs or [])]))
        all_outs: dict[str, list[np.ndarray]] = {n: [] for n in out_names}
        all_diffs: dict[str, list[np.ndarray]] = {n: [] for n in diff_names}
        fwd = self._batch({n: arrays[n] for n in self.inputs if n in arrays})
        bwd = self._batch({n: arrays[n] for n in self.outputs if n in arrays})
        for fb, bb in itertools.zip_longest(fwd, bwd, fillvalue={}):
            outs = self.forward(blobs=list(blobs or []), **fb)  # type: ignore[attr-defined]
            grads = self.backward(diffs=list(diffs or []), **bb)  # type: ignore[attr-defined]
            for n in out_names:
                all_outs[n].append(np.array(self.backend.to_host(outs[n])))
            for n in diff_names:
                all_diffs[n].append(np.array(self.backend.to_host(grads[n])))
        num = len(next(iter(arrays.values())))
        return ({n: _concat(p)[:num] for n, p in all_outs.items()},
                {n: _concat(p)[:num] for n, p in all_diffs.items()})

    # -- MemoryData ------------------------------------------------------------------------------
    def set_input_arrays(self, data: Any, labels: Any) -> None:
        """Give the MemoryData layer (the net's first layer) new ``data`` and ``labels``.

        ``labels`` of shape (N,) become (N, 1, 1, 1). As in Caffe, ``data`` must be
        N x C x H x W with the layer's ``memory_data_param`` channels/height/width, ``labels``
        N x 1 x 1 x 1, and N a multiple of the batch size. Unlike Caffe, any float dtype (or
        uint8) is taken, C-contiguous or not: the layer copies the arrays.
        """
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        self._set_input_arrays(data, labels)

    def _set_input_arrays(self, data: Any, labels: Any) -> None:
        if not self.layers or self.layers[0].type != "MemoryData":
            raise errors.NetError("set_input_arrays may only be called if the first layer is a "
                                  "MemoryDataLayer")
        layer = self.layers[0]
        mp = self.param.layer[0].memory_data_param
        data, labels = np.asarray(data), np.asarray(labels)
        _check_array(data, "data array", (mp.channels, mp.height, mp.width))
        _check_array(labels, "labels array", (1, 1, 1))
        if data.shape[0] != labels.shape[0]:
            raise errors.NetError("data and labels must have the same first dimension")
        batch_size = int(getattr(layer, "batch_size", mp.batch_size))
        if data.shape[0] % batch_size:
            raise errors.NetError("first dimensions of input arrays must be a multiple of batch "
                                  f"size ({batch_size}), got {data.shape[0]}")
        layer.reset(data, labels)


def _check_array(arr: np.ndarray, name: str, chw: tuple[int, int, int]) -> None:
    """Caffe's CheckContiguousArray, less its contiguity and float32 tests."""
    if arr.ndim != 4:
        raise errors.NetError(f"{name} must be 4-d, got shape {arr.shape}")
    for axis, what, want in zip((1, 2, 3), ("number of channels", "height", "width"), chw):
        if arr.shape[axis] != want:
            raise errors.NetError(f"{name} has wrong {what}: {arr.shape[axis]}, the layer "
                                  f"wants {want}")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Batches joined along the first axis (0-d outputs, such as losses, are stacked)."""
    if parts and parts[0].ndim == 0:
        return np.stack(parts)
    return np.concatenate(parts) if parts else np.empty((0,))
