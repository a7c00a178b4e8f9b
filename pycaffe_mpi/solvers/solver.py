"""The Solver: Caffe's train loop with testing, display, snapshots and resume.

``Solver(param_or_path)`` builds the train net and the test nets from a ``SolverParameter``
(Caffe's ``Solver::InitTrainNet`` / ``InitTestNets``) and picks the update rule from ``type``.
:meth:`Solver.solve` runs ``max_iter`` iterations of :meth:`Solver.step`, each one Caffe's
``Solver::Step`` body:

1. clear the parameter diffs;
2. test every test net when ``test_interval`` divides ``iter`` (at iteration 0 only if
   ``test_initialization``);
3. ``iter_size`` forward/backward passes, their losses averaged; the displayed loss is the mean
   of the last ``average_loss`` of those;
4. every ``display`` iterations log ``Iteration N (X iter/s, Ys/D iters), loss = L``, then
   ``    Train net output #k: name = v``, then (from the update) ``Iteration N, lr = R``;
5. apply the update (:mod:`pycaffe_mpi.solvers.rules`), ``iter += 1``;
6. snapshot when ``snapshot`` divides ``iter`` or the action function asks; stop if it asks.

The log lines keep Caffe's wording so ``tools/extra/parse_log.py`` reads our logs; the same
numbers go, one JSON line per display and per test pass, to ``<snapshot_prefix>_results.jsonl``
(:mod:`pycaffe_mpi.reports.results`). Unlike Caffe, a NaN or Inf loss stops the run by default
(:mod:`pycaffe_mpi.solvers.nonfinite`), and under MPI the ranks first agree on the fields that
decide the sequence of collectives (:mod:`pycaffe_mpi.solvers.agreement`).

The nets are built by :mod:`pycaffe_mpi.solvers.nets`; the outputs, the results file and the
test pass are :mod:`pycaffe_mpi.solvers.reporting`'s. Snapshots
(:mod:`pycaffe_mpi.solvers.snapshots`) are ``<snapshot_prefix>_iter_<N>.caffemodel`` and
``.solverstate`` (with several MPI ranks: ``<prefix>_iter_<N>_rank_<R>.*``), written so a
resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf import text_format

from pycaffe_mpi import errors, prototxt, upgrade
from pycaffe_mpi.comm import plan
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.reports.results import ResultsWriter
from pycaffe_mpi.solvers import agreement, data_parallel, lr_policy, rules
from pycaffe_mpi.solvers import nonfinite as nonfinite_mod
from pycaffe_mpi.solvers.nets import NetsMixin
from pycaffe_mpi.solvers.reporting import ReportingMixin, fmt
from pycaffe_mpi.solvers.snapshots import SnapshotMixin

LOGGER = logging.getLogger("pycaffe_mpi")

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST

# Solver actions (Caffe's SolverAction), asked of the action function after every iteration.
NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
_ACTIONS = (NONE, STOP, SNAPSHOT)


# -- solver files ----------------------------------------------------------------------------
def read_solver_param(path: str, log: logging.Logger = LOGGER) -> Any:
    """Read a solver prototxt as Caffe's ``ReadSolverParamsFromTextFileOrDie`` does.

    Besides parsing, it upgrades the deprecated ``solver_type`` enum to ``type``, and (Caffe
    HEAD's ``UpgradeSnapshotPrefixProperty``) fills in ``snapshot_prefix``: when absent it is the
    solver file's path without extension; when it names an existing directory the solver file's
    stem is appended (``snapshots/`` + ``solver.prototxt`` → ``snapshots/solver``).
    """
    param = prototxt.read_solver(path)
    upgrade.upgrade_solver_as_needed(path, param, log)
    upgrade.upgrade_snapshot_prefix(path, param, log)
    return param


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class _Callback:
    def __init__(self, on_start: Callable[[], Any] | None,
                 on_gradients_ready: Callable[[], Any] | None) -> None:
        self.on_start = on_start
        self.on_gradients_ready = on_gradients_ready


def _naming_solver_file(init: Callable[..., None]) -> Callable[..., None]:
    """Put the solver file (and the line of the field at fault) in front of the
    SolverErrors that ``init`` (or ``solve``) raises, and of a net file it names that cannot be
    read: those checks see the parsed message, not the file."""
    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except (errors.SolverError, errors.PrototxtError) as e:
            # NOTE: exact types: subclasses (a non-finite loss) are not the file's mistakes,
            # and a mistake inside a net file names that file already
            unreadable = type(e) is errors.PrototxtError and str(e).startswith("cannot read")
            if unreadable or type(e) is errors.SolverError:
                raise prototxt.located(e, getattr(self, "source_path", None)) \
                    from (e.__cause__ or None)
            raise
        except (errors.DataError, errors.SnapshotError) as e:
            # a file the solver names (weights) that is missing or damaged, when the message
            # gives no place of its own
            if not re.search(r"\S:\d+", str(e)):
                raise prototxt.located(e, getattr(self, "source_path", None)) \
                    from (e.__cause__ or None)
            raise

    return wrapper


# -- the solver ------------------------------------------------------------------------------
class Solver(NetsMixin, ReportingMixin, SnapshotMixin):
    """Trains a net from a ``SolverParameter`` (or a solver prototxt path).

    Args:
        param_or_path: a ``SolverParameter`` (copied) or the path of a solver prototxt.
        rank, size: this process's MPI rank and the world size. The rank filters ``mpi_rank``
            rules, offsets the seed, and (when ``size > 1``) tags snapshot names ``_rank_<R>``.
        same_seed_all_ranks: seed every rank with ``random_seed`` itself (bagging from the same
            initial weights) instead of ``random_seed + rank``.
        seed_offset: an explicit offset added to ``random_seed`` (overrides the two above).
        backend: where arrays live (default: the CPU); dtype: float32 (default) or float64.
        ctx: run-time context handed to the nets' layers.
        comm: the world communicator (:mod:`pycaffe_mpi.comm`); gives ``rank`` and ``size``
            and carries the nets' MPIBroadcast/MPIGather layers. With several ranks they first
            agree on the solver fields that decide the sequence of collectives
            (:mod:`pycaffe_mpi.solvers.agreement`).
        nonfinite: "stop" (default: a NaN/Inf loss stops the run, naming the iteration and the
            first non-finite layer, :mod:`pycaffe_mpi.solvers.nonfinite`) or "continue"
            (Caffe's behaviour).
        share_diffs: keep the training net's blob gradients in buffers shared by blobs whose
            gradients are never alive at the same time (default; :mod:`pycaffe_mpi.diff_sharing`:
            after a step, an intermediate blob's diff holds another blob's gradient); False
            gives every blob a diff of its own, as Caffe.
        results: the results file (one JSON line per display and test pass,
            :mod:`pycaffe_mpi.reports.results`; every output by name, plus ``smoothed_loss``
            (the displayed loss) and, with test_compute_loss, ``test_loss``): None (default) writes
            ``<snapshot_prefix>_results.jsonl`` on rank 0 when there is a snapshot_prefix (and
            ``<snapshot_prefix>_rank_<R>_results.jsonl`` on a rank R whose net has outputs of
            its own); False writes none; a path writes there (on every rank that is given one).
        source_path: the file a ``SolverParameter`` was read from (named in messages).
        replicas: data-parallel replicas (:mod:`pycaffe_mpi.solvers.data_parallel`): the world
            of ``comm`` runs this many copies of the net, each on world_size / replicas ranks,
            averaging gradients before every update (default: the solver's ``replicas`` field,
            else 1: none; given and different from the field, this wins). bucket_mb: the size of
            their gradient buckets (default: a quarter of the gradients, 64 KB to 4 MB).
        log: the logger (default ``logging.getLogger("pycaffe_mpi")``).

    Attributes:
        net: the train net; test_nets: the test nets; iter: updates done so far;
        param: the ``SolverParameter`` (``base_lr``, ``max_iter``, ``display``… may be changed
        between calls); rule: the update rule (its ``history`` arrays); current_step: the lr
        policy's step counter; smoothed_loss: the last displayed (smoothed) loss;
        mean_scores: per test net, the mean of each output element at the last test.
    """

    #: subclasses (``SGDSolver``…) force the update rule, as pycaffe's classes do
    forced_type: str | None = None

    @_naming_solver_file
    def __init__(
        self,
        param_or_path: Any,
        *,
        rank: int = 0,
        size: int = 1,
        same_seed_all_ranks: bool = False,
        seed_offset: int | None = None,
        backend: Any = None,
        dtype: Any = np.float32,
        ctx: Any = None,
        comm: Any = None,
        log: logging.Logger | None = None,
        nonfinite: str = "stop",
        results: str | os.PathLike | bool | None = None,
        source_path: str | None = None,
        replicas: int | None = None,
        bucket_mb: float | None = None,
        share_diffs: bool = True,
    ) -> None:
        from pycaffe_mpi.pycaffe import settings

        self.log = log or LOGGER
        if isinstance(param_or_path, (str, os.PathLike)):
            self.source_path: str | None = os.fspath(param_or_path)
            param = read_solver_param(self.source_path, self.log)
        else:
            self.source_path = source_path
            param = caffe_pb2.SolverParameter()
            param.CopyFrom(param_or_path)
        self.param = param
        self.iter = 0
        self.current_step = 0
        self.comm = comm
        if comm is not None:
            rank, size = comm.rank, comm.size
        replicas = data_parallel.resolve_replicas(replicas, param.replicas, self.log)
        if replicas > 1 or param.replicas:
            param.replicas = replicas  # ranks agree on what they run (agreement.py)
        self.nonfinite = nonfinite_mod.check_policy(nonfinite)
        self.share_diffs = bool(share_diffs)
        # NOTE: before the replica split, whose groups ranks that disagree would wait for
        agreement.check_settings(comm, param, self.source_path, {"nonfinite": self.nonfinite})
        # with replicas the nets see this replica's model ranks; seeds differ per replica
        self.dp = data_parallel.setup(comm, replicas, bucket_mb)
        if self.dp is not None:
            world = self.dp.groups.world
            self.comm = comm = self.dp.groups.model
            rank, size = self.dp.groups.model_rank, comm.size
            if seed_offset is None:
                seed_offset = world.rank - (rank if same_seed_all_ranks else 0)
        self.rank, self.size = int(rank), int(size)
        # pycaffe's caffe.set_mode_gpu()/set_device() choose the device when none is given
        self.backend = backend if backend is not None else settings.backend()
        self.dtype = np.dtype(dtype)
        self.ctx = ctx
        self.log.info("Initializing solver from parameters: \n%s",
                      text_format.MessageToString(param))
        if param.average_loss < 1:
            raise errors.SolverError(
                f"average_loss should be >= 1, got {param.average_loss}")
        self._check_snapshot_settings()
        self._guard = nonfinite_mod.LossGuard(self.nonfinite, comm)
        self.seed: int | None = None
        # the file's random_seed wins; else caffe.set_random_seed()'s
        base_seed = param.random_seed if param.random_seed >= 0 else settings.random_seed
        if base_seed is not None:
            offset = seed_offset if seed_offset is not None else \
                (0 if same_seed_all_ranks else self.rank)
            self.seed = int(base_seed) + int(offset)
            # NOTE: user Python layers often draw from NumPy's legacy global generator.
            np.random.seed(self.seed % 2**32)  # noqa: NPY002
        if self.forced_type is not None:
            param.type = self.forced_type
            param.ClearField("solver_type")
        self.rule = rules.make_rule(param)
        self.callbacks: list[_Callback] = []
        self._action_fn: Callable[[], Any] | None = None
        self.requested_early_exit = False
        self._parsed: dict[str, Any] = {}  # net files read so far (each is read once)
        try:
            self.net = self._init_train_net()
        except plan.NeedsMoreRanks as e:
            if self.size > 1 or not self.source_path:
                raise
            raise plan.NeedsMoreRanks(str(e).replace("SOLVER", self.source_path).replace(
                " (or test/time --model NET)", ""), e.ranks) from None
        self.test_nets = self._init_test_nets()
        self.mean_scores: list[list[float]] = [[] for _ in self.test_nets]
        self._results_arg = results
        self.results: ResultsWriter | None = None
        self._t0 = time.perf_counter()
        self.log.info("Solver scaffolding done.")
        self._lr: float | None = None
        self._losses: list[float] = []
        self.smoothed_loss = 0.0
        self.rule.setup(self.net.learnable_params)
        if self.dp is not None:
            self.dp.attach(self.net, param.layer_wise_reduce)

    def _check_snapshot_settings(self) -> None:
        """Caffe's ``CheckSnapshotWritePermissions``."""
        p = self.param
        if not p.snapshot:
            return
        if not p.HasField("snapshot_prefix"):
            raise errors.SolverError(
                "In solver params, snapshot is specified but snapshot_prefix is not")
        directory = os.path.dirname(self._snapshot_filename(".tempfile")) or "."
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError:
            raise errors.SolverError(
                f"Cannot write to snapshot prefix '{p.snapshot_prefix}'.  Make sure that the "
                "directory exists and is writeable.") from None

    # -- pycaffe surface ----------------------------------------------------------------------
    @property
    def type(self) -> str:
        return self.rule.type

    @property
    def lr(self) -> float:
        """The learning rate of the last update (before any: the rate for the current iter)."""
        if self._lr is not None:
            return self._lr
        return lr_policy.learning_rate(self.param, self.iter, self.current_step, log=False)[0]

    def add_callback(self, on_start: Callable[[], Any] | None = None,
                     on_gradients_ready: Callable[[], Any] | None = None) -> None:
        """Call ``on_start()`` before each iteration's forward/backward passes and
        ``on_gradients_ready()`` after them, before the update (pycaffe's ``add_callback``)."""
        self.callbacks.append(_Callback(on_start, on_gradients_ready))

    def set_action_function(self, fn: Callable[[], Any] | None) -> None:
        """``fn()`` returns ``"none"``, ``"stop"`` or ``"snapshot"``; it is asked after every
        iteration and before every test batch (Caffe's SolverAction, used for SIGINT/SIGHUP)."""
        self._action_fn = fn

    def share_weights(self, net: Any) -> None:
        """Make ``net`` use the train net's parameters (pycaffe's ``share_weights``)."""
        net.share_trained_layers_with(self.net)

    def close(self) -> None:
        """Stop the nets' background work (data prefetch threads)."""
        for net in [self.net, *self.test_nets]:
            closer = getattr(net, "close", None)
            if callable(closer):
                closer()
        if self.results is not None:
            self.results.close()
            self.results = None

    def _requested_action(self) -> str:
        if self._action_fn is None:
            return NONE
        action = self._action_fn()
        action = NONE if action is None else str(action).lower()
        if action not in _ACTIONS:
            raise errors.SolverError(
                f'the action function returned "{action}"; expected one of {", ".join(_ACTIONS)}')
        return action

    def _test_batch_allowed(self, _: int) -> bool:
        """Before each test batch: act on the action function's requests; False stops the pass."""
        if self.dp is not None:  # only replica 0 tests: actions wait for the iteration's end
            return not self.requested_early_exit
        request = self._requested_action()
        while request != NONE:
            if request == SNAPSHOT:
                self.snapshot()
            elif request == STOP:
                self.requested_early_exit = True
            request = self._requested_action()
        return not self.requested_early_exit

    # -- training -------------------------------------------------------------------------------
    @_naming_solver_file
    def solve(self, resume_file: str | None = None) -> None:
        """Train to ``max_iter`` (Caffe's ``Solver::Solve``), optionally resuming a snapshot."""
        p = self.param
        self.log.info("Solving %s", self.net.name)
        self.log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            self.log.info("Restoring previous solver status from %s", resume_file)
            if self.dp is not None:
                self.dp.restore(self, resume_file, self.restore)
            else:
                self.restore(resume_file)
        agreement.check_iteration(self.comm, self.iter, resume_file)
        if self.dp is not None:
            self.dp.check_weights(self.net, self.iter)
        start_iter = self.iter
        try:
            self.step(p.max_iter - self.iter)
        except SystemExit as e:
            if self.size <= 1:
                raise
            # NOTE: a rank leaving alone (sys.exit in a signal handler or a callback) would
            # leave the others waiting in a collective forever; an error ends the whole job
            raise errors.SolverError(
                f"sys.exit({e.code!r}) was called during training at iteration {self.iter} "
                f"on rank {self.rank}/{self.size} (a signal handler or callback?); one MPI "
                "rank cannot leave alone, so the job ends") from e
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            self.log.info("Optimization stopped early.")
            return
        # One more forward pass to display the loss after the last update, and a last test.
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_loss()
            if self.dp is not None:  # the replicas' mean, shown by replica 0
                loss = self.dp.mean_loss(loss)
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            self.log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss),
                          extra={"all_ranks": bool(self.net.output_blob_names) and
                                 (self.dp is None or self.dp.is_root_replica)})
            self._record("train", [*self._output_values(self.net),
                                   ("smoothed_loss", self.smoothed_loss)])
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        self.log.info("Optimization Done.")

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's ``Solver::Step``)."""
        p = self.param
        if iters > 0:  # fail before any work on an unusable lr_policy
            lr_policy.learning_rate(p, self.iter, self.current_step, log=False)
        start_iter = self.iter
        stop_iter = self.iter + iters
        self._losses = []
        self.smoothed_loss = 0.0
        t_start = t_last = time.perf_counter()
        iter_last = self.iter
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and \
                    (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for cb in self.callbacks:
                if cb.on_start is not None:
                    cb.on_start()
            display = bool(p.display) and self.iter % p.display == 0
            self.net.debug_info = display and p.debug_info
            iter_size = max(1, p.iter_size)
            loss = 0.0
            for i in range(iter_size):
                if self.dp is not None and i == iter_size - 1:
                    pass_loss = self.dp.forward_backward(self.net)  # overlaps the Allreduce
                else:
                    pass_loss = self.net.forward_backward()
                self._guard.check(self.net, pass_loss, self.iter)
                loss += pass_loss
            loss /= iter_size
            if self.dp is not None:  # diffs and loss: the replicas' mean
                loss = self.dp.finish(loss)
            self._update_smoothed_loss(loss, start_iter, p.average_loss)
            if display:
                now = time.perf_counter()
                lapse = now - t_last
                per_s = (self.iter - iter_last) / (lapse or 1.0)
                self.log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter,
                              fmt(per_s), fmt(lapse), p.display, fmt(self.smoothed_loss))
                t_last, iter_last = now, self.iter
                values = self._output_values(self.net)
                self._log_outputs(self.net, "Train", values)
                self._record("train", [*values, ("smoothed_loss", self.smoothed_loss)])
            for cb in self.callbacks:
                if cb.on_gradients_ready is not None:
                    cb.on_gradients_ready()
            self.apply_update()
            # iter counts the updates applied so far
            self.iter += 1
            if display and stop_iter - start_iter > p.display:
                self._log_progress(start_iter, stop_iter, time.perf_counter() - t_start)
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                self.snapshot()
            if request == STOP:
                self.requested_early_exit = True
                break

    def _update_smoothed_loss(self, loss: float, start_iter: int, average_loss: int) -> None:
        """Caffe's ``UpdateSmoothedLoss``: a running mean over the last ``average_loss``."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (n - 1) + loss) / n
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / average_loss
            self._losses[idx] = loss

    def _log_progress(self, start_iter: int, stop_iter: int, elapsed: float) -> None:
        done = self.iter - start_iter
        rate = done / elapsed if elapsed > 0 else math.inf
        left = (stop_iter - self.iter) / rate if rate > 0 else math.inf
        self.log.info("Progress: %d/%d iterations, %s iter/s, %s left", self.iter, stop_iter,
                      f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}", _duration(left))

    def apply_update(self) -> None:
        """Compute the rate for this iteration and update every learnable parameter
        (Caffe's ``SGDSolver::ApplyUpdate``); ``iter`` is not advanced."""
        p = self.param
        rate, self.current_step = lr_policy.learning_rate(p, self.iter, self.current_step)
        self._lr = rate
        if p.display and self.iter % p.display == 0:
            self.log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        self.rule.apply(self.net.learnable_params, self.net.params_lr,
                        self.net.params_weight_decay, rate, self.iter)

    def snapshot(self) -> str:
        """See :meth:`SnapshotMixin.snapshot`; with replicas, replica 0 writes the weights."""
        if self.dp is not None:
            return self.dp.snapshot(self, super().snapshot)
        return super().snapshot()

# -- pycaffe's solver classes ------------------------------------------------------------------
class SGDSolver(Solver):
    """pycaffe's ``caffe.SGDSolver``: the SGD rule whatever ``type`` says."""

    forced_type = "SGD"


class NesterovSolver(Solver):
    forced_type = "Nesterov"


class AdaGradSolver(Solver):
    forced_type = "AdaGrad"


class RMSPropSolver(Solver):
    forced_type = "RMSProp"


class AdaDeltaSolver(Solver):
    forced_type = "AdaDelta"


class AdamSolver(Solver):
    forced_type = "Adam"


SOLVER_CLASSES: dict[str, type[Solver]] = {
    cls.forced_type: cls  # type: ignore[misc]
    for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver,
                AdamSolver)
}


def get_solver(param_or_path: Any, **kwargs: Any) -> Solver:
    """The solver named by the file's ``type`` (pycaffe's ``caffe.get_solver``)."""
    param = param_or_path
    if isinstance(param_or_path, (str, os.PathLike)):
        param = prototxt.read_solver(os.fspath(param_or_path))
    name = rules.solver_type(param)
    cls = SOLVER_CLASSES.get(name)
    if cls is None:
        hint = errors.did_you_mean(name, SOLVER_CLASSES)
        raise errors.SolverError(
            f'Unknown solver type: "{name}"{hint} (known types: {", ".join(SOLVER_CLASSES)})')
    return cls(param_or_path, **kwargs)
