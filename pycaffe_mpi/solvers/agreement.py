"""Ranks agree on the solver settings that decide the sequence of collectives.

Under MPI every rank runs its own Solver (possibly from its own solver file: ``--solver a,a,b``).
The comm layers make every forward and backward pass collective, so ranks that disagree on how
many passes they run, or when they test, deadlock silently. Before the first collective the
ranks exchange one small digest of those settings (:func:`check_settings`) and every rank fails
together, naming the field, the ranks and their values. :func:`check_iteration` does the same
for the iteration a run starts from (ranks resumed from different snapshots).

Fields that may differ per rank (learning rates, momentum, weight decay, snapshot_prefix, the
net files, random_seed) are left out on purpose: they change what a rank computes, not when
it talks to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors

#: Solver fields that decide how many forward/backward passes (each one collective through the
#: comm layers) a rank runs and when; average_loss and display decide the final display pass;
#: replicas decides the communicators themselves (the Solver stores the effective count there).
SEQUENCE_FIELDS = ("max_iter", "iter_size", "test_iter", "test_interval", "test_initialization",
                   "display", "average_loss", "snapshot", "snapshot_after_train",
                   "test_compute_loss", "replicas")

#: Fields whose unset value means the same as another (replicas 0: one replica).
_EFFECTIVE = {"replicas": lambda v: v or 1}


def settings_digest(param: Any, extra: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """``(field, value)`` for every field of :data:`SEQUENCE_FIELDS` (repeated fields as tuples),
    then ``extra`` (run options outside the solver file that decide collectives)."""
    out: list[tuple[str, Any]] = []
    for name in SEQUENCE_FIELDS:
        value = _EFFECTIVE.get(name, lambda v: v)(getattr(param, name))
        out.append((name, tuple(value) if not isinstance(value, (int, float, bool, str))
                    else value))
    out.extend(sorted((extra or {}).items()))
    return out


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(str(r) for r in ranks)


def first_mismatch(digests: Sequence[Sequence[tuple[str, Any]]],
                   sources: Sequence[str] | None = None) -> str | None:
    """The message for the first field on which ranks disagree, or None when they all agree."""
    for k, (name, _) in enumerate(digests[0]):
        # grouped by equality, not hashing: values only need to compare
        groups: list[tuple[Any, list[int]]] = []
        for r, d in enumerate(digests):
            value = d[k][1] if k < len(d) else None
            for v, rs in groups:
                if v == value:
                    rs.append(r)
                    break
            else:
                groups.append((value, [r]))
        if len(groups) == 1:
            continue
        parts = [f"{_ranks(rs)}: {name} = {_show(v)}" for v, rs in groups]
        files = ""
        if sources and any(sources):
            files = " (solver files: " + ", ".join(
                f"rank {r} {s or '<SolverParameter>'}" for r, s in enumerate(sources)) + ")"
        return (f'the ranks disagree on solver field "{name}": {"; ".join(parts)}{files}. '
                "Every rank must run the same sequence of iterations, tests and displays, or "
                "the MPI layers wait forever; give the ranks the same value")
    return None


def check_settings(comm: Any, param: Any, source: str | None = None,
                   extra: dict[str, Any] | None = None) -> None:
    """Collective over ``comm``: raise :class:`~pycaffe_mpi.errors.SolverError` on every rank
    when the ranks' sequence fields differ (nothing to do without MPI)."""
    if comm is None or comm.size <= 1:
        return
    gathered = comm.allgather_obj((settings_digest(param, extra), source or ""))
    message = first_mismatch([g[0] for g in gathered], [g[1] for g in gathered])
    if message:
        raise errors.SolverError(message)


def check_iteration(comm: Any, iteration: int, resume_file: str | None) -> None:
    """Collective over ``comm``: every rank starts training from the same iteration."""
    if comm is None or comm.size <= 1:
        return
    gathered = comm.allgather_obj((int(iteration), resume_file or ""))
    if all(it == gathered[0][0] for it, _ in gathered):
        return
    parts = "; ".join(f"rank {r}: iteration {it}" + (f" (from {f})" if f else "")
                      for r, (it, f) in enumerate(gathered))
    raise errors.SolverError(
        f"the ranks start training from different iterations: {parts}. Resume every rank from "
        "the snapshot of the same iteration")
