"""The ensemble net: a trunk shared by all members, member copies, and the ensemble's loss head.

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
- **Placement over R MPI ranks** (``spec.ranks`` > 1): see :mod:`pycaffe_mpi.ensemble.placement`.

Limits: the base has exactly one SoftmaxWithLoss; to place over ranks it must not use
``mpi_rank`` rules or comm layers itself, and exclude rules only on the phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors, upgrade
from pycaffe_mpi.comm import plan as comm_plan
from pycaffe_mpi.ensemble import placement
from pycaffe_mpi.ensemble.spec import AVERAGED_LOSSES, EnsembleError, EnsembleSpec
from pycaffe_mpi.proto import caffe_pb2

#: the EnsembleAccuracy tops, in the layer's order
ACCURACY_TOPS = ("ensemble_accuracy", "score_mean_accuracy", "oracle_accuracy",
                 "oracle_accuracy_authors", "member_accuracy")
ACCURACY_LAYER = "ensemble_accuracy"
# NOTE: Dropout draws its masks from its generator: a shared seed_key would give every member
# the same masks, which same_init (same starting weights) does not ask for.
_OWN_RNG = ("Dropout",)


def _copy(lp: Any) -> Any:
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(lp)
    return out


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
        if lp.type != "Data" or not placement.active(lp, caffe_pb2.TRAIN):
            shared.append(_copy(lp))
            continue
        for m in range(m_count):
            c = _copy(lp)
            c.name = f"{lp.name}_m{m}"
            placement.restrict_phase(c, caffe_pb2.TRAIN)
            for j, t in enumerate(lp.top):
                c.top[j] = data_maps[m][t] = f"{t}_m{m}"
            c.bootstrap_param.enable = True
            c.bootstrap_param.member = m
            copies[m].append(c)
        if placement.active(lp, caffe_pb2.TEST):
            c = _copy(lp)
            placement.restrict_phase(c, caffe_pb2.TEST)
            shared.append(c)
    if not data_maps[0]:
        raise EnsembleError("--bagging: the base net has no TRAIN-phase Data layer to draw "
                            "bootstrap samples from")
    return shared, copies


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
    # per-member vectors, logged as member_<top>_<i> and member_assigned_<i>
    tops = [top, f"member_{top}", "member_assigned"] if spec.loss == "mcl" else [top]
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
    lp.include.add(phase=caffe_pb2.TEST)
    if accuracy is not None and accuracy.accuracy_param.HasField("ignore_label"):
        lp.accuracy_param.ignore_label = accuracy.accuracy_param.ignore_label
    return lp


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
            if lp.type in comm_plan.COMM_TYPES or any(len(r.mpi_rank) for r in (*lp.include,
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
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        names = [lp.name for lp in layers if placement.active(lp, phase)]
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
    upgrade.upgrade_net_input(net)
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
    fan_out = placement.fan_out(data_maps[0], members, head, spec) if spec.bagging else []
    if spec.ranks > 1:
        out_layers = placement.place(shared, fan_out, members, copies, head, score, spec)
    else:
        out_layers = [*shared, *(lp for c in copies for lp in c), *fan_out,
                      *(lp for layers_m in members for lp in layers_m), *head]
    _check_unique_names(out_layers)
    del net.layer[:]
    net.layer.extend(out_layers)
    return net

