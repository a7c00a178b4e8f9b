"""NetParameter preparation: what happens to a net definition before the Net builds it.

Caffe's order (``Net::Init`` and the readers before it), each step once:

1. **read**: parse the prototxt (or take a NetParameter) and upgrade old formats
   (:mod:`pycaffe_mpi.upgrade`); the result is a :class:`ParsedNet`, the message together with
   each layer's source location ("file:line"), so errors can point at the prototxt;
2. **state**: the NetState the net is built for (phase, level, stages);
3. **filter**: keep the layers whose include/exclude rules meet the state and the MPI rank
   (``NetStateRule.mpi_rank``, our extension);
4. **strip** (MPI): off the root, MPIBroadcast loses its bottoms and MPIGather its tops
   (:func:`strip_for_rank`; :mod:`pycaffe_mpi.comm.plan` plans the groups from steps 2-3);
5. **split**: a Split layer after every top read by several layers.

Every step returns new messages; the input is never modified.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from pycaffe_mpi import errors, prototxt, upgrade
from pycaffe_mpi.proto import caffe_pb2


@dataclasses.dataclass
class ParsedNet:
    """A NetParameter (current format) and the "file:line" of each of its layers.

    ``locations[i]`` belongs to ``param.layer[i]``; "" where a layer has no source (the Input
    layer made from ``input`` fields, a NetParameter built in code).
    """

    param: Any
    locations: list[str]
    path: str | None = None

    def location(self, i: int) -> str:
        return self.locations[i] if i < len(self.locations) else ""


def read_net(path: str | os.PathLike) -> ParsedNet:
    """Parse and upgrade a net prototxt (Caffe's ``ReadNetParamsFromTextFileOrDie``)."""
    path = os.fspath(path)
    param, locations = prototxt.read_net(path)
    return ParsedNet(param, locations, path)


def from_param(param: Any, path: str | None = None,
               locations: Sequence[str] | None = None) -> ParsedNet:
    """A copy of ``param``, upgraded; ``locations`` default to "file:layer #i" (or "")."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    if locations is None:
        n = len(out.layer) or len(out.layers)
        locations = [f"{path}:layer #{i}" if path else "" for i in range(n)]
    _, locs = upgrade.upgrade_net_as_needed(path or "<NetParameter>", out, locations)
    return ParsedNet(out, locs, path)


def as_parsed(model: Any, path: str | None = None,
              locations: Sequence[str] | None = None) -> ParsedNet:
    """A path, a NetParameter or a ParsedNet as a ParsedNet (a file is read once, here)."""
    if isinstance(model, ParsedNet):
        return model
    if isinstance(model, (str, os.PathLike)):
        return read_net(model)
    return from_param(model, path, locations)


def net_state(param: Any, phase: int, level: int | None = None,
              stages: Iterable[str] | None = None) -> Any:
    """The net's own ``state`` with ``phase`` set, ``level`` replaced and ``stages`` added."""
    state = caffe_pb2.NetState()
    state.CopyFrom(param.state)
    state.phase = phase
    if level is not None:
        state.level = level
    state.stage.extend(stages or ())
    return state


# -- filtering (Caffe's FilterNet + the MPI rank) ----------------------------------------------
def state_meets_rule(state: Any, rule: Any, layer_name: str, rank: int | None = 0) -> bool:
    """Caffe's ``StateMeetsRule`` plus the MPI rank test (evaluated first; skipped for
    ``rank=None``)."""
    if rank is not None and len(rule.mpi_rank) and rank not in rule.mpi_rank:
        return False
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def layer_kept(lp: Any, state: Any, rank: int | None, loc: str = "") -> bool:
    """Caffe's FilterNet decision for one layer (include XOR exclude rules)."""
    if len(lp.include) and len(lp.exclude):
        raise errors.NetError(f"{errors.layer_where(lp, loc)}: specify either include rules "
                              "or exclude rules; not both")
    if len(lp.include):
        return any(state_meets_rule(state, r, lp.name, rank) for r in lp.include)
    return not any(state_meets_rule(state, r, lp.name, rank) for r in lp.exclude)


def filter_net(param: Any, state: Any, rank: int | None = 0,
               locations: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """The layers of ``param`` kept for ``state`` (and MPI ``rank``), with their locations."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    kept_locs = []
    for i, lp in enumerate(param.layer):
        loc = locations[i] if i < len(locations) else ""
        if layer_kept(lp, state, rank, loc):
            out.layer.add().CopyFrom(lp)
            kept_locs.append(loc)
    return out, kept_locs


def strip_for_rank(param: Any, rank: int) -> None:
    """Off the root, MPIBroadcast loses its bottoms (a source) and MPIGather its tops (a sink).

    Part of the rank's filtering: :mod:`pycaffe_mpi.comm.plan` plans the groups from the layers
    this module keeps, never the other way round."""
    for lp in param.layer:
        if lp.type == "MPIBroadcast" and rank != lp.mpi_param.root:
            del lp.bottom[:]
            del lp.propagate_down[:]
        elif lp.type == "MPIGather" and rank != lp.mpi_param.root:
            del lp.top[:]
            del lp.loss_weight[:]


# -- Split layers (Caffe's InsertSplits) -------------------------------------------------------
def _split_layer_name(blob: str, layer: str, idx: int) -> str:
    return f"{blob}_{layer}_{idx}_split"


def _split_blob_name(blob: str, layer: str, idx: int, k: int) -> str:
    return f"{blob}_{layer}_{idx}_split_{k}"


def insert_splits(param: Any, locations: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """Caffe's ``InsertSplits``: a Split layer after every top consumed more than once.

    A top with a non-zero ``loss_weight`` counts as one extra consumer; its loss weight moves
    to the first Split top.
    """
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: collections.Counter = collections.Counter()
    loss_w: dict[tuple[int, int], float] = {}
    for i, lp in enumerate(param.layer):
        loc = locations[i] if i < len(locations) else ""
        for j, b in enumerate(lp.bottom):
            if b not in last_top:
                hint = errors.did_you_mean(b, last_top)
                raise errors.NetError(f'{errors.layer_where(lp, loc)}: unknown bottom blob "{b}" '
                                      f"(bottom index {j}){hint}")
            source_of[(i, j)] = last_top[b]
            consumers[last_top[b]] += 1
        for j, t in enumerate(lp.top):
            last_top[t] = (i, j)
        for j, w in enumerate(lp.loss_weight):
            loss_w[(i, j)] = w
            if w:
                consumers[(i, j)] += 1
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    out_locs: list[str] = []
    next_split: collections.Counter = collections.Counter()
    for i, lp in enumerate(param.layer):
        loc = locations[i] if i < len(locations) else ""
        new = out.layer.add()
        new.CopyFrom(lp)
        out_locs.append(loc)
        for j, b in enumerate(lp.bottom):
            src = source_of[(i, j)]
            if consumers[src] > 1:
                src_layer = param.layer[src[0]].name
                new.bottom[j] = _split_blob_name(b, src_layer, src[1], next_split[src])
                next_split[src] += 1
        for j, t in enumerate(lp.top):
            n = consumers[(i, j)]
            if n <= 1:
                continue
            w = loss_w.get((i, j), 0.0)
            split = out.layer.add(name=_split_layer_name(t, lp.name, j), type="Split", bottom=[t])
            split.top.extend(_split_blob_name(t, lp.name, j, k) for k in range(n))
            out_locs.append(loc)
            if w:
                split.loss_weight.extend([w] + [0.0] * (n - 1))
                del new.loss_weight[:]
    return out, out_locs


# -- the whole preparation ---------------------------------------------------------------------
def prepare(parsed: ParsedNet, state: Any, rank: int | None = 0) -> ParsedNet:
    """Filter ``parsed`` for ``state`` and ``rank``, strip comm layers off their root, and
    insert Split layers: the net one rank builds."""
    filtered, locs = filter_net(parsed.param, state, rank, parsed.locations)
    if rank is not None:
        strip_for_rank(filtered, rank)
    check_names(filtered, locs)
    split, locs = insert_splits(filtered, locs)
    return ParsedNet(split, locs, parsed.path)


_SPLIT_BLOB = re.compile(r".+_.+_\d+_split_\d+")


def check_names(param: Any, locations: Sequence[str] = ()) -> None:
    """Layer names unique (naming both places), and no top that only a Split layer may make.

    A top named like an automatic split blob (``<blob>_<layer>_<i>_split_<k>``) could collide
    with the blob :func:`insert_splits` makes and silently rewire the net.
    """
    first: dict[str, int] = {}
    for i, lp in enumerate(param.layer):
        loc = locations[i] if i < len(locations) else ""
        if lp.name in first:
            j = first[lp.name]
            other = locations[j] if j < len(locations) else ""
            raise errors.NetError(
                f'{errors.layer_where(lp, loc)}: duplicate layer name "{lp.name}": also the '
                f"name of layer #{j} (type {param.layer[j].type})"
                + (f" at {other}" if other else "") + "; layer names must be unique")
        first[lp.name] = i
        if lp.type == "Split":
            continue
        for t in lp.top:
            if _SPLIT_BLOB.fullmatch(t) and t not in lp.bottom:
                raise errors.NetError(
                    f'{errors.layer_where(lp, loc)}: top "{t}" is named like a blob the net '
                    "makes itself when it splits a blob read by several layers "
                    "(<blob>_<layer>_<index>_split_<k>); rename it")
