"""What ``pycaffe-mpi ensemble`` writes and reports: the solver, the net files, parameter counts."""

from __future__ import annotations

import os
from typing import Any

from google.protobuf import text_format

from pycaffe_mpi import netparam, prototxt, upgrade
from pycaffe_mpi import snapshot as io
from pycaffe_mpi.ensemble import build
from pycaffe_mpi.ensemble.spec import AVERAGED_LOSSES, MEMBER_SUFFIX, EnsembleError, EnsembleSpec
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2


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
    flat, _ = netparam.filter_net(param, caffe_pb2.NetState(phase=caffe_pb2.TRAIN), None)
    total, seen = 0, set()
    for lp in flat.layer:
        own = sizes.get(lp.name, sizes.get(MEMBER_SUFFIX.sub("", lp.name), []))
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
    upgrade.upgrade_net_input(param)
    net = Net(param, caffe_pb2.TRAIN, seed=0)
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
        net = build.make_ensemble_net(base, spec)
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
