"""Ensembles and TreeNets made from a single-model net (``pycaffe-mpi ensemble``).

:func:`make_ensemble_net` turns a single-model train/test net, one whose ``SoftmaxWithLoss``
names the score blob (bottom 0) and the label (bottom 1), into an ensemble of M members:

- **Trunk and members.** The layers up to and including ``split`` (prototxt order) form a trunk
  that every member shares; every later layer is copied once per member. Member ``i``'s copy of
  layer ``x`` is ``x_m<i>``, every blob a member layer writes is ``<blob>_m<i>`` (in-place layers
  stay in place), and ``param { name }`` gets the same suffix, so members never share weights
  with each other. Layers without bottoms (data) are always shared. ``split`` None: independent
  members (nothing shared but the data); ``split`` = the score layer: one model read M times.
- **Loss.** The base's SoftmaxWithLoss and the Accuracy layers on the score are dropped. In
  their place, with the base loss's phase rules, ``loss_param`` and ``loss_weight``:
  ``independent`` = one SoftmaxWithLoss per member (each weighs 1, as in Caffe ensembles);
  ``score-avg`` = softmax loss of the mean score; ``prob-avg`` = −log of the mean probability;
  ``mcl`` = the multiple-choice (oracle top-k) loss. The averaged losses are one fused,
  numerically stable layer (``ScoreAverageLoss`` / ``ProbabilityAverageLoss``) or, with
  ``fused=False``, stock Caffe layers: Eltwise SUM (coeff 1/M) → SoftmaxWithLoss, or Softmax per
  member → Eltwise SUM (coeff 1/M) → MultinomialLogisticLoss. An ``EnsembleAccuracy`` layer
  (TEST) reports ensemble-mean, mean-score, oracle, the authors' oracle and member accuracies.
- **same_init**: member layers get ``seed_key`` = the base layer's name, so in nets with the same
  ``random_seed`` every member starts from the same weights (Dropout keeps its own key: members
  still draw different masks). Without it members differ because their names differ.
- **bagging**: every TRAIN-phase Data layer is copied per member (``<name>_m<i>``) with
  ``bootstrap_param { enable: true member: i }`` and its tops renamed ``<top>_m<i>``; the TEST
  data stays shared (a TEST-phase Split hands each member its ``<top>_m<i>``).
- **Placement over R MPI ranks**: member i lives on rank ``i % R`` (slot ``i // R``); data,
  trunk, loss and metrics on rank 0. Each trunk blob B that members on other ranks read goes
  through one ``MPIBroadcast`` (root 0, top ``B_b``); the scores of the slot-j members, named
  ``<score>_slot<j>`` on every rank, come back to rank 0 through one ``MPIGather`` whose tops are
  ``<score>_m<i>`` in member order. A member alone on rank 0 in its slot needs no gather. With
  bagging a member's Data copies live on its rank (its labels are gathered like the scores)
  and the TEST data is broadcast, then split on each rank. Training such a net with identical
  member starts (``same_init``) needs ``pycaffe-mpi train --same_seed`` (by default rank r
  seeds with ``random_seed + r``).

Limits: the base has exactly one SoftmaxWithLoss; to place over ranks it must not use
``mpi_rank`` rules or comm layers itself, and exclude rules only on the phase.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import text_format

from pycaffe_mpi import errors, prototxt
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.net import COMM_TYPES, Net, filter_net, layer_kept, upgrade_input_fields
from pycaffe_mpi.proto import caffe_pb2

LOSSES = ("independent", "score-avg", "prob-avg", "mcl")
AVERAGED_LOSSES = ("score-avg", "prob-avg")
NORMALIZATIONS = ("BATCH", "ASSIGNED")
#: the EnsembleAccuracy tops, in the layer's order
ACCURACY_TOPS = ("ensemble_accuracy", "score_mean_accuracy", "oracle_accuracy",
                 "oracle_accuracy_authors", "member_accuracy")
ACCURACY_LAYER = "ensemble_accuracy"
# NOTE: Dropout draws its masks from its generator: a shared seed_key would give every member
# the same masks, which same_init (same starting weights) does not ask for.
_OWN_RNG = ("Dropout",)
_MEMBER_SUFFIX = re.compile(r"_m\d+$")


class EnsembleError(errors.PycaffeError):
    """An ensemble option that cannot be honoured (for this base net)."""


@dataclasses.dataclass
class EnsembleSpec:
    """What ensemble to make of a single-model net (see the module docstring)."""

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


# -- small helpers ------------------------------------------------------------------------------
def _copy(lp: Any) -> Any:
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(lp)
    return out


def _active(lp: Any, phase: int) -> bool:
    """Whether ``lp`` is in the ``phase`` net (level 0, no stages, any rank)."""
    return layer_kept(lp, caffe_pb2.NetState(phase=phase), None)


def _phases(layers: Iterable[Any]) -> list[int]:
    layers = list(layers)
    return [p for p in (TRAIN, TEST) if any(_active(lp, p) for lp in layers)]


def _only_phase(rule: Any) -> bool:
    return [f.name for f, _ in rule.ListFields()] in ([], ["phase"])


def _restrict_phase(lp: Any, phase: int) -> None:
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


def _on_rank(lp: Any, rank: int) -> None:
    """Add ``mpi_rank: rank`` to each include rule of ``lp`` (phase-only exclude rules become
    include rules of the other phase first)."""
    if len(lp.exclude):
        if not all(_only_phase(r) for r in lp.exclude):
            raise EnsembleError(f"--ranks: {errors.layer_where(lp)} uses exclude rules beyond "
                                "the phase; write them as include rules to place it on a rank")
        phases = _phases([lp])
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


# -- the net ------------------------------------------------------------------------------------
def _the_loss(layers: Sequence[Any]) -> Any:
    losses = [lp for lp in layers if lp.type == "SoftmaxWithLoss"]
    if len(losses) != 1:
        found = "no SoftmaxWithLoss layer" if not losses else \
            f"{len(losses)} SoftmaxWithLoss layers ({', '.join(lp.name for lp in losses)})"
        raise EnsembleError(f"--model: the base net has {found}; it needs exactly one, whose "
                            "bottoms name the score blob and the label")
    loss = losses[0]
    if len(loss.bottom) != 2:
        raise EnsembleError(f"--model: {errors.layer_where(loss)} needs two bottoms (score, "
                            f"label), got {len(loss.bottom)}")
    return loss


def _split_index(layers: Sequence[Any], dropped: set[int], split: str | None) -> int:
    if split is None:
        return -1
    names = [lp.name for i, lp in enumerate(layers) if i not in dropped]
    for i, lp in enumerate(layers):
        if lp.name == split:
            if i in dropped:
                raise EnsembleError(f'--split "{split}": that is the loss/accuracy layer the '
                                    "ensemble replaces; split at a layer up to the score layer")
            return i
    raise EnsembleError(f'--split "{split}": the base net has no layer of that name'
                        + errors.did_you_mean(split, names))


def _bag(shared_src: Sequence[Any], m_count: int,
         data_maps: list[dict[str, str]]) -> tuple[list[Any], list[list[Any]]]:
    """Every TRAIN Data layer copied per member (bootstrap member i, tops ``<top>_m<i>``).

    Returns the shared layers (the TEST data kept) and each member's data copies.
    """
    shared: list[Any] = []
    copies: list[list[Any]] = [[] for _ in range(m_count)]
    for lp in shared_src:
        if lp.type != "Data" or not _active(lp, TRAIN):
            shared.append(_copy(lp))
            continue
        for m in range(m_count):
            c = _copy(lp)
            c.name = f"{lp.name}_m{m}"
            _restrict_phase(c, TRAIN)
            for j, t in enumerate(lp.top):
                c.top[j] = data_maps[m][t] = f"{t}_m{m}"
            c.bootstrap_param.enable = True
            c.bootstrap_param.member = m
            copies[m].append(c)
        if _active(lp, TEST):
            c = _copy(lp)
            _restrict_phase(c, TEST)
            shared.append(c)
    if not data_maps[0]:
        raise EnsembleError("--bagging: the base net has no TRAIN-phase Data layer to draw "
                            "bootstrap samples from")
    return shared, copies


def _fan_out(tops: Iterable[str], members: list[list[Any]], head: list[Any],
             spec: EnsembleSpec) -> list[Any]:
    """TEST phase with bagging: Splits hand the shared test blob ``t`` to the ``t_m<i>`` that
    TEST layers read (one Split per rank, fed by an MPIBroadcast of ``t`` when placed)."""
    out = []
    for t in tops:
        wanted: dict[int, list[str]] = {}  # rank -> the t_m<i> read there, in member order
        for m in range(spec.members):
            name = f"{t}_m{m}"
            for r, layers in ((spec.rank_of(m), members[m]), (0, head)):
                if any(_active(lp, TEST) and name in lp.bottom for lp in layers) and \
                        name not in wanted.get(r, []):
                    wanted.setdefault(r, []).append(name)
        src = t
        if set(wanted) - {0}:
            src = f"{t}_b"
            out.append(_comm_layer(f"{t}_broadcast", "MPIBroadcast", t, [src],
                                   [0, *sorted(r for r in wanted if r)], [TEST]))
        for r, names in sorted(wanted.items()):
            split = caffe_pb2.LayerParameter(
                name=f"{t}_to_members" + (f"_rank{r}" if spec.ranks > 1 else ""), type="Split",
                bottom=[src], top=names)
            split.include.add(phase=TEST)
            if spec.ranks > 1:
                _on_rank(split, r)
            out.append(split)
    return out


def _member(src: Sequence[Any], m: int, spec: EnsembleSpec, data_map: dict[str, str],
            trunk_params: set[str]) -> tuple[list[Any], dict[str, str]]:
    """Member ``m``'s copies of ``src``; returns them and base blob -> member blob."""
    produced: dict[str, str] = {}
    out = []
    for lp in src:
        c = _copy(lp)
        c.name = f"{lp.name}_m{m}"
        for j, b in enumerate(lp.bottom):
            c.bottom[j] = produced.get(b, data_map.get(b, b))
        for j, t in enumerate(lp.top):
            c.top[j] = produced[t] = f"{t}_m{m}"
        for p in c.param:
            if p.name and p.name not in trunk_params:
                p.name = f"{p.name}_m{m}"
        if spec.same_init and lp.type not in _OWN_RNG:
            c.seed_key = lp.seed_key or lp.name
        elif lp.seed_key:
            c.seed_key = f"{lp.seed_key}_m{m}"
        out.append(c)
    return out, produced


def _like(loss: Any, name: str, kind: str, bottoms: Sequence[str], tops: Sequence[str]) -> Any:
    """A new layer with the base loss's phase rules."""
    lp = caffe_pb2.LayerParameter(name=name, type=kind, bottom=list(bottoms), top=list(tops))
    lp.include.extend(loss.include)
    lp.exclude.extend(loss.exclude)
    return lp


def _mean(loss: Any, name: str, bottoms: Sequence[str], top: str) -> list[Any]:
    """Eltwise SUM with coeff 1/M (nothing for M = 1: Eltwise takes two bottoms or more)."""
    if len(bottoms) == 1:
        return []
    lp = _like(loss, name, "Eltwise", bottoms, [top])
    lp.eltwise_param.operation = caffe_pb2.EltwiseParameter.SUM
    lp.eltwise_param.coeff.extend([1.0 / len(bottoms)] * len(bottoms))
    return [lp]


def _composed(loss: Any, scores: Sequence[str], label: str, loss_name: str) -> list[Any]:
    """The averaged losses from stock layers (module docstring)."""
    score, n = loss.bottom[0], len(scores)
    if loss_name == "score-avg":
        mean = f"{score}_mean" if n > 1 else scores[0]
        lp = _copy(loss)
        lp.bottom[:] = [mean, label]
        return [*_mean(loss, f"{score}_average", scores, mean), lp]
    p = loss.loss_param
    if p.HasField("ignore_label") or p.normalization == p.NONE:
        raise EnsembleError("--composed --loss prob-avg: MultinomialLogisticLoss reads no "
                            "loss_param, so the base loss's ignore_label/normalization cannot "
                            "be kept; use the fused layer")
    out = []
    for m, s in enumerate(scores):
        out.append(_like(loss, f"{score}_softmax_m{m}", "Softmax", [s], [f"{score}_prob_m{m}"]))
        if loss.HasField("softmax_param"):
            out[-1].softmax_param.CopyFrom(loss.softmax_param)
    probs = [lp.top[0] for lp in out]
    mean = f"{score}_prob_mean" if n > 1 else probs[0]
    out += _mean(loss, f"{score}_prob_average", probs, mean)
    lp = _like(loss, loss.name, "MultinomialLogisticLoss", [mean, label], loss.top[:1])
    lp.loss_weight.extend(loss.loss_weight[:1])
    return [*out, lp]


def _loss_layers(loss: Any, scores: Sequence[str], labels: Sequence[str],
                 spec: EnsembleSpec) -> list[Any]:
    """The ensemble's loss layers, with the base loss's rules, loss_param and loss_weight."""
    if spec.loss == "independent":
        out = []
        for m, (s, lab) in enumerate(zip(scores, labels)):
            lp = _copy(loss)
            lp.name = f"{loss.name}_m{m}"
            lp.bottom[:] = [s, lab]
            lp.top[:] = [f"{t}_m{m}" for t in loss.top]
            out.append(lp)
        return out
    if spec.loss in AVERAGED_LOSSES and not spec.fused:
        return _composed(loss, scores, labels[0], spec.loss)
    top = loss.top[0] if len(loss.top) else "loss"
    kind = {"mcl": "MultipleChoiceLoss", "score-avg": "ScoreAverageLoss",
            "prob-avg": "ProbabilityAverageLoss"}[spec.loss]
    tops = [top, f"{top}_member", f"{top}_assigned"] if spec.loss == "mcl" else [top]
    lp = _like(loss, loss.name, kind, [*scores, labels[0]], tops)
    if loss.HasField("loss_param"):
        lp.loss_param.CopyFrom(loss.loss_param)
    if len(loss.loss_weight):
        lp.loss_weight.extend([loss.loss_weight[0]] + [0.0] * (len(tops) - 1))
    if spec.loss == "mcl":
        p = lp.multiple_choice_loss_param
        p.k, p.ce_weight = spec.k, spec.ce_weight
        p.normalization = caffe_pb2.MultipleChoiceLossParameter.Normalization.Value(
            spec.normalization)
    return [lp]


def _accuracy_layer(scores: Sequence[str], label: str, accuracy: Any) -> Any:
    lp = caffe_pb2.LayerParameter(name=ACCURACY_LAYER, type="EnsembleAccuracy",
                                  bottom=[*scores, label], top=list(ACCURACY_TOPS))
    lp.include.add(phase=TEST)
    if accuracy is not None and accuracy.accuracy_param.HasField("ignore_label"):
        lp.accuracy_param.ignore_label = accuracy.accuracy_param.ignore_label
    return lp


def _place(shared: list[Any], fan_out: list[Any], members: list[list[Any]],
           copies: list[list[Any]], head: list[Any], score: str,
           spec: EnsembleSpec) -> list[Any]:
    """The layers placed over ``spec.ranks`` ranks, comm layers added (module docstring).

    With bagging, member i's data copies live on its rank; the labels they read go to rank 0
    (where the losses are) through per-slot MPIGathers, as the scores do.
    """
    r_count = spec.ranks
    for lp in shared + head:
        _on_rank(lp, 0)
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
        phases = _phases(lp for lps in by_rank.values() for lp in lps)
        bcasts.append(_comm_layer(f"{blob}_broadcast", "MPIBroadcast", blob, [f"{blob}_b"],
                                  group, phases))
        _rename_blobs(member_layers, blob, f"{blob}_b", bottoms_only=True)
    head_reads = {b for lp in head for b in lp.bottom}
    gathered = [score] + [_MEMBER_SUFFIX.sub("", t) for lp in copies[0] for t in lp.top
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
            phases = _phases(lp for layers in own for lp in layers
                             if f"{blob}_slot{j}" in lp.top)
            gathers.append(_comm_layer(f"{blob}_gather_slot{j}", "MPIGather",
                                       f"{blob}_slot{j}", [f"{blob}_m{m}" for m in slot],
                                       [spec.rank_of(m) for m in slot], phases))
    for m in range(spec.members):
        for lp in copies[m] + members[m]:
            _on_rank(lp, spec.rank_of(m))
    return shared + fan_out + bcasts + member_layers + gathers + head


def _sections(layers: Sequence[Any], spec: EnsembleSpec) -> tuple[Any, Any, list, list]:
    """(base loss, the dropped Accuracy or None, shared layers, layers copied per member)."""
    loss = _the_loss(layers)
    score = loss.bottom[0]
    dropped = {i for i, lp in enumerate(layers) if lp is loss
               or (lp.type == "Accuracy" and len(lp.bottom) and lp.bottom[0] == score)}
    accuracy = next((lp for i, lp in enumerate(layers) if i in dropped and lp is not loss), None)
    split_at = _split_index(layers, dropped, spec.split)
    if spec.ranks > 1:
        for lp in layers:
            if lp.type in COMM_TYPES or any(len(r.mpi_rank) for r in (*lp.include,
                                                                      *lp.exclude)):
                raise EnsembleError(f"--ranks {spec.ranks}: {errors.layer_where(lp)} already "
                                    "places the base net on MPI ranks; give a one-process base")
    keep = [(i, lp) for i, lp in enumerate(layers) if i not in dropped]
    shared = [lp for i, lp in keep if i <= split_at or not len(lp.bottom)]
    member = [lp for i, lp in keep if i > split_at and len(lp.bottom)]
    if not any(score in lp.top for lp in member):  # the score comes from the trunk
        shared, member = shared + member, []
    if spec.ranks > 1 and not member:
        raise EnsembleError(f'--ranks {spec.ranks}: with --split "{spec.split}" nothing is '
                            "replicated per member (one model), so there is nothing to place "
                            "on other ranks")
    return loss, accuracy, shared, member


def _check_unique_names(layers: Sequence[Any]) -> None:
    for phase in (TRAIN, TEST):
        names = [lp.name for lp in layers if _active(lp, phase)]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise EnsembleError(f'--model: the ensemble would have two layers named "{dup}"; '
                                "rename that layer of the base net")


def make_ensemble_net(base: Any, spec: EnsembleSpec) -> Any:
    """The ensemble of ``spec.members`` copies of the single-model net ``base``.

    Args:
        base: a ``NetParameter`` with one SoftmaxWithLoss (bottoms: score blob, label).
        spec: the ensemble to make (see the module docstring).

    Returns:
        A new ``NetParameter``; ``base`` is not changed.

    Raises:
        EnsembleError: for options that do not fit the net (unknown split layer, no
            SoftmaxWithLoss, bad loss name, k > M, ranks > M, ...), naming the option.
    """
    spec.check()
    net = caffe_pb2.NetParameter()
    net.CopyFrom(base)
    if len(net.layers):
        raise EnsembleError("--model: legacy V1 'layers' blocks are not supported; write "
                            "'layer' blocks")
    upgrade_input_fields(net)
    loss, accuracy, shared_src, member_src = _sections(list(net.layer), spec)
    score, label = loss.bottom[0], loss.bottom[1]
    data_maps: list[dict[str, str]] = [{} for _ in range(spec.members)]
    copies: list[list[Any]] = [[] for _ in range(spec.members)]
    if spec.bagging:
        shared, copies = _bag(shared_src, spec.members, data_maps)
    else:
        shared = [_copy(lp) for lp in shared_src]
    trunk_params = {p.name for lp in shared for p in lp.param if p.name}
    members, scores, labels = [], [], []
    for m in range(spec.members):
        layers_m, produced = _member(member_src, m, spec, data_maps[m], trunk_params)
        members.append(layers_m)
        scores.append(produced.get(score, data_maps[m].get(score, score)))
        labels.append(data_maps[m].get(label, label))
    head = [*_loss_layers(loss, scores, labels, spec), _accuracy_layer(scores, label, accuracy)]
    fan_out = _fan_out(data_maps[0], members, head, spec) if spec.bagging else []
    if spec.ranks > 1:
        out_layers = _place(shared, fan_out, members, copies, head, score, spec)
    else:
        out_layers = [*shared, *(lp for c in copies for lp in c), *fan_out,
                      *(lp for layers_m in members for lp in layers_m), *head]
    _check_unique_names(out_layers)
    del net.layer[:]
    net.layer.extend(out_layers)
    return net


# -- the solver ---------------------------------------------------------------------------------
def make_ensemble_solver(base: Any, net_path: str, spec: EnsembleSpec,
                         lr_scale: float | None = None) -> Any:
    """The base solver training the ensemble net at ``net_path``.

    Every train/test net field is replaced by ``net: net_path`` (test_iter etc. are kept) and
    ``base_lr`` is multiplied by ``lr_scale``: None means M for score-avg and prob-avg (the
    paper raised the learning rate by ×M: averaging divides each member's gradient by M), 1
    otherwise.
    """
    if lr_scale is None:
        lr_scale = float(spec.members) if spec.loss in AVERAGED_LOSSES else 1.0
    if not lr_scale > 0:
        raise EnsembleError(f"--lr_scale {lr_scale:g}: must be > 0")
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(base)
    for field in ("net", "net_param", "train_net", "train_net_param"):
        out.ClearField(field)
    del out.test_net[:]
    del out.test_net_param[:]
    out.net = net_path
    out.base_lr = base.base_lr * lr_scale
    return out


# -- parameter counts ---------------------------------------------------------------------------
def _learnable(param: Any, sizes: dict[str, list[int]]) -> int:
    """Learnable values of the TRAIN net ``param`` (every rank's layers); a layer's parameter
    sizes are ``sizes[name]`` or those of the base layer it copies (``name`` less ``_m<i>``);
    blobs shared by ``param { name }`` count once."""
    flat, _ = filter_net(param, caffe_pb2.NetState(phase=TRAIN), None)
    total, seen = 0, set()
    for lp in flat.layer:
        own = sizes.get(lp.name, sizes.get(_MEMBER_SUFFIX.sub("", lp.name), []))
        for j, n in enumerate(own):
            name = lp.param[j].name if j < len(lp.param) else ""
            if name and name in seen:
                continue
            seen.add(name)
            total += n
    return total


def param_counts(base: Any, ensemble: Any) -> tuple[int, int]:
    """(learnable parameters of ``ensemble``, of M independent copies of ``base``).

    The base net is built (TRAIN phase, so its data sources must exist) for the sizes of its
    layers' parameters; the ensemble's layers are copies of those (``x`` or ``x_m<i>``) or
    parameter-free layers the generator adds, and blobs shared by ``param { name }`` count once.
    """
    acc = [lp for lp in ensemble.layer if lp.type == "EnsembleAccuracy"]
    if not acc:
        raise EnsembleError("not an ensemble net: it has no EnsembleAccuracy layer")
    m_count = len(acc[0].bottom) - 1
    param = caffe_pb2.NetParameter()
    param.CopyFrom(base)
    upgrade_input_fields(param)
    net = Net(param, TRAIN, seed=0)
    try:
        sizes = {name: [b.count for b in blobs] for name, blobs in net.params.items()}
        single = sum(b.count for b in net.learnable_params)
    finally:
        net.close()
    return _learnable(ensemble, sizes), m_count * single


def parameters_line(base: Any, ensemble: Any) -> str:
    """``parameters: <ensemble> (<M> independent models: <n>, <ratio>x)``."""
    ens, indep = param_counts(base, ensemble)
    m_count = len(next(lp for lp in ensemble.layer if lp.type == "EnsembleAccuracy").bottom) - 1
    ratio = ens / indep if indep else float("nan")
    return f"parameters: {ens} ({m_count} independent models: {indep}, {ratio:.2f}x)"


# -- files --------------------------------------------------------------------------------------
def _write(path: str, header: str, message: Any) -> None:
    io.atomic_write(path, (header + text_format.MessageToString(message)).encode())


def write_ensemble(model: str, solver: str | None, out_dir: str, spec: EnsembleSpec,
                   name: str = "train_test",
                   lr_scale: float | None = None) -> tuple[str, str | None]:
    """Write ``out_dir/<name>.prototxt`` (and ``out_dir/solver.prototxt`` from ``solver``).

    The solver's ``net`` is the written net's path as given (Caffe resolves it against the
    working directory) and its ``snapshot_prefix`` is ``out_dir/<name of out_dir>`` (e.g.
    ``models/cifar10_mcl/cifar10_mcl``). Returns the paths written (solver path None without
    ``solver``).
    """
    base, _ = prototxt.read_net(model)
    try:
        net = make_ensemble_net(base, spec)
    except EnsembleError as e:
        msg = str(e)
        raise EnsembleError(f"--model {model}:{msg[8:]}" if msg.startswith("--model:")
                            else msg) from None
    header = (f"# An ensemble of {model}, made by `pycaffe-mpi ensemble`:\n"
              f"# {spec.describe()}\n")
    net_path = os.path.join(out_dir, f"{name}.prototxt")
    solver_path, param = None, None
    if solver:  # everything is checked before anything is written
        base_solver = prototxt.read_solver(solver)
        param = make_ensemble_solver(base_solver, net_path, spec, lr_scale)
        stem = os.path.basename(os.path.normpath(os.path.abspath(out_dir))) or "ensemble"
        param.snapshot_prefix = os.path.join(out_dir, stem)
        solver_path = os.path.join(out_dir, "solver.prototxt")
    os.makedirs(out_dir, exist_ok=True)
    _write(net_path, header, net)
    if solver_path:
        _write(solver_path, f"# {solver}, set to train {net_path}.\n" + header, param)
    return net_path, solver_path
