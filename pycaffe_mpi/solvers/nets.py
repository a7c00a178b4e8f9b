"""The solver's nets: Caffe's ``Solver::InitTrainNet`` and ``InitTestNets``.

:class:`NetsMixin` builds the train net and the test nets a ``SolverParameter`` names
(``net``/``net_param``/``train_net``/``train_net_param``, ``test_net``/``test_net_param``/
``test_iter``), merging each net's ``NetState`` as Caffe does (phase, then the net's own state,
then ``train_state``/``test_state``), and loads the solver's ``weights`` into each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def derived_seed(seed: int, *salt: int) -> int:
    """A deterministic seed for a secondary net, distinct from ``seed`` and from ``seed + r``."""
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1, np.uint32)[0])


class NetsMixin:
    """The net-building half of :class:`~pycaffe_mpi.solvers.solver.Solver` (it provides
    ``param``, ``log``, ``seed``, ``dp``, ``dtype``, ``rank``, ``ctx``, ``comm``, ``backend`` and
    ``_parsed``, the net files read so far)."""

    param: Any
    log: Any
    seed: int | None
    dp: Any
    dtype: Any
    rank: int
    ctx: Any
    comm: Any
    backend: Any
    _parsed: dict[str, Any]

    def _net_kwargs(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "rank": self.rank, "ctx": self.ctx, "comm": self.comm,
                "backend": self.backend}

    def _make_net(self, source: Any, phase: int, override: Any, seed: int | None,
                  share_diffs: bool = False) -> Any:
        """Build one net with Caffe's NetState merge: phase, then the net's own state, then
        ``override`` (train_state / test_state)."""
        from pycaffe_mpi import netparam
        from pycaffe_mpi.net import Net

        if isinstance(source, str):
            if source not in self._parsed:  # train and test nets often share one file
                self._parsed[source] = netparam.read_net(source)
            parsed = self._parsed[source]
        else:
            parsed = netparam.from_param(source)
        state = caffe_pb2.NetState(phase=phase)
        state.MergeFrom(parsed.param.state)
        if override is not None:
            state.MergeFrom(override)
        merged = caffe_pb2.NetParameter()
        merged.CopyFrom(parsed.param)
        merged.state.CopyFrom(state)
        return Net(netparam.ParsedNet(merged, parsed.locations, parsed.path), state.phase,
                   seed=seed, share_diffs=share_diffs, **self._net_kwargs())

    def _load_weights(self, net: Any) -> None:
        for entry in self.param.weights:
            for name in entry.split(","):
                name = name.strip()
                if name:
                    self.log.info("Finetuning from %s", name)
                    net.copy_trained_layers_from(name)

    def _init_train_net(self) -> Any:
        p = self.param
        fields = "net, net_param, train_net, train_net_param"
        n = sum(p.HasField(f) for f in ("net", "net_param", "train_net", "train_net_param"))
        if n < 1:
            raise errors.SolverError(
                f"SolverParameter must specify a train net using one of these fields: {fields}")
        if n > 1:
            raise errors.SolverError("SolverParameter must not contain more than one of these "
                                     f"fields specifying a train_net: {fields}")
        source: Any
        if p.HasField("train_net_param"):
            self.log.info("Creating training net specified in train_net_param.")
            source = p.train_net_param
        elif p.HasField("train_net"):
            self.log.info("Creating training net from train_net file: %s", p.train_net)
            source = p.train_net
        elif p.HasField("net_param"):
            self.log.info("Creating training net specified in net_param.")
            source = p.net_param
        else:
            self.log.info("Creating training net from net file: %s", p.net)
            source = p.net
        override = p.train_state if p.HasField("train_state") else None
        net = self._make_net(source, TRAIN, override, self.seed,
                             share_diffs=getattr(self, "share_diffs", False))
        self._load_weights(net)
        return net

    def _init_test_nets(self) -> list[Any]:
        p = self.param
        if self.dp is not None and not self.dp.is_root_replica:
            return []  # replica 0 tests for all (Caffe's root solver)
        has_net_param, has_net_file = p.HasField("net_param"), p.HasField("net")
        if has_net_param and has_net_file:
            raise errors.SolverError("Both net_param and net_file may not be specified.")
        n_explicit = len(p.test_net_param) + len(p.test_net)
        n_iter = len(p.test_iter)
        generic = has_net_param or has_net_file
        if (n_iter < n_explicit) if generic else (n_iter != n_explicit):
            raise errors.SolverError(
                f"test_iter must be specified for each test network: {n_iter} test_iter "
                f"value(s) for {n_explicit} test_net/test_net_param net(s)")
        sources: list[tuple[str, Any]] = [("test_net_param", tp) for tp in p.test_net_param]
        sources += [(f"test_net file: {f}", f) for f in p.test_net]
        remaining = n_iter - n_explicit
        if has_net_param:
            sources += [("net_param", p.net_param)] * remaining
        elif has_net_file:
            sources += [(f"net file: {p.net}", p.net)] * remaining
        if len(p.test_state) and len(p.test_state) != len(sources):
            raise errors.SolverError(
                "test_state must be unspecified or specified once per test net: "
                f"{len(p.test_state)} test_state for {len(sources)} test net(s)")
        if sources and p.test_interval <= 0:
            raise errors.SolverError(
                f"test_interval must be > 0 when there are test nets ({len(sources)} from "
                f"test_iter), got {p.test_interval}")
        nets = []
        for i, (what, source) in enumerate(sources):
            self.log.info("Creating test net (#%d) specified by %s", i, what)
            override = p.test_state[i] if len(p.test_state) else None
            seed = None if self.seed is None else derived_seed(self.seed, 1, i)
            net = self._make_net(source, TEST, override, seed)
            net.debug_info = p.debug_info
            self._load_weights(net)
            nets.append(net)
        return nets
