"""``pycaffe-mpi``: Caffe's command-line tool (``caffe train|test|time|device_query``) and the
project's own commands, one argparse subcommand each (``pycaffe-mpi COMMAND --help``).

Caffe's commands keep Caffe's flag names and defaults; ``--flag value``, ``--flag=value`` and
gflags' single-dash ``-flag value`` all work, and, as with gflags, flags may also come before the
command (``pycaffe-mpi -gpu 0 train -solver s.prototxt``). gflags lets every command take every
Caffe flag: a Caffe flag that a command does not use is accepted with a warning and ignored. A
mistake in a prototxt or a flag prints one ``error:`` line and exits 1, never a traceback;
``pycaffe-mpi`` alone prints the list of commands.

Under ``mpiexec -n N`` every rank runs this same command on its own part of the net (the
``mpi_rank`` rules and the MPIBroadcast/MPIGather layers of the prototxt). ``--solver``,
``--model``, ``--weights``, ``--snapshot`` and ``--gpu`` then take one value for every rank or a
comma-separated list with one value per rank; a single ``--snapshot`` naming ``..._rank_<R>...``
is read by each rank with its own rank put in. An error on any rank prints ``[rank r/n] error:
...`` and ends the whole job at once (MPI Abort), so ``mpiexec`` exits non-zero.

Environment: see ``cli_flags.ENVIRONMENT`` (also printed by ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import pycaffe_mpi
from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi import cli_flags, errors
from pycaffe_mpi import log as log_mod
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger("pycaffe_mpi")

# Caffe's commands (run under MPI) first, then the file tools (pycaffe_mpi.cli_tools and
# pycaffe_mpi.reports: single process).
COMMANDS = ("train", "test", "time", "device_query", "ensemble", "upgrade-net",
            "upgrade-solver", "parse-log", "plot", "draw", "assignment")
MPI_COMMANDS = ("train", "test", "time", "device_query")

# kept for callers of the old name: the description of the upgrade commands
UPGRADE_COMMANDS = {c: cli_flags.DESCRIPTIONS[c] for c in ("upgrade-net", "upgrade-solver")}


def _add_timeout_flag(p: argparse.ArgumentParser) -> None:
    """``--collective_timeout``: every command whose net may hold comm layers takes it."""
    p.add_argument("--collective_timeout", type=float, default=0.0, metavar="SECONDS",
                   help="under MPI: end the job when a rank waits longer than SECONDS in one "
                        "collective, naming the rank that never arrived (default 0: off)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``train`` beyond Caffe's."""
    p.add_argument("--same_seed", action="store_true",
                   help="under MPI: seed every rank with the solver's random_seed (default: "
                        "random_seed + rank, so replicated branches start different); bagging "
                        "from the same initial weights needs it")
    p.add_argument("--nonfinite", default="stop", choices=("stop", "continue"),
                   help="when the loss becomes NaN or Inf: stop, naming the iteration and the "
                        "first non-finite layer (default), or continue as Caffe does")
    p.add_argument("--share_diffs", default="true", choices=("true", "false"),
                   help="keep the training net's blob gradients in buffers shared by blobs "
                        "whose gradients are never alive at once (default true; false: one "
                        "diff per blob, as Caffe, e.g. to read intermediate gradients)")
    _add_timeout_flag(p)
    p.add_argument("--replicas", type=int, default=None, metavar="R",
                   help="data parallelism: the MPI ranks run R replicas of the net (each on "
                        "ranks / R ranks: world rank = replica x ranks/R + model rank; the "
                        "net's mpi_rank rules name model ranks), each reading its share of "
                        "the data, gradients averaged before every update. Effective batch: "
                        "R x batch_size. Default: the solver's replicas field, else 1; a "
                        "--gpu list of one id per replica (Caffe's mpiexec -n 4 ... --gpu "
                        "0,1,2,3) implies it")
    p.add_argument("--bucket_mb", type=float, default=None, metavar="MB",
                   help="with --replicas: gradient Allreduce bucket size (default: a quarter "
                        "of the gradients, between 64 KB and 4 MB)")


def build_parser() -> argparse.ArgumentParser:
    """The ``pycaffe-mpi`` parser: one subparser per command in :data:`COMMANDS`.

    Each subparser's defaults carry ``handler`` (called ``handler(args, comm)`` for
    :data:`MPI_COMMANDS`, ``handler(args)`` otherwise).
    """
    from pycaffe_mpi import cli_tools
    from pycaffe_mpi.reports import assignment, draw, parse_log, plot

    p = argparse.ArgumentParser(
        prog="pycaffe-mpi",
        description="Caffe-compatible training and testing, with MPI model parallelism and "
                    "ensembles. Run `pycaffe-mpi COMMAND --help` for a command's flags. Caffe's "
                    "commands take Caffe's flags, also spelt as gflags does (-solver s.prototxt, "
                    "-gpu=0, flags before the command).",
        epilog=cli_flags.ENVIRONMENT, formatter_class=cli_flags.HelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"pycaffe-mpi {pycaffe_mpi.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)

    def command(name: str, handler: Callable[..., int], epilog: str | None = None
                ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=cli_flags.SUMMARIES[name],
                           description=cli_flags.DESCRIPTIONS[name], epilog=epilog,
                           formatter_class=cli_flags.HelpFormatter)
        c.set_defaults(handler=handler, unused_flags=())
        return c

    for name in cli_flags.CAFFE_USES:
        c = command(name, _DISPATCH[name], cli_flags.ENVIRONMENT)
        cli_flags.add_caffe_flags(c, name)
        if name == "train":
            _add_train_flags(c)
        elif name in ("test", "time"):
            _add_timeout_flag(c)
    cli_tools.configure_ensemble(command("ensemble", cli_tools.cmd_ensemble))
    upgrade_epilog = ("Exit status: 0 when upgraded without problems (or already current), 1 "
                      "when parts could not be upgraded (the file is written anyway), 2 when IN "
                      "cannot be read.")
    for name in UPGRADE_COMMANDS:
        cli_tools.configure_upgrade(command(name, cli_tools.upgrade_handler(name),
                                            upgrade_epilog))
    for module in (parse_log, plot, draw, assignment):
        module.add_parser(sub).set_defaults(unused_flags=())
    for c in sub.choices.values():
        cli_flags.add_log_level(c)
    return p


def normalise_argv(argv: Sequence[str],
                   parser: argparse.ArgumentParser | None = None) -> list[str]:
    """gflags' spellings in argparse's (:func:`pycaffe_mpi.cli_flags.gflags_argv`)."""
    return cli_flags.gflags_argv(argv, parser or build_parser())


def _warn_unused(args: argparse.Namespace) -> None:
    for name in args.unused_flags:
        if hasattr(args, name):
            log.warning("--%s is not used by %s; ignored (Caffe ignores it too)", name,
                        args.command)


def _phase(name: str, default: int) -> int:
    if not name:
        return default
    if name.upper() not in ("TRAIN", "TEST"):
        raise errors.PycaffeError(f'--phase must be TRAIN or TEST, got "{name}"')
    return TRAIN if name.upper() == "TRAIN" else TEST


def choose_backend(gpu_flag: str, solver_param: Any = None) -> backend_mod.Backend:
    """--gpu wins; else the solver's solver_mode/device_id; GPU in a file on a CPU-only machine
    falls back to the CPU with a warning (so unchanged BVLC solvers run here)."""
    if gpu_flag == "all":  # each rank takes a GPU of its node by its local rank
        from pycaffe_mpi import comm as comm_mod
        from pycaffe_mpi.comm import device as device_mod

        n = backend_mod.gpu_count()
        if n == 0:
            raise errors.PycaffeError("--gpu all: no CUDA device available")
        return backend_mod.Backend("gpu", device_mod.device_for_local_rank(
            comm_mod.world().local_rank(), n))
    if gpu_flag:
        ids = gpu_flag.split(",")
        if len(ids) > 1:
            raise errors.PycaffeError(
                "one process drives one GPU: give a single --gpu id (use mpiexec with one id "
                f"per rank for more; Caffe's multi-GPU training is `mpiexec -n {len(ids)} "
                f"pycaffe-mpi train --solver SOLVER --gpu {gpu_flag}`)")
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
    if getattr(solver, "dp", None) is not None:  # replicas: every rank of the world agrees
        comm = solver.dp.groups.world
    if comm is not None and comm.size > 1:
        # every rank stops (or snapshots) at the same iteration, or the collectives of the next
        # iteration would wait forever; a signal sent to any one rank counts (a stop before a
        # snapshot), not only rank 0's
        local = action

        def action() -> str:
            asked = set(comm.allgather_obj(local()))
            return next((a for a in ("stop", "snapshot") if a in asked), "none")

    solver.set_action_function(action)


def _replicas_and_gpu(flag: int | None, param: Any, gpu: str, rank: int,
                      size: int) -> tuple[int, str]:
    """The replica count and this rank's ``--gpu`` value. The count is ``--replicas`` (it wins
    over the solver's ``replicas`` field), else the field, else what a ``--gpu`` list says:
    Caffe's ``--gpu 0,1,2,3`` is one device per replica
    (:func:`~pycaffe_mpi.comm.replicas.gpu_devices`); one id per rank is MPI-Caffe's rule."""
    from pycaffe_mpi.comm import replicas as replicas_mod
    from pycaffe_mpi.solvers import data_parallel

    given = None
    if flag is not None or param.replicas:
        given = data_parallel.resolve_replicas(flag, param.replicas, log)
    ids = [] if gpu == "all" else [g for g in gpu.split(",") if g.strip()]
    if len(ids) <= 1:
        return given or 1, per_rank("gpu", gpu, rank, size)
    try:
        numbers = [int(g) for g in ids]
    except ValueError:
        raise errors.PycaffeError(f'--gpu expects device ids, got "{gpu}"') from None
    source = "--replicas" if flag is not None else "the solver's replicas field"
    model = data_parallel.model_ranks(param) if given is None else 1
    count, devices = replicas_mod.gpu_devices(size, numbers, given, model, source)
    return count, str(devices[rank])


def cmd_train(args: argparse.Namespace, comm: Any) -> int:
    from pycaffe_mpi import solvers

    rank, size = comm.rank, comm.size
    args.solver = per_rank("solver", args.solver, rank, size)
    args.weights = per_rank("weights", args.weights, rank, size, split_single=False)
    if not args.solver:
        raise errors.PycaffeError("train needs --solver (a solver prototxt)")
    param = solvers.read_solver_param(args.solver)
    replicas, args.gpu = _replicas_and_gpu(args.replicas, param, args.gpu, rank, size)
    if replicas != 1 or param.replicas:
        param.replicas = replicas  # what every rank's Solver checks its peers run
    # with replicas a snapshot is named by the model rank (rank mod ranks per replica)
    per_replica = size // replicas if replicas >= 1 and size % replicas == 0 else size
    args.snapshot = _own_snapshot(per_rank("snapshot", args.snapshot, rank, size),
                                  rank % per_replica, per_replica)
    if args.snapshot and args.weights:
        raise errors.PycaffeError("give a snapshot to resume training or weights to finetune, "
                                  "but not both")
    stages = [s for s in args.stage.split(",") if s]
    if stages or args.level:
        param.train_state.level = args.level
        param.train_state.stage.extend(stages)
    backend = choose_backend(args.gpu, param)
    log.info("Using %s", f"GPU {backend.device_id}" if backend.is_gpu else "CPU")
    from pycaffe_mpi import comm as comm_mod

    comm_mod.set_collective_timeout(comm, args.collective_timeout)
    solver = solvers.Solver(param, backend=backend, comm=comm,
                            same_seed_all_ranks=args.same_seed, nonfinite=args.nonfinite,
                            source_path=args.solver, replicas=replicas,
                            bucket_mb=args.bucket_mb,
                            share_diffs=args.share_diffs == "true")
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


@contextlib.contextmanager
def _mpiexec_hint(command: str, model: str) -> Iterator[None]:
    """A net that needs mpiexec, started without it: the hint shows this very command."""
    from pycaffe_mpi.comm import plan

    try:
        yield
    except plan.NeedsMoreRanks as e:
        raise plan.NeedsMoreRanks(str(e).replace(
            "train --solver SOLVER` (or test/time --model NET)",
            f"{command} --model {shlex.quote(model)}`"), e.ranks) from None


def cmd_test(args: argparse.Namespace, comm: Any) -> int:
    from pycaffe_mpi import comm as comm_mod
    from pycaffe_mpi.net import Net

    args.model = per_rank("model", args.model, comm.rank, comm.size)
    args.weights = per_rank("weights", args.weights, comm.rank, comm.size, split_single=False)
    args.gpu = per_rank("gpu", args.gpu, comm.rank, comm.size)
    if not args.model:
        raise errors.PycaffeError("test needs --model (a net prototxt)")
    if not args.weights:
        # NOTE: as caffe test, nothing is written then: the reports (oracle assignment) that
        # go beside the weights file are only logged
        log.warning("no --weights given: testing a net with its initial weights (reports are "
                    "logged, not written)")
    backend = choose_backend(args.gpu)
    stages = [s for s in args.stage.split(",") if s]
    comm_mod.set_collective_timeout(comm, args.collective_timeout)
    with _mpiexec_hint("test", args.model):
        net = Net(args.model, _phase(args.phase, TEST), weights=args.weights or None,
                  level=args.level, stages=stages, backend=backend, comm=comm)
    log.info("Running for %d iterations.", args.iterations)
    from pycaffe_mpi.reports.results import element_names
    from pycaffe_mpi.solvers import testing

    def log_batch(i: int, loss: float, values: list[tuple[str, Any]]) -> None:
        for name, vals in values:
            for label, v in zip(element_names(name, len(vals)), vals):
                log.info("Batch %d, %s = %g", i, label, v)

    try:
        net.begin_test_pass()
        scores = testing.average_outputs(net, args.iterations, after_batch=log_batch)
        prefix = os.path.splitext(args.weights)[0] if args.weights else None
        # a snapshot's name carries its iteration (<prefix>_iter_<N>[_rank_<R>].caffemodel)
        found = re.search(r"_iter_(\d+)", os.path.basename(prefix or ""))
        for path in net.end_test_pass(prefix, int(found.group(1)) if found else None):
            log.info("Wrote %s", path)
    finally:
        net.close()
    assert scores is not None  # no before_batch: never interrupted
    log.info("Loss: %g", scores.loss if args.iterations > 0 else 0.0)
    for name, means in scores.outputs:
        w = net.blob_loss_weights.get(name, 0.0)
        for label, mean in zip(element_names(name, len(means)), means):
            extra = f" (* {w:g} = {w * mean:g} loss)" if w else ""
            log.info("%s = %g%s", label, mean, extra)
    return 0


def cmd_time(args: argparse.Namespace, comm: Any) -> int:
    from pycaffe_mpi import comm as comm_mod
    from pycaffe_mpi.net import Net

    args.model = per_rank("model", args.model, comm.rank, comm.size)
    args.gpu = per_rank("gpu", args.gpu, comm.rank, comm.size)
    if not args.model:
        raise errors.PycaffeError("time needs --model (a net prototxt)")
    backend = choose_backend(args.gpu)
    stages = [s for s in args.stage.split(",") if s]
    comm_mod.set_collective_timeout(comm, args.collective_timeout)
    with _mpiexec_hint("time", args.model):
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


def _say(line: str) -> None:
    """One line to stderr in one write, so mpiexec never splits it from its newline."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_DISPATCH: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "train": cmd_train, "test": cmd_test, "time": cmd_time,
    "device_query": cmd_device_query}


def _run_mpi_command(args: argparse.Namespace, level: int) -> int:
    from pycaffe_mpi import comm as comm_mod

    comm = comm_mod.world()
    log_mod.setup(comm.rank, comm.size, level=level)
    comm_mod.abort_on_uncaught_exceptions(comm)
    if comm.size > 1:
        log.info("MPI: %d processes; this is rank %d", comm.size, comm.rank)
    _warn_unused(args)
    tag = f"[rank {comm.rank}/{comm.size}] " if comm.size > 1 else ""
    try:
        return args.handler(args, comm)
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
    except SystemExit as e:
        if comm.size <= 1:
            raise
        # NOTE: sys.exit (a signal handler, a user hook) on one rank would leave the others
        # waiting in a collective forever, and exit 0 would even report success: end the job
        code = e.code if isinstance(e.code, int) and e.code else 1
        _say(f"{tag}error: sys.exit({e.code!r}) was called during {args.command}; one MPI rank "
             "cannot leave alone, so the job ends")
        comm.abort(code)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pycaffe-mpi`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(normalise_argv(argv, parser))
    level = getattr(logging, args.log_level.upper(), None)
    if not isinstance(level, int):
        print(f'error: --log_level "{args.log_level}" is not a level', file=sys.stderr)
        return 2
    if args.command in MPI_COMMANDS:
        return _run_mpi_command(args, level)
    # the file tools never start MPI: they run anywhere, also beside a job
    log_mod.setup(0, 1, level=level)
    try:
        return args.handler(args)
    except errors.PycaffeError as e:
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _say("error: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
