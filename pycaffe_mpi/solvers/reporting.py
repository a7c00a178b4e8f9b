"""The solver's reports: output values, the results file and the test pass.

:class:`ReportingMixin` logs the net outputs in Caffe's wording (``    Train net output #k: name
= v``) so ``tools/extra/parse_log.py`` reads our logs, writes the same numbers as JSON lines to
the results file (:mod:`pycaffe_mpi.reports.results`), and runs Caffe's ``Solver::Test`` through
the one averaging path :mod:`pycaffe_mpi.solvers.testing`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi.reports.results import ResultsWriter, element_names
from pycaffe_mpi.solvers import lr_policy
from pycaffe_mpi.solvers import testing as testing_mod


def fmt(x: float) -> str:
    """A number as C++ iostreams print a float by default (6 significant digits)."""
    return f"{float(x):.6g}"


class ReportingMixin:
    """The reporting half of :class:`~pycaffe_mpi.solvers.solver.Solver` (it provides
    ``param``, ``log``, ``net``, ``test_nets``, ``iter``, ``current_step``, ``rank``, ``dp``,
    ``mean_scores``, ``results``, ``_results_arg``, ``_t0`` and ``_test_batch_allowed``)."""

    param: Any
    log: Any
    net: Any
    test_nets: list[Any]
    iter: int
    current_step: int
    rank: int
    dp: Any
    mean_scores: list[list[float]]
    results: ResultsWriter | None
    _results_arg: Any
    _t0: float
    _test_batch_allowed: Callable[[int], bool]

    def _output_values(self, net: Any) -> list[tuple[str, np.ndarray]]:
        """Each output blob's values, flattened, on the host."""
        return testing_mod.output_values(net)

    def _results_writer(self) -> ResultsWriter | None:
        """The results file, opened on first use (appended to when the run was resumed)."""
        if self.results is None and self._results_arg is not False:
            path = self._results_arg
            if path is None or path is True:
                if not self.param.snapshot_prefix or \
                        (self.dp is not None and not self.dp.is_root_replica):
                    self._results_arg = False
                    return None
                # NOTE: another rank's outputs (a loss or accuracy of its own) go to a file of
                # its own, named as its snapshots are, so that no output is lost
                rank = f"_rank_{self.rank}" if self.rank else ""
                path = f"{self.param.snapshot_prefix}{rank}_results.jsonl"
            self.results = ResultsWriter(path, self.rank, append=self.iter > 0)
            self.log.info("Writing results to %s", self.results.path,
                          extra={"all_ranks": self.rank != 0})
        return self.results

    def _record(self, kind: str, outputs: Sequence[tuple[str, Any]], test_net: int = 0) -> None:
        if self.rank != 0 and not any(name != "smoothed_loss" for name, _ in outputs):
            return  # ranks other than 0 record only outputs their own net computes
        writer = self._results_writer()
        if writer is None:
            return
        seconds = time.perf_counter() - self._t0
        if kind == "train":
            # NOTE: the record precedes this iteration's update, so self.lr is still the last
            # update's rate; the log's "Iteration N, lr = R" line gives the rate for N
            rate = lr_policy.learning_rate(self.param, self.iter, self.current_step, log=False)[0]
            # NOTE: base_lr is a float32 proto field: 0.01 reads back as 0.009999999776...; the
            # shortest decimal of that float32 is what the user wrote (and what the log shows)
            writer.write_train(self.iter, float(str(np.float32(rate))), seconds, outputs)
        else:
            writer.write_test(self.iter, seconds, outputs, test_net)

    def _log_outputs(self, net: Any, what: str, values: Sequence[tuple[str, Any]]) -> None:
        """``    <what> net output #k: name = v[ (* w = w·v loss)]``, k running over elements;
        a blob with several elements prints them as ``name_0 …`` (``results.element_names``)
        where Caffe repeats the name, so that its parse_log keeps every element."""
        if self.dp is not None and not self.dp.is_root_replica:
            return  # replica 0 displays
        k = 0
        for name, vals in values:
            weight = float(net.blob_loss_weights.get(name, 0.0))
            for label, v in zip(element_names(name, len(vals)), vals):
                extra = f" (* {fmt(weight)} = {fmt(weight * v)} loss)" if weight else ""
                # every rank prints the outputs its own net computes (log.setup lets them pass)
                self.log.info("    %s net output #%d: %s = %s%s", what, k, label, fmt(v),
                              extra, extra={"all_ranks": True})
                k += 1

    def test_all(self) -> None:
        """Test every test net (stops early if the action function asked to stop)."""
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id: int = 0) -> list[float] | None:
        """Run ``test_iter`` forward passes of one test net and log the mean of each output
        element (Caffe's ``Solver::Test``); returns the means (None if interrupted)."""
        p = self.param
        self.log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        test_net = self.test_nets[test_net_id]
        test_net.share_trained_layers_with(self.net)
        n_iter = p.test_iter[test_net_id]
        test_net.begin_test_pass()

        scores = testing_mod.average_outputs(test_net, n_iter, self._test_batch_allowed)
        if scores is None:
            self.log.info("Test interrupted.")
            return None
        if p.test_compute_loss:
            self.log.info("Test loss: %s", fmt(scores.loss))
        split = scores.outputs
        means = scores.flat()
        self._log_outputs(test_net, "Test", split)
        suffix = f"_test{test_net_id}" if len(self.test_nets) > 1 else ""
        # as the results file: no snapshot_prefix, no report files (rather than in the cwd)
        prefix = f"{self.param.snapshot_prefix}_iter_{self.iter}{suffix}" \
            if self.param.snapshot_prefix else None
        for path in test_net.end_test_pass(prefix, self.iter):
            self.log.info("Wrote %s", path, extra={"all_ranks": True})
        self.mean_scores[test_net_id] = means
        loss = [("test_loss", scores.loss)] if p.test_compute_loss else []
        self._record("test", [*split, *loss], test_net_id)
        return means
