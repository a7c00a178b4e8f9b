"""Net: a directed acyclic graph of layers built from a NetParameter, with pycaffe's face.

Building follows Caffe's ``Net::Init``. The definition is prepared first
(:mod:`pycaffe_mpi.netparam`: old formats upgraded, layers filtered by the NetState and the MPI
rank, Split layers inserted; the comm layers' groups planned by :mod:`pycaffe_mpi.comm.plan`).
Then in-place layers reuse their bottom blob; parameters named alike in ``param { name }`` are
shared; loss weights are attached; and which layers need backward is worked out from the losses,
``lr_mult``, ``propagate_down`` and ``force_backward``.

Python face (pycaffe)::

    net = pycaffe_mpi.Net("train_val.prototxt", pycaffe_mpi.TEST, weights="w.caffemodel")
    net.blobs["data"].data[...] = images      # arrays written in place
    out = net.forward()                       # {output name: array}
    net.backward()
    net.params["conv1"][0].data               # weights
    net.save("out.caffemodel")
"""

from __future__ import annotations

import collections
import logging
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import diff_sharing, errors, fillers, net_weights, netparam, registry, upgrade
from pycaffe_mpi.blob import Blob, name_layer
from pycaffe_mpi.comm.plan import (
    COMM_TYPES,
    check_digests,
    check_world,
    comm_digest,
    comm_groups,
)
from pycaffe_mpi.layer import TEST, TRAIN, Layer, LayerContext
from pycaffe_mpi.layer_types import python as python_layer
from pycaffe_mpi.net_api import NetApi
from pycaffe_mpi.netparam import (
    filter_net,
    insert_splits,
    layer_kept,
    state_meets_rule,
    strip_for_rank,
)
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger("pycaffe_mpi")


# Kept importable from here for callers written before netparam.py and comm/plan.py existed.
__all__ = ["COMM_TYPES", "Net", "check_digests", "comm_digest", "comm_groups", "filter_net",
           "insert_splits", "layer_kept", "state_meets_rule", "strip_for_rank",
           "upgrade_input_fields"]
upgrade_input_fields = upgrade.upgrade_net_input


# -- the Net -----------------------------------------------------------------------------------
class Net(NetApi):
    """A built network for one phase (and MPI rank).

    Args:
        model: a prototxt path, a ``NetParameter`` or a :class:`~pycaffe_mpi.netparam.ParsedNet`
            (old formats are upgraded, :mod:`pycaffe_mpi.upgrade`).
        phase: ``TRAIN`` (0) or ``TEST`` (1). pycaffe's legacy form ``Net(model, weights, phase)``
            is accepted too; after an int phase, a third positional argument is the level, as
            in pycaffe's ``Net(model, phase, level)``.
        weights: a ``.caffemodel`` (or comma-separated list) to copy layers from, by name.
        level, stages: the NetState level and stages.
        backend: where arrays live (default CPU); dtype: float32 (default) or float64.
        seed: seeds every layer's random generator (fillers, dropout, data order); None = random.
        rank: the MPI world rank used by ``mpi_rank`` rules (default: ``comm``'s rank, else 0).
        comm: the world communicator (:mod:`pycaffe_mpi.comm`); needed by nets with
            MPIBroadcast/MPIGather layers (default: ``comm.world()``).
        ctx: a run-time object for layers: each layer gets a
            :class:`~pycaffe_mpi.layer.LayerContext` (its location, the rank, its comm group)
            whose ``user`` is this object.
        source_path, locations: where ``model`` (a NetParameter) came from and the "file:line"
            of each of its layers, for error messages (a ParsedNet carries its own).
    """

    def __init__(
        self,
        model: str | Any,
        phase: int | str = TRAIN,
        legacy_phase: int | str | None = None,
        *,
        weights: str | None = None,
        level: int | None = None,
        stages: Iterable[str] | None = None,
        backend: backend_mod.Backend | None = None,
        dtype: Any = np.float32,
        seed: int | None = None,
        rank: int | None = None,
        comm: Any = None,
        ctx: Any = None,
        source_path: str | None = None,
        locations: Sequence[str] | None = None,
        share_diffs: bool = False,
    ) -> None:
        if isinstance(phase, str):  # pycaffe legacy: Net(prototxt, caffemodel, phase)
            weights, phase = phase, (TEST if legacy_phase is None else legacy_phase)
        elif legacy_phase is not None:  # pycaffe: Net(prototxt, phase, level)
            if isinstance(legacy_phase, bool) or not isinstance(legacy_phase, (int, np.integer)):
                raise errors.PycaffeError(
                    f"Net(model, phase, {legacy_phase!r}): after the phase, the third "
                    "positional argument is the NetState level (an int), as in pycaffe; "
                    "give weights as weights=...")
            if level is not None and level != legacy_phase:
                raise errors.PycaffeError(f"Net(): level given twice ({legacy_phase} and "
                                          f"level={level})")
            level = int(legacy_phase)
        if phase not in (TRAIN, TEST):
            raise errors.PycaffeError(f"phase must be TRAIN (0) or TEST (1), got {phase!r}")
        from pycaffe_mpi.pycaffe import settings

        # pycaffe's caffe.set_mode_gpu()/set_device()/set_random_seed() fill what is not given
        self.backend = backend or settings.backend()
        if seed is None:
            seed = settings.next_seed()
        self.dtype = np.dtype(dtype)
        self.phase = int(phase)
        self.ctx = ctx
        self.comm = comm
        self.rank = rank if rank is not None else (comm.rank if comm is not None else 0)
        parsed = netparam.as_parsed(model, source_path, locations)
        self.source_path = parsed.path
        state = netparam.net_state(parsed.param, self.phase, level, stages)
        if self.comm is not None or any(lp.type in COMM_TYPES for lp in parsed.param.layer):
            from pycaffe_mpi import comm as comm_mod

            self.comm = self.comm or comm_mod.world()
            check_world(parsed.param, self.comm.size, parsed.locations)
        self._groups: dict[str, tuple[Any, int, list[int]]] = {}
        if any(lp.type in COMM_TYPES for lp in parsed.param.layer):
            self._make_groups(parsed, state)
        prepared = netparam.prepare(parsed, state, self.rank)
        self.param = prepared.param
        self.name = prepared.param.name
        self.debug_info = prepared.param.debug_info
        self._build(prepared, seed)
        #: {layer: the layer before it} whose backward may run in one call (backward_from_to);
        #: empty it to run every layer's backward alone
        self.backward_pairs = self._find_backward_pairs()
        self.shares_diffs = bool(share_diffs and self.phase == TRAIN)
        if self.shares_diffs:  # see diff_sharing's module doc
            log.debug("Blob gradients in %d shared buffers", diff_sharing.share(self))
        if weights:
            for w in str(weights).split(","):
                self.copy_trained_layers_from(w)

    # -- construction -------------------------------------------------------------------------
    def _make_groups(self, parsed: netparam.ParsedNet, state: Any) -> None:
        """Agree on the comm layers across ranks, then create one communicator per layer
        (collective on every rank, in spec order, even where the layer is pruned)."""
        if self.comm is None:
            from pycaffe_mpi import comm as comm_mod

            self.comm = comm_mod.world()
        groups = comm_groups(parsed.param, state, self.comm.size, parsed.locations)
        digest = [("force_backward", bool(parsed.param.force_backward)), *comm_digest(groups)]
        check_digests(self.comm.allgather_obj(digest))
        for lp, members, root, _ in groups:
            group = self.comm.create_group(members)
            if group is not None:
                group.label = f'layer "{lp.name}"'  # named by the collective watchdog
                self._groups[lp.name] = (group, members.index(root), members)
                log.debug("Layer %s: MPI group of %d members, root %d", lp.name, len(members),
                          root)

    def _build(self, prepared: netparam.ParsedNet, seed: int | None) -> None:
        param = prepared.param
        self.layers: list[Layer] = []
        self.layer_names: list[str] = []
        self.blobs: collections.OrderedDict[str, Blob] = collections.OrderedDict()
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_names: dict[str, list[str]] = {}
        self.top_names: dict[str, list[str]] = {}
        self.blob_loss_weights: dict[str, float] = {}
        self._producer: dict[str, str] = {}
        self.learnable_params: list[Blob] = []
        self.params_lr: list[float] = []
        self.params_weight_decay: list[float] = []
        self._param_owner: dict[str, tuple[int, Blob, str]] = {}
        self.params: collections.OrderedDict[str, list[Blob]] = collections.OrderedDict()
        self.inputs: list[str] = []
        available: dict[str, None] = {}
        # NOTE: a layer's generator is seeded by (seed, layer name), not by its position, so a
        # layer draws the same initial weights wherever it sits: in a rank's pruned net or in the
        # single-process net, with or without other layers before it. ``seed_key``, when set,
        # replaces the name, so differently named layers (ensemble members) can start identical.
        entropy = np.random.SeedSequence(seed).entropy
        world_size = self.comm.size if self.comm is not None else 1
        if len({lp.name for lp in param.layer}) != len(param.layer):
            seen: set[str] = set()
            dup = next(lp.name for lp in param.layer if lp.name in seen or seen.add(lp.name))
            raise errors.NetError(f'duplicate layer name "{dup}": layer names must be unique')
        for i, lp in enumerate(param.layer):
            # the Input layer made from input fields has no line: name at least the file
            loc = prepared.location(i) or (prepared.path or "")
            cls = registry.layer_class(lp.type, errors.layer_where(lp, loc))
            fillers.check_layer_fillers(lp, loc)  # before any layer draws from a bad filler
            lp.phase = self.phase
            ctx = LayerContext(location=loc, rank=self.rank, world_size=world_size,
                               comm_group=self._groups.get(lp.name), net_name=param.name,
                               user=self.ctx)
            layer = cls(lp, phase=self.phase, backend=self.backend, dtype=self.dtype,
                        rng=_layer_rng(entropy, lp.seed_key or lp.name), ctx=ctx)
            bottoms = []
            for b in lp.bottom:
                bottoms.append(self.blobs[b])
                available.pop(b, None)
            tops = []
            for j, t in enumerate(lp.top):
                if j < len(lp.bottom) and lp.bottom[j] == t:
                    blob = self.blobs[t]  # in-place
                elif t in self.blobs:
                    raise errors.NetError(f'{errors.layer_where(lp, loc)}: top blob "{t}" is '
                                          f'already produced by layer "{self._producer[t]}"')
                else:
                    blob = Blob((), self.dtype, self.backend, name=t)
                    self.blobs[t] = blob
                self._producer[t] = lp.name
                available[t] = None
                tops.append(blob)
            before = [tuple(b.shape) for b in bottoms]
            self._setup_layer(layer, lp, bottoms, tops)
            self._check_in_place(layer, lp, bottoms, before)
            if len(lp.blobs):  # a NetParameter that carries its weights (after setup, so
                # user Python layers that add_blob unconditionally do not double them)
                self._load_layer_blobs(layer, lp.blobs, self.source_path or "<NetParameter>")
            if lp.type == "Input":
                self.inputs.extend(lp.top)
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            self.bottom_vecs.append(bottoms)
            self.top_vecs.append(tops)
            self.bottom_names[lp.name] = list(lp.bottom)
            self.top_names[lp.name] = list(lp.top)
            self._append_params(i, layer, lp)
        self.output_blob_names = list(available)
        self.outputs = self.output_blob_names
        self.layer_dict = collections.OrderedDict(zip(self.layer_names, self.layers))
        self._work_out_backward(param)
        diff_sharing.share_split_data(self)

    def _describe_bottoms(self, lp: Any, bottoms: Sequence[Blob]) -> str:
        parts = [f'"{n}" {tuple(b.shape)} from layer "{self._producer.get(n, "?")}"'
                 for n, b in zip(lp.bottom, bottoms)]
        return "; bottoms: " + ", ".join(parts) if parts else ""

    def _setup_layer(self, layer: Layer, lp: Any, bottoms: list[Blob], tops: list[Blob]) -> None:
        layer.check_counts(len(bottoms), len(tops))
        try:
            layer.setup(bottoms, tops)
            layer.reshape(bottoms, tops)
        except errors.PycaffeError as e:
            e = name_layer(e, layer)  # blobs raise without knowing their layer
            raise type(e)(f"{e}{self._describe_bottoms(lp, bottoms)}") from None
        except (Exception, SystemExit) as e:
            if not python_layer.is_user_layer(layer) and not isinstance(e, SystemExit):
                if isinstance(e, MemoryError):  # a NumPy temporary past the memory limit
                    raise name_layer(e, layer) from e
                _raise_if_empty(layer, bottoms, e)
                if isinstance(e, (ValueError, IndexError, TypeError)):
                    raise errors.ShapeError(
                        f"{errors.layer_where(lp, layer.location)}: cannot set up: "
                        f"{e}{self._describe_bottoms(lp, bottoms)}") from e
                raise
            raise python_layer.user_layer_error(layer, "setup", e) from e
        if len(lp.loss_weight) and len(lp.loss_weight) != len(tops):
            raise errors.NetError(f"{errors.layer_where(lp, layer.location)}: loss_weight must be "
                                  f"given once per top ({len(tops)}), got {len(lp.loss_weight)}")
        weights = list(lp.loss_weight) or [0.0] * len(tops)
        if not len(lp.loss_weight) and layer.is_loss and tops:
            weights[0] = 1.0
        layer.loss_weights = weights
        for name, w in zip(lp.top, weights):
            self.blob_loss_weights[name] = w
        for name in lp.top:
            self.blob_loss_weights.setdefault(name, 0.0)
        for t, w in zip(tops, weights):
            if w:
                t.diff[...] = w

    def _check_in_place(self, layer: Layer, lp: Any, bottoms: list[Blob],
                        before: list[tuple[int, ...]]) -> None:
        """An in-place top (named like its bottom) must keep the bottom's shape: a layer that
        changes it would read its input through the output's shape."""
        for j, (b, t) in enumerate(zip(lp.bottom, lp.top)):
            if b == t and tuple(bottoms[j].shape) != before[j]:
                raise errors.NetError(
                    f"{errors.layer_where(lp, layer.location)}, field top: computing in place "
                    f'would change blob "{t}" from {before[j]} to {tuple(bottoms[j].shape)}; '
                    "give the top its own name")

    def _append_params(self, i: int, layer: Layer, lp: Any) -> None:
        if len(lp.param) > len(layer.blobs):
            raise errors.NetError(f"{errors.layer_where(lp, layer.location)}: {len(lp.param)} "
                                  f"param blocks given but the layer has {len(layer.blobs)} "
                                  "parameter blobs")
        if len(layer.blobs):
            self.params[lp.name] = layer.blobs
        layer.param_propagate_down = []
        for j, blob in enumerate(layer.blobs):
            spec = lp.param[j] if j < len(lp.param) else caffe_pb2.ParamSpec()
            layer.param_propagate_down.append(spec.lr_mult != 0)
            if spec.name and spec.name in self._param_owner:
                owner_idx, owner, owner_layer = self._param_owner[spec.name]
                strict = spec.share_mode == caffe_pb2.ParamSpec.STRICT
                same = (tuple(owner.shape) == tuple(blob.shape) if strict
                        else owner.count == blob.count)
                if not same:
                    raise errors.ShapeError(
                        f'{errors.layer_where(lp, layer.location)}: shared param "{spec.name}" '
                        f"has shape {tuple(blob.shape)} here but {tuple(owner.shape)} in its "
                        f'owner layer "{owner_layer}"')
                if not strict:
                    blob.reshape(owner.shape)
                blob.share(owner)
                if spec.HasField("lr_mult") and spec.lr_mult != self.params_lr[owner_idx]:
                    raise errors.NetError(f'shared param "{spec.name}" has lr_mult {spec.lr_mult}'
                                          f" in layer {lp.name} but {self.params_lr[owner_idx]}"
                                          f' in "{owner_layer}"')
                continue
            idx = len(self.learnable_params)
            self.learnable_params.append(blob)
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            if spec.name:
                self._param_owner[spec.name] = (idx, blob, lp.name)

    def _work_out_backward(self, param: Any) -> None:
        """Caffe's need-backward analysis: which layers and bottoms take gradients."""
        n = len(self.layers)
        need_blob: dict[str, bool] = {}
        self.layer_need_backward = [False] * n
        self.bottom_need_backward: list[list[bool]] = []
        for i, (layer, lp) in enumerate(zip(self.layers, param.layer)):
            pdown = list(lp.propagate_down)
            if pdown and len(pdown) != len(lp.bottom):
                raise errors.NetError(f"{errors.layer_where(lp, layer.location)}: propagate_down "
                                      f"must be given once per bottom ({len(lp.bottom)})")
            bneed = [need_blob.get(b, False) and (not pdown or pdown[j])
                     for j, b in enumerate(lp.bottom)]
            # comm layers agree on the flag across their group (a collective on members)
            need = layer.sync_flag(any(bneed)) or any(getattr(layer, "param_propagate_down", []))
            self.layer_need_backward[i] = need
            self.bottom_need_backward.append(bneed)
            for t in lp.top:
                need_blob[t] = need
        under_loss: set[str] = set()
        skip_backp: set[str] = set()
        for i in range(n - 1, -1, -1):
            lp, layer = param.layer[i], self.layers[i]
            contributes = False
            skip_down = True
            for j, t in enumerate(lp.top):
                if layer.loss_weights[j] != 0 or t in under_loss:
                    contributes = True
                if t not in skip_backp:
                    skip_down = False
            contributes = layer.sync_flag(contributes)
            skip_down = not layer.sync_flag(not skip_down)
            if self.layer_need_backward[i] and skip_down:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(lp.bottom)
            if not contributes:
                self.layer_need_backward[i] = False
            for j, b in enumerate(lp.bottom):
                if contributes:
                    under_loss.add(b)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip_backp.add(b)
        if param.force_backward:
            for i, layer in enumerate(self.layers):
                self.layer_need_backward[i] = True
                pdown = list(param.layer[i].propagate_down)
                self.bottom_need_backward[i] = [
                    need or (layer.allow_force_backward(j) and (not pdown or pdown[j]))
                    for j, need in enumerate(self.bottom_need_backward[i])]
        for i, name in enumerate(self.layer_names):
            if not self.layer_need_backward[i]:
                log.debug("%s does not need backward computation.", name)

    # -- running ------------------------------------------------------------------------------
    def _index(self, name: str | int | None, default: int) -> int:
        if name is None:
            return default
        if isinstance(name, int):
            return name
        if name not in self.layer_dict:
            hint = errors.did_you_mean(name, self.layer_names)
            raise errors.NetError(f'no layer named "{name}"{hint}')
        return self.layer_names.index(name)

    def forward_from_to(self, start: int, end: int) -> float:
        """Run layers ``start..end`` (inclusive); return their loss contribution (a float; on a
        GPU a 0-d device array, so that nothing waits for the device until it is read)."""
        loss = 0.0
        for i in range(start, end + 1):
            layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
            try:
                layer.reshape(bottom, top)
                layer.forward(bottom, top)
            except (Exception, SystemExit) as e:
                if python_layer.is_user_layer(layer) or isinstance(e, SystemExit):
                    raise python_layer.user_layer_error(layer, "forward", e) from e
                if isinstance(e, (errors.PycaffeError, MemoryError)):
                    raise name_layer(e, layer) from e  # e.g. a work buffer past INT_MAX
                _raise_if_empty(layer, bottom, e)
                raise
            for t, w in zip(top, layer.loss_weights):
                if w:
                    # NOTE: on a GPU the loss stays a device scalar (float() of it would wait
                    # for the GPU every iteration); whoever displays it reads it then.
                    total = t.data.sum()
                    loss += w * (float(total) if isinstance(total, np.generic) else total)
                    t.diff[...] = w
            if self.debug_info:
                self._debug("Forward", i, top, "data")
        return loss

    def backward_from_to(self, start: int, end: int) -> None:
        """Back-propagate from layer ``start`` down to layer ``end`` (start >= end).

        A pair in :attr:`backward_pairs` with both layers in the range may take its gradient
        in one call (``upper.backward_with(lower, ...)``, which says whether it could); the
        results are those of the two backwards, up to rounding. With ``debug_info`` (which
        logs every layer's bottom gradient) each layer runs its own."""
        i = start
        while i >= end:
            j = self.backward_pairs.get(i, -1)
            if (j >= end and not self.debug_info and self.layer_need_backward[i]
                    and self.layer_need_backward[j]
                    and self._backward_layer(i, self.layers[i].backward_with, self.layers[j],
                                             self.top_vecs[i], self.bottom_need_backward[i],
                                             self.bottom_vecs[i], self.bottom_need_backward[j])):
                i = j - 1
                continue
            if self.layer_need_backward[i]:
                self._backward_layer(i, self.layers[i].backward, self.top_vecs[i],
                                     self.bottom_need_backward[i], self.bottom_vecs[i])
                if self.debug_info:
                    self._debug("Backward", i, self.bottom_vecs[i], "diff")
            i -= 1

    def _backward_layer(self, i: int, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, layer ``i``'s backward, its errors named after the layer."""
        try:
            return fn(*args)
        except (Exception, SystemExit) as e:
            if python_layer.is_user_layer(self.layers[i]) or isinstance(e, SystemExit):
                raise python_layer.user_layer_error(self.layers[i], "backward", e) from e
            if isinstance(e, NotImplementedError):  # a layer Caffe gives no backward
                e = errors.NetError(str(e))
            if isinstance(e, (errors.PycaffeError, MemoryError)):
                raise name_layer(e, self.layers[i]) from e
            _raise_if_empty(self.layers[i], self.bottom_vecs[i], e)
            raise

    def _find_backward_pairs(self) -> dict[int, int]:
        """Layer index -> index of the layer right before it, for each layer that names that
        layer's type as its ``backward_partner`` (and has ``backward_with``) where both run in
        place on one blob and the upper one has one bottom (Caffe's in-place BatchNorm +
        Scale of ResNet and MobileNet)."""
        pairs = {}
        for i in range(1, len(self.layers)):
            upper, lower = self.layers[i], self.layers[i - 1]
            ub, lb = self.bottom_vecs[i], self.bottom_vecs[i - 1]
            if (getattr(upper, "backward_partner", None) == lower.type and len(ub) == 1
                    and hasattr(upper, "backward_with")
                    and lb[0] is self.top_vecs[i - 1][0] is ub[0] is self.top_vecs[i][0]):
                pairs[i] = i - 1
        return pairs

    def _debug(self, what: str, i: int, blobs: Sequence[Blob], field: str) -> None:
        names = self.top_names if what == "Forward" else self.bottom_names
        for j, (name, b) in enumerate(zip(names[self.layer_names[i]], blobs)):
            if what == "Backward" and not self.bottom_need_backward[i][j]:
                continue
            arr = b.data if field == "data" else b.diff
            val = float(abs(arr).mean()) if b.count else 0.0
            log.info("    [%s] Layer %s, %s blob %s %s: %g", what, self.layer_names[i],
                     "top" if what == "Forward" else "bottom", name, field, val)
        for j, p in enumerate(self.layers[i].blobs):
            arr = p.data if what == "Forward" else p.diff
            log.info("    [%s] Layer %s, param blob %d %s: %g", what, self.layer_names[i], j,
                     field, float(abs(arr).mean()) if p.count else 0.0)

    def forward_loss(self) -> float:
        """Forward through every layer; return the total loss."""
        return self.forward_from_to(0, len(self.layers) - 1)

    def backward_all(self) -> None:
        self.backward_from_to(len(self.layers) - 1, 0)

    def forward_backward(self) -> float:
        loss = self.forward_loss()
        self.backward_all()
        return loss

    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None,
                end: str | None = None, **inputs: Any) -> dict[str, Any]:
        """pycaffe's forward: set ``inputs``, run ``start..end``, return the output arrays."""
        for name, arr in inputs.items():
            if name not in self.inputs:
                raise errors.NetError(f'"{name}" is not an input blob of this net '
                                      f"(inputs: {self.inputs})")
            self.blobs[name].reshape(np.shape(arr))
            self.blobs[name].data[...] = self.backend.asarray(arr, self.dtype)
        s = self._index(start, 0)
        e = self._index(end, len(self.layers) - 1)
        self.forward_from_to(s, e)
        names = list(self.top_names[self.layer_names[e]]) if end is not None \
            else list(self.output_blob_names)
        names += [b for b in blobs or () if b not in names]
        return {n: self.blobs[n].data for n in names}

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None,
                 end: str | None = None, **top_diffs: Any) -> dict[str, Any]:
        """pycaffe's backward: set output diffs, run ``start..end``, return the input diffs."""
        for name, arr in top_diffs.items():
            if name not in self.output_blob_names:
                raise errors.NetError(f'"{name}" is not an output blob of this net')
            self.blobs[name].diff[...] = self.backend.asarray(arr, self.dtype)
        s = self._index(start, len(self.layers) - 1)
        e = self._index(end, 0)
        self.backward_from_to(s, e)
        names = list(self.bottom_names[self.layer_names[e]]) if end is not None \
            else list(self.inputs)
        names += [d for d in diffs or () if d not in names]
        return {n: self.blobs[n].diff for n in names}

    def reshape(self) -> None:
        for layer, b, t in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(b, t)

    def clear_param_diffs(self) -> None:
        for p in self.learnable_params:
            p.diff[...] = 0

    # -- weights ------------------------------------------------------------------------------
    def share_trained_layers_with(self, other: Net) -> None:
        """Use ``other``'s parameter blobs for layers of the same name (test nets do this)."""
        for name, layer in zip(self.layer_names, self.layers):
            if name not in other.layer_dict:
                continue
            src = other.layer_dict[name]
            if len(src.blobs) != len(layer.blobs):
                raise errors.NetError(f'layer "{name}": {len(src.blobs)} blobs in the source '
                                      f"net, {len(layer.blobs)} here")
            for j, (dst, s) in enumerate(zip(layer.blobs, src.blobs)):
                if tuple(dst.shape) != tuple(s.shape):
                    raise errors.ShapeError(f'layer "{name}" param {j}: shape {tuple(s.shape)} '
                                            f"in the source net, {tuple(dst.shape)} here")
                dst.share(s)

    def copy_trained_layers_from(self, source: str | Any) -> None:
        """Caffe's ``CopyTrainedLayersFrom``: copy parameter blobs by layer name
        (:func:`pycaffe_mpi.net_weights.copy_trained_layers`)."""
        net_weights.copy_trained_layers(self, source)

    def _load_layer_blobs(self, layer: Layer, blob_protos: Sequence[Any], path: str) -> None:
        net_weights.load_layer_blobs(self, layer, blob_protos, path)

    copy_from = copy_trained_layers_from

    def to_proto(self, write_diff: bool = False) -> Any:
        """The net as a NetParameter with each layer's blobs (a .caffemodel's content)."""
        return net_weights.to_proto(self, write_diff)

    def save(self, path: str) -> None:
        """Write the weights as a binary .caffemodel (atomically)."""
        from pycaffe_mpi import snapshot as io

        io.write_proto_binary(path, self.to_proto())

    # -- run-time state -----------------------------------------------------------------------
    def get_layer_states(self) -> list[tuple[str, bytes]]:
        return [(n, layer.get_state()) for n, layer in zip(self.layer_names, self.layers)]

    def set_layer_states(self, states: Iterable[tuple[str, bytes]]) -> None:
        for name, state in states:
            if name in self.layer_dict:
                self.layer_dict[name].set_state(state)

    def begin_test_pass(self) -> None:
        """Tell every layer a test pass starts (see :meth:`Layer.begin_test_pass`)."""
        for layer in self.layers:
            layer.begin_test_pass()

    def end_test_pass(self, prefix: str | None, iteration: int | None = None) -> list[str]:
        """Tell every layer the test pass ended and write what they measured over it, e.g.
        the oracle assignment as ``<prefix>_<layer>_assignment.csv|.png`` with ``iteration``
        in the figure's title (see ``reports.assignment.write_reports``); returns the paths
        written. With ``prefix`` None the reports are logged only. The solver's test pass and
        ``pycaffe-mpi test`` both end here."""
        from pycaffe_mpi.reports import assignment

        measured = [(layer.name, layer.end_test_pass()) for layer in self.layers]
        return assignment.write_reports([m for m in measured if m[1] is not None], prefix,
                                        iteration)

    def close(self) -> None:
        """Stop background work (data prefetch threads)."""
        for layer in self.layers:
            closer = getattr(layer, "close", None)
            if callable(closer):
                closer()

    def __repr__(self) -> str:
        return f"<Net {self.name!r} phase={'TRAIN' if self.phase == TRAIN else 'TEST'} " \
               f"layers={len(self.layers)}>"


def _raise_if_empty(layer: Layer, bottom: Sequence[Blob], exc: BaseException) -> None:
    """A ShapeError naming the layer when ``exc`` came from a built-in layer given an empty
    bottom (a batch of 0, as ``dim: 0`` gives): Caffe runs those as no-ops, many of our kernels
    cannot."""
    empty = [tuple(b.shape) for b in bottom if b.count == 0]
    if empty:
        raise errors.ShapeError(
            f"{errors.layer_where(layer.layer_param, layer.location)}: cannot run on an empty "
            f"bottom (shapes {empty}): {type(exc).__name__}: {exc}; give every axis a size "
            "of at least 1") from exc


def _layer_rng(entropy: int, name: str) -> np.random.Generator:
    """The random generator of the layer called ``name`` in a net seeded with ``entropy``."""
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(zlib.crc32(
        name.encode()),)))
