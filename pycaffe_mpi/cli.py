"""``pycaffe-mpi``: Caffe's command-line tool (``caffe train|test|time|device_query``).

Flags keep Caffe's names and defaults; ``--flag value``, ``--flag=value`` and gflags' single-dash
``-flag value`` all work. A mistake in a prototxt or a flag prints one ``error:`` line and exits 1,
never a traceback.

Under ``mpiexec -n N`` every rank runs this same command on its own part of the net (the
``mpi_rank`` rules and the MPIBroadcast/MPIGather layers of the prototxt). ``--solver``,
``--model``, ``--weights``, ``--snapshot`` and ``--gpu`` then take one value for every rank or a
comma-separated list with one value per rank; a single ``--snapshot`` naming ``..._rank_<R>...``
is read by each rank with its own rank put in. An error on any rank prints ``[rank r/n] error:
...`` and ends the whole job at once (MPI Abort), so ``mpiexec`` exits non-zero.

Environment: see ``ENVIRONMENT`` below (also printed by ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import errors
from pycaffe_mpi import log as log_mod
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger("pycaffe_mpi")

COMMANDS = ("train", "test", "time", "device_query", "ensemble")
_EFFECTS = ("stop", "snapshot", "none")

ENVIRONMENT = """\
environment:
  Under an MPI launcher (mpiexec), unless you set them yourself:
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS = cores / ranks on the node
    MPIR_CVAR_ENABLE_HEAVY_YIELD=1   (MPICH: waiting ranks yield the CPU instead of spinning)
  Otherwise pycaffe-mpi reads no environment variables of its own.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pycaffe-mpi",
        description="Caffe-compatible training and testing. Commands: train (train or finetune "
                    "a model), test (score a model), time (benchmark a model's execution time), "
                    "device_query (show device information), ensemble (write an ensemble or "
                    "TreeNet of a single model's net and solver). Also: pycaffe-mpi "
                    "upgrade-net IN OUT and pycaffe-mpi upgrade-solver IN OUT (old formats to "
                    "the current one; see their --help).",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=COMMANDS, help="what to do")
    p.add_argument("--solver", default="", help="the solver prototxt (train)")
    p.add_argument("--model", default="", help="the net prototxt (test, time)")
    p.add_argument("--phase", default="", help="TRAIN or TEST: the net phase for `time` "
                   "(default TRAIN) and `test` (default TEST)")
    p.add_argument("--level", type=int, default=0, help="the NetState level")
    p.add_argument("--stage", default="", help="comma-separated NetState stages")
    p.add_argument("--snapshot", default="", help="a .solverstate to resume training from")
    p.add_argument("--weights", default="", help="comma-separated .caffemodel files to finetune "
                   "from (train) or to test; exclusive with --snapshot")
    p.add_argument("--gpu", default="", help="a GPU id to run on (overrides solver_mode); "
                   "empty means the CPU unless the solver says GPU")
    p.add_argument("--iterations", type=int, default=50, help="batches for test and time")
    p.add_argument("--same_seed", action="store_true",
                   help="train under MPI: seed every rank with the solver's random_seed "
                   "(default: random_seed + rank, so replicated branches start different); "
                   "bagging from the same initial weights needs it")
    p.add_argument("--sigint_effect", default="stop", choices=_EFFECTS,
                   help="what Ctrl-C does while training (default stop)")
    p.add_argument("--sighup_effect", default="snapshot", choices=_EFFECTS,
                   help="what SIGHUP does while training (default snapshot)")
    p.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    e = p.add_argument_group("ensemble", "pycaffe-mpi ensemble --model NET [--solver S] "
                             "--output_dir DIR: writes DIR/train_test.prototxt (and "
                             "DIR/solver.prototxt) for an ensemble of the single model NET")
    e.add_argument("--members", type=int, default=4, help="ensemble members M (default 4)")
    e.add_argument("--split", default="", help="members share every layer up to and including "
                   "this one (a TreeNet); default: independent members")
    e.add_argument("--loss", default="independent",
                   help="independent, score-avg, prob-avg or mcl (default independent)")
    e.add_argument("--k", type=int, default=1, help="mcl: members each example is assigned to")
    e.add_argument("--ce_weight", type=float, default=0.0,
                   help="mcl: weight of plain cross-entropy over all members (default 0)")
    e.add_argument("--normalization", default="BATCH", help="mcl: BATCH or ASSIGNED")
    e.add_argument("--composed", action="store_true", help="averaged losses from stock Caffe "
                   "layers instead of one fused layer")
    e.add_argument("--ranks", type=int, default=1, help="place the members over this many MPI "
                   "ranks (member i on rank i %% ranks; default 1)")
    e.add_argument("--bagging", action="store_true",
                   help="each member trains on its own bootstrap sample of the TRAIN data")
    e.add_argument("--same_init", action="store_true",
                   help="members start from identical weights")
    e.add_argument("--lr_scale", type=float, default=None, help="multiplies the solver's "
                   "base_lr (default: M for score-avg/prob-avg, else 1)")
    e.add_argument("--output_dir", default="", help="where the ensemble files are written")
    return p


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """gflags accepts ``-solver x``; argparse wants ``--solver x``."""
    names = {a.dest for a in build_parser()._actions if a.option_strings}
    out = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--"):
            key = a[1:].split("=", 1)[0]
            if key in names:
                a = "-" + a
        out.append(a)
    return out


def _phase(name: str, default: int) -> int:
    if not name:
        return default
    if name.upper() not in ("TRAIN", "TEST"):
        raise errors.PycaffeError(f'--phase must be TRAIN or TEST, got "{name}"')
    return TRAIN if name.upper() == "TRAIN" else TEST


def choose_backend(gpu_flag: str, solver_param: Any = None) -> backend_mod.Backend:
    """--gpu wins; else the solver's solver_mode/device_id; GPU in a file on a CPU-only machine
    falls back to the CPU with a warning (so unchanged BVLC solvers run here)."""
    if gpu_flag:
        ids = gpu_flag.split(",")
        if gpu_flag == "all" or len(ids) > 1:
            raise errors.PycaffeError("one process drives one GPU: give a single --gpu id (use "
                                      "mpiexec with one id per rank for more)")
        try:
            dev = int(ids[0])
        except ValueError:
            raise errors.PycaffeError(f'--gpu expects a device id, got "{gpu_flag}"') from None
        return backend_mod.Backend("gpu", dev)
    if solver_param is not None and solver_param.solver_mode == caffe_pb2.SolverParameter.GPU:
        if backend_mod.gpu_available():
            return backend_mod.Backend("gpu", solver_param.device_id)
        log.warning("solver_mode is GPU but no usable GPU/CuPy was found; running on the CPU")
    return backend_mod.CPU


def per_rank(flag: str, value: str, rank: int, size: int, split_single: bool = True) -> str:
    """MPI-Caffe's rule: one value for all ranks, or one comma-separated value per rank."""
    if size <= 1 or not value:
        return value
    parts = value.split(",")
    if len(parts) == size:
        return parts[rank]
    if len(parts) == 1 or not split_single:
        return value
    raise errors.PycaffeError(f"--{flag}: give either one value for all {size} MPI ranks or "
                              f"one per rank ({size} comma-separated), got {len(parts)}")


def _own_snapshot(path: str, rank: int, size: int) -> str:
    """A single snapshot path naming some rank's file is read with this rank's number."""
    if size <= 1:
        return path
    return re.sub(r"_rank_\d+(?=\.solverstate)", f"_rank_{rank}", path)


def _install_signal_actions(solver: Any, sigint: str, sighup: str) -> None:
    pending: list[str] = []

    def handler(effect: str) -> Any:
        def on_signal(signum: int, frame: Any) -> None:
            pending.append(effect)
        return on_signal

    signal.signal(signal.SIGINT, handler(sigint))
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler(sighup))

    def action() -> str:
        return pending.pop(0) if pending else "none"

    comm = getattr(solver, "comm", None)
    if comm is not None and comm.size > 1:
        # every rank stops (or snapshots) at the same iteration, as rank 0 decides, or the
        # collectives of the next iteration would wait forever
        local = action

        def action() -> str:
            return comm.bcast_obj(local(), 0)

    solver.set_action_function(action)


def cmd_train(args: argparse.Namespace, comm: Any) -> int:
    from pycaffe_mpi import solvers

    rank, size = comm.rank, comm.size
    args.solver = per_rank("solver", args.solver, rank, size)
    args.weights = per_rank("weights", args.weights, rank, size, split_single=False)
    args.snapshot = _own_snapshot(per_rank("snapshot", args.snapshot, rank, size), rank, size)
    args.gpu = per_rank("gpu", args.gpu, rank, size)
    if not args.solver:
        raise errors.PycaffeError("train needs --solver (a solver prototxt)")
    if args.snapshot and args.weights:
        raise errors.PycaffeError("give a snapshot to resume training or weights to finetune, "
                                  "but not both")
    param = solvers.read_solver_param(args.solver)
    stages = [s for s in args.stage.split(",") if s]
    if stages or args.level:
        param.train_state.level = args.level
        param.train_state.stage.extend(stages)
    backend = choose_backend(args.gpu, param)
    log.info("Using %s", f"GPU {backend.device_id}" if backend.is_gpu else "CPU")
    solver = solvers.Solver(param, backend=backend, comm=comm,
                            same_seed_all_ranks=args.same_seed)
    _install_signal_actions(solver, args.sigint_effect, args.sighup_effect)
    if args.weights:
        for w in args.weights.split(","):
            log.info("Finetuning from %s", w)
            solver.net.copy_trained_layers_from(w)
            for tn in solver.test_nets:
                tn.copy_trained_layers_from(w)
    log.info("Starting Optimization")
    try:
        solver.solve(args.snapshot or None)
    finally:
        solver.close()
    return 0


def cmd_test(args: argparse.Namespace, comm: Any) -> int:
    from pycaffe_mpi.net import Net

    args.model = per_rank("model", args.model, comm.rank, comm.size)
    args.weights = per_rank("weights", args.weights, comm.rank, comm.size, split_single=False)
    args.gpu = per_rank("gpu", args.gpu, comm.rank, comm.size)
    if not args.model:
        raise errors.PycaffeError("test needs --model (a net prototxt)")
    if not args.weights:
        log.warning("no --weights given: testing a net with its initial weights")
    backend = choose_backend(args.gpu)
    stages = [s for s in args.stage.split(",") if s]
    net = Net(args.model, _phase(args.phase, TEST), weights=args.weights or None,
              level=args.level, stages=stages, backend=backend, comm=comm)
    log.info("Running for %d iterations.", args.iterations)
    sums: list[float] = []
    names: list[tuple[str, int]] = []
    total_loss = 0.0
    try:
        net.begin_test_pass()
        for i in range(args.iterations):
            loss = net.forward_loss()
            total_loss += loss
            k = 0
            for name in net.output_blob_names:
                vals = np.asarray(backend.to_host(net.blobs[name].data), np.float64).ravel()
                for j, v in enumerate(vals):
                    if i == 0:
                        sums.append(0.0)
                        names.append((name, j))
                    sums[k] += float(v)
                    log.info("Batch %d, %s = %g", i, name, v)
                    k += 1
        prefix = os.path.splitext(args.weights)[0] if args.weights else "test"
        for path in net.end_test_pass(prefix):
            log.info("Wrote %s", path)
    finally:
        net.close()
    log.info("Loss: %g", total_loss / max(args.iterations, 1))
    for (name, _), s in zip(names, sums):
        mean = s / max(args.iterations, 1)
        w = net.blob_loss_weights.get(name, 0.0)
        extra = f" (* {w:g} = {w * mean:g} loss)" if w else ""
        log.info("%s = %g%s", name, mean, extra)
    return 0


def cmd_time(args: argparse.Namespace, comm: Any) -> int:
    from pycaffe_mpi.net import Net

    args.model = per_rank("model", args.model, comm.rank, comm.size)
    args.gpu = per_rank("gpu", args.gpu, comm.rank, comm.size)
    if not args.model:
        raise errors.PycaffeError("time needs --model (a net prototxt)")
    backend = choose_backend(args.gpu)
    stages = [s for s in args.stage.split(",") if s]
    net = Net(args.model, _phase(args.phase, TRAIN), level=args.level, stages=stages,
              backend=backend, comm=comm)
    sync = backend.synchronize
    try:
        log.info("Performing Forward")
        loss = net.forward_loss()
        log.info("Initial loss: %g", loss)
        log.info("Performing Backward")
        net.backward_all()
        n = len(net.layers)
        fwd_t = np.zeros(n)
        bwd_t = np.zeros(n)
        fwd_total = bwd_total = 0.0
        t_all = time.perf_counter()
        for it in range(args.iterations):
            t_iter = time.perf_counter()
            t0 = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                net.forward_from_to(i, i)
                sync()
                fwd_t[i] += time.perf_counter() - t
            fwd_total += time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(n - 1, -1, -1):
                t = time.perf_counter()
                net.backward_from_to(i, i)
                sync()
                bwd_t[i] += time.perf_counter() - t
            bwd_total += time.perf_counter() - t0
            log.info("Iteration: %d forward-backward time: %.3f ms.", it + 1,
                     (time.perf_counter() - t_iter) * 1e3)
        total = time.perf_counter() - t_all
    finally:
        net.close()
    iters = max(args.iterations, 1)
    log.info("Average time per layer: ")
    for i, name in enumerate(net.layer_names):
        log.info("%10s\tforward: %.5g ms.", name, fwd_t[i] * 1e3 / iters)
        log.info("%10s\tbackward: %.5g ms.", name, bwd_t[i] * 1e3 / iters)
    log.info("Average Forward pass: %.5g ms.", fwd_total * 1e3 / iters)
    log.info("Average Backward pass: %.5g ms.", bwd_total * 1e3 / iters)
    log.info("Average Forward-Backward: %.5g ms.", total * 1e3 / iters)
    log.info("Total Time: %.5g ms.", total * 1e3)
    log.info("*** Benchmark ends ***")
    return 0


def cmd_device_query(args: argparse.Namespace, comm: Any) -> int:
    log.info("CPU: NumPy %s", np.__version__)
    n = backend_mod.gpu_count()
    if not n:
        log.info("No CUDA device available (install the 'gpu' extra and a driver to use one).")
        if args.gpu:
            raise errors.PycaffeError(f"--gpu {args.gpu}: no CUDA device available")
        return 0
    ids = range(n) if not args.gpu or args.gpu == "all" else [int(g) for g in args.gpu.split(",")]
    for d in ids:
        log.info("Querying GPU %d", d)
        for k, v in backend_mod.device_properties(d).items():
            log.info("%s: %s", k, v)
    return 0


def cmd_ensemble(args: argparse.Namespace, comm: Any) -> int:
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
    if spec.ranks > 1 and solver_path:
        same = " --same_seed" if spec.same_init else ""
        print(f"train with: mpiexec -n {spec.ranks} pycaffe-mpi train --solver {solver_path}"
              f"{same}")
    return 0


def _say(line: str) -> None:
    """One line to stderr in one write, so mpiexec never splits it from its newline."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_DISPATCH = {"train": cmd_train, "test": cmd_test, "time": cmd_time,
             "device_query": cmd_device_query, "ensemble": cmd_ensemble}


# -- upgrade-net / upgrade-solver (Caffe's upgrade_net_proto_text|binary, upgrade_solver_proto_text)
UPGRADE_COMMANDS = {
    "upgrade-net": "Upgrade a net from an old format (V0 or V1 'layers', net-level input "
                   "fields, old data transformation fields, old BatchNorm params) to the "
                   "current one. A text prototxt gives a text prototxt; a binary NetParameter "
                   "(.caffemodel, judged by content) gives a binary one.",
    "upgrade-solver": "Upgrade a solver prototxt's deprecated solver_type enum to the type "
                      "string.",
}


def build_upgrade_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"pycaffe-mpi {command}",
                                description=UPGRADE_COMMANDS[command],
                                epilog="Exit status: 0 when upgraded without problems (or "
                                       "already current), 1 when parts could not be upgraded "
                                       "(the file is written anyway), 2 when IN cannot be read.")
    p.add_argument("input", metavar="IN", help="the file to upgrade")
    p.add_argument("output", metavar="OUT", help="where the upgraded file is written")
    p.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


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
        log.error("Failed to parse input %s file as %s: %s (%s)",
                  "binary" if binary else "text", what, src, e)
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


def _main_upgrade(argv: Sequence[str]) -> int:
    args = build_upgrade_parser(argv[0]).parse_args(argv[1:])
    level = getattr(logging, args.log_level.upper(), None)
    if not isinstance(level, int):
        print(f'error: --log_level "{args.log_level}" is not a level', file=sys.stderr)
        return 2
    log_mod.setup(0, 1, level=level)
    try:
        return cmd_upgrade(argv[0], args)
    except errors.PycaffeError as e:
        _say(f"error: {e}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pycaffe-mpi`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in UPGRADE_COMMANDS:
        return _main_upgrade(argv)
    argv = normalise_argv(argv)
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper(), None)
    if not isinstance(level, int):
        print(f'error: --log_level "{args.log_level}" is not a level', file=sys.stderr)
        return 2
    from pycaffe_mpi import comm as comm_mod

    comm = comm_mod.world()
    log_mod.setup(comm.rank, comm.size, level=level)
    comm_mod.abort_on_uncaught_exceptions(comm)
    if comm.size > 1:
        log.info("MPI: %d processes; this is rank %d", comm.size, comm.rank)
    tag = f"[rank {comm.rank}/{comm.size}] " if comm.size > 1 else ""
    try:
        return _DISPATCH[args.command](args, comm)
    except errors.PycaffeError as e:
        _say(f"{tag}error: {e}")
        if comm.size > 1:  # the other ranks may be waiting in a collective: end the job
            comm.abort(1)
        return 1
    except KeyboardInterrupt:
        _say(f"{tag}error: interrupted")
        if comm.size > 1:
            comm.abort(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
