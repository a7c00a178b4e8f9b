"""What ensemble to make of a single-model net: :class:`EnsembleSpec`, its checks and names.

Member ``i``'s copy of a layer or blob ``x`` is ``x_m<i>`` (:data:`MEMBER_SUFFIX` finds the
suffix again); the losses and normalizations are the choices of ``pycaffe-mpi ensemble``.
"""

from __future__ import annotations

import dataclasses
import re

from pycaffe_mpi import errors

LOSSES = ("independent", "score-avg", "prob-avg", "mcl")
AVERAGED_LOSSES = ("score-avg", "prob-avg")
NORMALIZATIONS = ("BATCH", "ASSIGNED")
MEMBER_SUFFIX = re.compile(r"_m\d+$")


class EnsembleError(errors.PycaffeError):
    """An ensemble option that cannot be honoured (for this base net)."""


@dataclasses.dataclass
class EnsembleSpec:
    """What ensemble to make of a single-model net (see :mod:`pycaffe_mpi.ensemble.build`)."""

    members: int = 4
    split: str | None = None   # None: nothing shared but the data (independent members);
                               # "<layer name>": members share every layer up to and including it
    loss: str = "independent"  # independent | score-avg | prob-avg | mcl
    k: int = 1                 # mcl
    ce_weight: float = 0.0     # mcl
    normalization: str = "BATCH"  # mcl: BATCH | ASSIGNED
    fused: bool = True         # averaged losses as one fused layer (else stock Caffe layers)
    ranks: int = 1             # place members over this many MPI ranks (1 = one process)
    bagging: bool = False      # each member's TRAIN data layer draws its own bootstrap sample
    same_init: bool = False    # members start from identical weights (seed_key = base name)

    def check(self) -> None:
        """Raise :class:`EnsembleError` (naming the option) for a setting that cannot work."""
        m = self.members
        if m < 1:
            raise EnsembleError(f"--members {m}: an ensemble needs at least one member")
        if self.loss not in LOSSES:
            raise EnsembleError(f'--loss "{self.loss}": expected one of {", ".join(LOSSES)}'
                                + errors.did_you_mean(self.loss, LOSSES))
        if self.loss == "mcl" and not 1 <= self.k <= m:
            raise EnsembleError(f"--k {self.k}: each example goes to k of the {m} members, so "
                                f"k must be between 1 and --members ({m})")
        if self.normalization not in NORMALIZATIONS:
            raise EnsembleError(f'--normalization "{self.normalization}": expected BATCH or '
                                "ASSIGNED" + errors.did_you_mean(self.normalization,
                                                                 NORMALIZATIONS))
        if self.ce_weight < 0:
            raise EnsembleError(f"--ce_weight {self.ce_weight}: must be >= 0")
        if not 1 <= self.ranks <= m:
            raise EnsembleError(f"--ranks {self.ranks}: must be between 1 and --members ({m}); "
                                "every rank hosts at least one member")
        if self.bagging and (self.split is not None or self.loss != "independent"):
            raise EnsembleError("--bagging: each member reads its own bootstrap batch, so it "
                                "needs independent members (no --split) and --loss independent "
                                "(the averaged and MCL losses compare members on one shared "
                                "batch)")

    def rank_of(self, member: int) -> int:
        """The MPI rank hosting ``member``."""
        return member % self.ranks

    def describe(self) -> str:
        """One line: the options that shaped the net."""
        return ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(self).items())

