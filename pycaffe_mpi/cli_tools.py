"""The ``pycaffe-mpi`` commands that work on files rather than run a net: ``ensemble`` and
``upgrade-net`` / ``upgrade-solver`` (Caffe's ``upgrade_net_proto_text|binary`` and
``upgrade_solver_proto_text``). ``parse-log``, ``plot`` and ``draw`` live in
:mod:`pycaffe_mpi.reports`. None of them starts MPI.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pycaffe_mpi import errors

log = logging.getLogger("pycaffe_mpi")


def configure_ensemble(p: argparse.ArgumentParser) -> None:
    """``ensemble``'s flags."""
    p.add_argument("--model", default="", help="the single model's train/test net prototxt")
    p.add_argument("--solver", default="", help="its solver prototxt (optional)")
    p.add_argument("--output_dir", default="", help="where the ensemble files are written")
    p.add_argument("--members", type=int, default=4, help="ensemble members M (default 4)")
    p.add_argument("--split", default="", help="members share every layer up to and including "
                   "this one (a TreeNet); default: independent members")
    p.add_argument("--loss", default="independent",
                   help="independent, score-avg, prob-avg or mcl (default independent)")
    p.add_argument("--k", type=int, default=1, help="mcl: members each example is assigned to")
    p.add_argument("--ce_weight", type=float, default=0.0,
                   help="mcl: weight of plain cross-entropy over all members (default 0)")
    p.add_argument("--normalization", default="BATCH", help="mcl: BATCH or ASSIGNED")
    p.add_argument("--composed", action="store_true", help="averaged losses from stock Caffe "
                   "layers instead of one fused layer")
    p.add_argument("--ranks", type=int, default=1, help="place the members over this many MPI "
                   "ranks (member i on rank i %% ranks; default 1)")
    p.add_argument("--replicas", type=int, default=1,
                   help="train R data-parallel replicas of the placed ensemble (ranks x R MPI "
                        "ranks; the printed command says so); each reads 1/R of every batch "
                        "stream, so batch_size / R keeps the effective batch (default 1)")
    p.add_argument("--bagging", action="store_true",
                   help="each member trains on its own bootstrap sample of the TRAIN data")
    p.add_argument("--same_init", action="store_true",
                   help="members start from identical weights")
    p.add_argument("--lr_scale", type=float, default=None, help="multiplies the solver's "
                   "base_lr (default: M for score-avg/prob-avg, else 1)")


def configure_upgrade(p: argparse.ArgumentParser) -> None:
    """``upgrade-net``'s and ``upgrade-solver``'s arguments."""
    p.add_argument("input", metavar="IN", help="the file to upgrade")
    p.add_argument("output", metavar="OUT", help="where the upgraded file is written")


def cmd_ensemble(args: argparse.Namespace) -> int:
    """``pycaffe-mpi ensemble``: write the files, count parameters, print the train command."""
    from pycaffe_mpi import ensemble, prototxt

    if not args.model or not args.output_dir:
        raise errors.PycaffeError("ensemble needs --model (the single model's train/test net) "
                                  "and --output_dir")
    spec = ensemble.EnsembleSpec(
        members=args.members, split=args.split or None, loss=args.loss, k=args.k,
        ce_weight=args.ce_weight, normalization=args.normalization.upper(),
        fused=not args.composed, ranks=args.ranks, bagging=args.bagging,
        same_init=args.same_init)
    net_path, solver_path = ensemble.write_ensemble(args.model, args.solver or None,
                                                    args.output_dir, spec,
                                                    lr_scale=args.lr_scale)
    for path in (net_path, solver_path):
        if path:
            print(f"wrote {path}")
    try:
        print(ensemble.parameters_line(prototxt.read_net(args.model)[0],
                                       prototxt.read_net(net_path)[0]))
    except errors.DataError as e:  # the base net is built for its shapes
        print(f"parameters: not counted ({e})")
    if solver_path:
        print(f"train with: "
              f"{train_command(solver_path, spec.ranks, spec.same_init, args.replicas)}")
    return 0


def _shown_path(path: Path) -> str:
    """``path`` as typed from the current directory: relative below it, else absolute."""
    rel = os.path.relpath(path)
    if rel.startswith(os.pardir):
        return str(path)
    return rel if os.sep in rel else os.path.join(os.curdir, rel)


def _program(name: str) -> str | None:
    """How to call the program ``name`` installed beside the running Python: its bare name when
    PATH finds that same file (an activated venv), else its path; None when it is not there."""
    beside = Path(sys.executable).parent / name
    if not (beside.is_file() and os.access(beside, os.X_OK)):
        return None
    found = shutil.which(name)
    if found and os.path.samefile(found, beside):
        return name
    return _shown_path(beside)


def train_command(solver_path: str, ranks: int = 1, same_seed: bool = False,
                  replicas: int = 1) -> str:
    """The shell command that trains ``solver_path``, written to run as printed from the
    current directory: ``mpiexec -n R pycaffe-mpi train --solver S`` when both programs are
    on PATH, else with the paths of the ones installed beside this Python (a venv's bin); the
    ``mpiexec`` of mpi4py's MPI is preferred over another one on PATH. With ``replicas`` R
    the job has R x ranks ranks and ``--replicas R``."""
    prog = _program("pycaffe-mpi")
    cmd = [prog] if prog else [_shown_path(Path(sys.executable)), "-m", "pycaffe_mpi.cli"]
    cmd += ["train", "--solver", solver_path]
    if ranks * replicas > 1:
        cmd = [_program("mpiexec") or "mpiexec", "-n", str(ranks * replicas), *cmd]
    if same_seed:
        cmd.append("--same_seed")
    if replicas > 1:
        cmd += ["--replicas", str(replicas)]
    return shlex.join(cmd)



def _is_binary_file(path: str) -> bool:
    """A binary protobuf, judged by content: text prototxt is UTF-8 without NUL bytes."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # not just a character cut at the end of the chunk
    return False


def cmd_upgrade(command: str, args: argparse.Namespace) -> int:
    """``pycaffe-mpi upgrade-net|upgrade-solver IN OUT``; the exit status as Caffe's tools."""
    from google.protobuf import text_format

    from pycaffe_mpi import prototxt, upgrade
    from pycaffe_mpi import snapshot as io
    from pycaffe_mpi.proto import caffe_pb2

    src, dst = args.input, args.output
    is_net = command == "upgrade-net"
    what = "NetParameter" if is_net else "SolverParameter"
    binary = is_net and os.path.isfile(src) and _is_binary_file(src)
    message = caffe_pb2.NetParameter() if is_net else caffe_pb2.SolverParameter()
    try:
        if binary:
            io.read_proto_binary(src, message)
        else:
            prototxt.parse_text(prototxt.read_text(src), message, src)
    except errors.PycaffeError as e:
        reason = e
        if binary:
            # NOTE: a prototxt with a stray non-UTF-8 byte looks binary: its text error (the
            # byte's line and column) is the one the user needs
            try:
                prototxt.parse_text(prototxt.read_text(src), message, src)
            except errors.PycaffeError as text_error:
                reason = errors.PycaffeError(f"{e}; read as text: {text_error}")
            else:
                binary, reason = False, None
        if reason is not None:
            log.error("Failed to parse input %s file as %s: %s (%s)",
                      "binary" if binary else "text", what, src, reason)
            return 2
    if is_net:
        needed = upgrade.net_needs_upgrade(message)
        success = upgrade.upgrade_net_as_needed(src, message)[0] if needed else True
    else:
        needed = upgrade.solver_needs_type_upgrade(message)
        success = upgrade.upgrade_solver_as_needed(src, message) if needed else True
    if not needed:
        log.error("File already in latest proto format: %s", src)
    elif not success:
        log.error("Encountered error(s) while upgrading prototxt; see details above.")
    if binary:
        io.write_proto_binary(dst, message)
    else:
        io.atomic_write(dst, text_format.MessageToString(message).encode())
    log.info("Wrote upgraded %s %s proto to %s", what, "binary" if binary else "text", dst)
    return 0 if success else 1


def upgrade_handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The ``handler`` of ``upgrade-net`` or ``upgrade-solver``."""
    return lambda args: cmd_upgrade(command, args)
