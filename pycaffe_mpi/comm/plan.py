"""Planning the MPI communicators of a net, free of mpi4py (every rank runs it alike).

Each comm layer (MPIBroadcast, MPIGather) gets a group: the ranks listed in its ``include``
rules, in listing order (that order is the rank inside the group), then the other ranks that keep
the layer; ``mpi_param.root`` (a world rank) must be a member. Before the first collective the
ranks compare a digest of these plans (:func:`check_digests`), so nets that disagree fail
together with one message instead of deadlocking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors, netparam

COMM_TYPES = ("MPIBroadcast", "MPIGather")


def comm_groups(param: Any, state: Any, world_size: int,
                locations: Sequence[str] = ()) -> list[tuple[Any, list[int], int, str]]:
    """For every comm layer that exists on some rank for ``state``, in spec order:
    ``(layer param, member world ranks, root world rank, location)``.

    Members are the ranks that keep the layer, ordered as its ``include`` rules list them
    (that order is the rank inside the group), the others in ascending order. The root
    (``mpi_param.root``, a world rank) must be a member.
    """
    out = []
    for i, lp in enumerate(param.layer):
        if lp.type not in COMM_TYPES:
            continue
        loc = locations[i] if i < len(locations) else ""
        kept = [r for r in range(world_size) if netparam.layer_kept(lp, state, r, loc)]
        if not kept:
            continue
        listed = [r for rule in lp.include for r in rule.mpi_rank if r in kept]
        members = list(dict.fromkeys(listed)) + [r for r in kept if r not in listed]
        root = int(lp.mpi_param.root)
        if root not in members:
            raise errors.NetError(
                f"{errors.layer_where(lp, loc)}, field mpi_param.root: root {root} is not a "
                f"member of the layer's group (world ranks {members}); give one of those ranks")
        out.append((lp, members, root, loc))
    return out


def comm_digest(groups: Sequence[tuple[Any, list[int], int, str]]) -> list[tuple]:
    """What every rank must agree on before the first collective: names, types, groups, roots."""
    return [(lp.name, lp.type, tuple(m), root) for lp, m, root, _ in groups]


def check_digests(digests: Sequence[list[tuple]]) -> None:
    """Raise, naming the first difference, unless every rank's digest agrees (entry 0 is the
    net's force_backward, which decides whether comm layers run backward; then the comm layers)."""
    ref = digests[0]
    for r, d in enumerate(digests[1:], start=1):
        if d == ref:
            continue
        for k in range(max(len(ref), len(d))):
            a = ref[k] if k < len(ref) else None
            b = d[k] if k < len(d) else None
            if a != b:
                def show(x: tuple | None) -> str:
                    if x is None:
                        return "nothing"
                    if len(x) == 2:
                        return f"{x[0]}: {x[1]}"
                    return f'{x[1]} "{x[0]}" (group {list(x[2])}, root {x[3]})'

                what = "on force_backward" if k == 0 else f"at comm layer #{k - 1}"
                raise errors.NetError(
                    f"the ranks' nets disagree {what}: rank 0 has {show(a)}, rank "
                    f"{r} has {show(b)}; every rank must see the same MPIBroadcast/MPIGather "
                    "layers in the same order (use one prototxt for all ranks)")


class NeedsMoreRanks(errors.NetError):
    """A net whose ``mpi_rank`` rules need more MPI ranks than the job has (``ranks``)."""

    def __init__(self, message: str, ranks: int = 0) -> None:
        super().__init__(message)
        self.ranks = ranks


def ranks_needed(param: Any) -> tuple[int, Any, int]:
    """``(ranks, layer, index)``: how many MPI ranks the net's ``mpi_rank`` rules, comm-layer
    roots and world-wide MPIGather tops need (1 when none), and the first layer asking for the
    most (None when none)."""
    need, where, index = 1, None, -1
    for i, lp in enumerate(param.layer):
        asked = [int(r) for rule in (*lp.include, *lp.exclude) for r in rule.mpi_rank]
        if lp.type in COMM_TYPES:
            asked.append(int(lp.mpi_param.root))
        if lp.type == "MPIGather" and not any(len(r.mpi_rank) for r in lp.include):
            asked.append(len(lp.top) - 1)  # the root has one top per rank of the world
        if asked and max(asked) + 1 > need:
            need, where, index = max(asked) + 1, lp, i
    return need, where, index


def check_world(param: Any, world_size: int, locations: Sequence[str] = ()) -> None:
    """Raise when a layer names a rank outside a world of ``world_size`` ranks: under mpiexec
    the job is too small; without it (``world_size`` 1) say how many ranks the net needs and
    how to start them."""
    need, lp, i = ranks_needed(param)
    if need <= world_size:
        return
    loc = locations[i] if 0 <= i < len(locations) else ""
    where = errors.layer_where(lp, loc)
    if world_size == 1:
        raise NeedsMoreRanks(
            f"{where} asks for MPI rank {need - 1}: this net needs {need} MPI ranks but runs "
            f"in a single process; start it with mpiexec, e.g. `mpiexec -n {need} "
            "pycaffe-mpi train --solver SOLVER` (or test/time --model NET)", need)
    raise NeedsMoreRanks(
        f"{where} asks for MPI rank {need - 1}, outside this job of {world_size} ranks "
        f"(0..{world_size - 1}); start {need} ranks (mpiexec -n {need}) or fix the mpi_rank "
        "rules / mpi_param.root", need)
