"""Blob memory shared: gradients of blobs never alive at the same time, and Split tops' data.

Caffe gives every blob its own diff, so a training net holds as much gradient memory as
activation memory (ResNet-50 at batch 8: 845 MiB of each). A blob's diff is alive only during
part of the backward pass: from the first backward (in reverse layer order) of a layer that
touches the blob until the backward of the first layer that touches it (its producer). Blobs
whose intervals do not overlap can keep their diffs in one buffer (:class:`~pycaffe_mpi.blob.
DiffSlot`), as a framework that frees each gradient once used does. The solver's training net
does this unless told not to (``share_diffs=False``; ``pycaffe-mpi train --share_diffs=false``);
nets built with ``Net(...)`` keep Caffe's one diff per blob.

What stays as in Caffe, with a diff of its own:

- net inputs, net outputs, and the tops of layers that do no backward (data layers): a user
  reads those diffs after ``backward`` (an input's gradient);
- a blob some consumer does not back-propagate into (``propagate_down: false``): Caffe's diff
  there stays as last written (zeros at first) and a Split would add it in;
- a blob with a loss weight (its diff is written in forward);
- a blob touched by a layer that does no backward.

After a backward pass the diff of a shared blob holds whatever the last user of its buffer
wrote: read intermediate gradients during the pass (``debug_info``) or build the net with
sharing off.

NOTE: ResNet-50 at batch 8 kept 845 MiB of blob diffs before; shared, the largest gradients
alive at once (a few blobs of 6.4 M floats) decide the size.
"""

from __future__ import annotations

from typing import Any

from pycaffe_mpi.blob import Blob, DiffSlot


def intervals(net: Any) -> dict[int, tuple[int, int, Blob]]:
    """``id(blob) → (start, end, blob)`` for the blobs that may share: the backward steps
    (step ``L − 1 − i`` is layer ``i``'s backward) during which their diff is alive."""
    n = len(net.layers)
    touched: dict[int, list[int]] = {}
    blobs: dict[int, Blob] = {}
    excluded: set[int] = set()
    keep_names = set(net.inputs) | set(net.output_blob_names)
    for name in keep_names:
        if name in net.blobs:
            excluded.add(id(net.blobs[name]))
    for i in range(n):
        need = net.layer_need_backward[i]
        for j, b in enumerate(net.bottom_vecs[i]):
            blobs[id(b)] = b
            touched.setdefault(id(b), []).append(i)
            if not (need and net.bottom_need_backward[i][j]):
                excluded.add(id(b))
        for t, w in zip(net.top_vecs[i], net.layers[i].loss_weights or ()):
            if w:
                excluded.add(id(t))
        for t in net.top_vecs[i]:
            blobs[id(t)] = t
            touched.setdefault(id(t), []).append(i)
            if not need:
                excluded.add(id(t))
    out = {}
    for key, layers in touched.items():
        if key in excluded:
            continue
        out[key] = (n - 1 - max(layers), n - 1 - min(layers), blobs[key])
    return out


def plan(net: Any) -> list[list[Blob]]:
    """Blobs grouped so that no two in a group are alive at once (greedy over start times,
    each blob into the free group of the closest size, a new group when none is free)."""
    groups: list[tuple[list[Blob], list[int]]] = []  # blobs, [end, size]
    for start, end, blob in sorted(intervals(net).values(), key=lambda v: (v[0], -v[2].count)):
        free = [g for g in groups if g[1][0] < start]
        if free:
            fits = [g for g in free if g[1][1] >= blob.count]
            g = (min(fits, key=lambda g: g[1][1]) if fits
                 else max(free, key=lambda g: g[1][1]))
            g[0].append(blob)
            g[1][0], g[1][1] = end, max(g[1][1], blob.count)
        else:
            groups.append(([blob], [end, blob.count]))
    return [g[0] for g in groups]


def share(net: Any) -> int:
    """Put ``net``'s sharable blobs' diffs into shared buffers; returns the number of buffers."""
    groups = plan(net)
    for group in groups:
        slot = DiffSlot(net.backend, net.dtype)
        for blob in group:
            blob.use_diff_slot(slot)
    return len(groups)


def share_split_data(net: Any) -> None:
    """Let each Split's tops share its bottom's data (as Caffe) unless a later layer writes the
    bottom or a top (an in-place consumer; see the Split layer). Every net does this."""
    for i, (layer, bottom, top) in enumerate(zip(net.layers, net.bottom_vecs, net.top_vecs)):
        if layer.type != "Split":
            continue
        mine = {id(b) for b in (*bottom, *top)}
        if any(id(t) in mine for tops in net.top_vecs[i + 1:] for t in tops):
            continue
        layer.share_data = True
        layer.reshape(bottom, top)
