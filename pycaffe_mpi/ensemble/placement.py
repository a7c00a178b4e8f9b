"""Where the ensemble's layers live: phase and MPI-rank rules, and the comm layers between ranks.

Placement over R MPI ranks: member i lives on rank ``i % R`` (slot ``i // R``); data, trunk,
loss and metrics on rank 0. Each trunk blob B that members on other ranks read goes through one
``MPIBroadcast`` (root 0, top ``B_b``); the scores of the slot-j members, named
``<score>_slot<j>`` on every rank, come back to rank 0 through one ``MPIGather`` whose tops are
``<score>_m<i>`` in member order. A member alone on rank 0 in its slot needs no gather. With
bagging a member's Data copies live on its rank (its labels are gathered like the scores) and
the TEST data is broadcast, then split on each rank. Training such a net with identical member
starts (``same_init``) needs ``pycaffe-mpi train --same_seed`` (by default rank r seeds with
``random_seed + r``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pycaffe_mpi import errors, netparam
from pycaffe_mpi.ensemble.spec import MEMBER_SUFFIX, EnsembleError, EnsembleSpec
from pycaffe_mpi.proto import caffe_pb2


def active(lp: Any, phase: int) -> bool:
    """Whether ``lp`` is in the ``phase`` net (level 0, no stages, any rank)."""
    return netparam.layer_kept(lp, caffe_pb2.NetState(phase=phase), None)


def phases_of(layers: Iterable[Any]) -> list[int]:
    """The phases (TRAIN, TEST, in that order) in which any of ``layers`` is active."""
    layers = list(layers)
    return [p for p in (caffe_pb2.TRAIN, caffe_pb2.TEST) if any(active(lp, p) for lp in layers)]


def _only_phase(rule: Any) -> bool:
    return [f.name for f, _ in rule.ListFields()] in ([], ["phase"])


def restrict_phase(lp: Any, phase: int) -> None:
    """Keep ``lp`` only in the ``phase`` net (its other include rules kept)."""
    if len(lp.exclude):
        raise EnsembleError(f"--bagging: {errors.layer_where(lp)} uses exclude rules; write "
                            "them as include { phase: ... } rules")
    if not len(lp.include):
        lp.include.add(phase=phase)
        return
    rules = []
    for r in lp.include:
        if not r.HasField("phase") or r.phase == phase:
            rules.append(caffe_pb2.NetStateRule())
            rules[-1].CopyFrom(r)
            rules[-1].phase = phase
    del lp.include[:]
    lp.include.extend(rules)


def on_rank(lp: Any, rank: int) -> None:
    """Add ``mpi_rank: rank`` to each include rule of ``lp`` (phase-only exclude rules become
    include rules of the other phase first)."""
    if len(lp.exclude):
        if not all(_only_phase(r) for r in lp.exclude):
            raise EnsembleError(f"--ranks: {errors.layer_where(lp)} uses exclude rules beyond "
                                "the phase; write them as include rules to place it on a rank")
        phases = phases_of([lp])
        del lp.exclude[:]
        for p in phases:
            lp.include.add(phase=p)
    if not len(lp.include):
        lp.include.add()
    for r in lp.include:
        del r.mpi_rank[:]
        r.mpi_rank.append(rank)


def _comm_layer(name: str, kind: str, bottom: str, tops: Sequence[str], ranks: Sequence[int],
                phases: Sequence[int]) -> Any:
    """An MPIBroadcast/MPIGather rooted at rank 0 whose group is ``ranks`` in that order."""
    lp = caffe_pb2.LayerParameter(name=name, type=kind, bottom=[bottom], top=list(tops))
    lp.mpi_param.root = 0
    for r in ranks:
        rule = lp.include.add(mpi_rank=[r])
        if len(phases) == 1:
            rule.phase = phases[0]
    return lp


def _rename_blobs(layers: Iterable[Any], old: str, new: str, bottoms_only: bool = False) -> None:
    for lp in layers:
        fields = (lp.bottom,) if bottoms_only else (lp.bottom, lp.top)
        for field in fields:
            for j, b in enumerate(field):
                if b == old:
                    field[j] = new


def fan_out(tops: Iterable[str], members: list[list[Any]], head: list[Any],
            spec: EnsembleSpec) -> list[Any]:
    """TEST phase with bagging: Splits hand the shared test blob ``t`` to the ``t_m<i>`` that
    TEST layers read (one Split per rank, fed by an MPIBroadcast of ``t`` when placed)."""
    out = []
    for t in tops:
        wanted: dict[int, list[str]] = {}  # rank -> the t_m<i> read there, in member order
        for m in range(spec.members):
            name = f"{t}_m{m}"
            for r, layers in ((spec.rank_of(m), members[m]), (0, head)):
                if any(active(lp, caffe_pb2.TEST) and name in lp.bottom for lp in layers) and \
                        name not in wanted.get(r, []):
                    wanted.setdefault(r, []).append(name)
        src = t
        if set(wanted) - {0}:
            src = f"{t}_b"
            out.append(_comm_layer(f"{t}_broadcast", "MPIBroadcast", t, [src],
                                   [0, *sorted(r for r in wanted if r)], [caffe_pb2.TEST]))
        for r, names in sorted(wanted.items()):
            split = caffe_pb2.LayerParameter(
                name=f"{t}_to_members" + (f"_rank{r}" if spec.ranks > 1 else ""), type="Split",
                bottom=[src], top=names)
            split.include.add(phase=caffe_pb2.TEST)
            if spec.ranks > 1:
                on_rank(split, r)
            out.append(split)
    return out


def place(shared: list[Any], test_splits: list[Any], members: list[list[Any]],
          copies: list[list[Any]], head: list[Any], score: str,
          spec: EnsembleSpec) -> list[Any]:
    """The layers placed over ``spec.ranks`` ranks, comm layers added (module docstring).

    With bagging, member i's data copies live on its rank; the labels they read go to rank 0
    (where the losses are) through per-slot MPIGathers, as the scores do.
    """
    r_count = spec.ranks
    for lp in shared + head:
        on_rank(lp, 0)
    shared_tops = {t for lp in shared for t in lp.top}
    readers: dict[str, dict[int, list[Any]]] = {}  # trunk blob -> rank -> member layers
    for m, layers in enumerate(members):
        own: set[str] = set()
        for lp in layers:
            for b in lp.bottom:
                if b in shared_tops and b not in own:
                    readers.setdefault(b, {}).setdefault(spec.rank_of(m), []).append(lp)
            own.update(lp.top)
    member_layers = [lp for m in range(spec.members) for lp in copies[m] + members[m]]
    bcasts = []
    for blob, by_rank in readers.items():
        if set(by_rank) == {0}:
            continue
        group = [0, *sorted(r for r in by_rank if r != 0)]
        phases = phases_of(lp for lps in by_rank.values() for lp in lps)
        bcasts.append(_comm_layer(f"{blob}_broadcast", "MPIBroadcast", blob, [f"{blob}_b"],
                                  group, phases))
        _rename_blobs(member_layers, blob, f"{blob}_b", bottoms_only=True)
    head_reads = {b for lp in head for b in lp.bottom}
    gathered = [score] + [MEMBER_SUFFIX.sub("", t) for lp in copies[0] for t in lp.top
                          if t in head_reads]
    gathers = []
    for blob in gathered:
        for j in range((spec.members + r_count - 1) // r_count):
            slot = [m for m in range(spec.members) if m // r_count == j]
            own = [copies[m] + members[m] for m in slot]
            if len(slot) == 1 or not any(f"{blob}_m{slot[0]}" in lp.top for lp in own[0]):
                continue
            for m, layers in zip(slot, own):
                _rename_blobs(layers, f"{blob}_m{m}", f"{blob}_slot{j}")
            phases = phases_of(lp for layers in own for lp in layers
                             if f"{blob}_slot{j}" in lp.top)
            gathers.append(_comm_layer(f"{blob}_gather_slot{j}", "MPIGather",
                                       f"{blob}_slot{j}", [f"{blob}_m{m}" for m in slot],
                                       [spec.rank_of(m) for m in slot], phases))
    for m in range(spec.members):
        for lp in copies[m] + members[m]:
            on_rank(lp, spec.rank_of(m))
    return shared + test_splits + bcasts + member_layers + gathers + head

