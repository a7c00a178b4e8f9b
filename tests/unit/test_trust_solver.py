"""Run-time trust in the Solver (issue 9, solver side), in one process.

- ranks agree on the fields that decide the sequence of collectives (with a stand-in world);
- a NaN/Inf loss stops the run naming the iteration and the first non-finite layer, unless
  ``nonfinite="continue"`` (Caffe's behaviour);
- the results file: one JSON line per display and per test pass, beside the snapshots;
- ``solvers.testing.average_outputs`` is the solver's test pass and ``pycaffe-mpi test``'s;
- ``sys.exit`` during an MPI training ends the job through an error;
- a damaged ``layer_state`` names the .solverstate and the layer;
- pycaffe's ``set_random_seed``/``set_mode_*`` settings are the Net's and Solver's defaults.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi import errors, solvers
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.reports import results
from pycaffe_mpi.solvers import agreement, nonfinite, testing

MODULE = "_pycaffe_mpi_trust_layers"


class NaNAfter(Layer):
    """Identity that writes NaN into its top from the ``at``-th forward on (param_str)."""

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.at, self.calls = int(self.param_str or 10**9), 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data
        if self.calls >= self.at:
            top[0].data[0] = np.nan
        self.calls += 1

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff


sys.modules[MODULE] = types.ModuleType(MODULE)
sys.modules[MODULE].NaNAfter = NaNAfter  # type: ignore[attr-defined]


def net_text(nan_at: int | None = None) -> str:
    nan = ""
    bottom = "ip"
    if nan_at is not None:
        nan = (f'layer {{ name: "nanny" type: "Python" bottom: "ip" top: "ipn" python_param {{ '
               f'module: "{MODULE}" layer: "NaNAfter" param_str: "{nan_at}" }} }}\n')
        bottom = "ipn"
    return f"""name: "tiny"
layer {{ name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param {{ shape {{ dim: 4 dim: 5 }} shape {{ dim: 4 dim: 2 }}
    data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
{nan}layer {{ name: "loss" type: "EuclideanLoss" bottom: "{bottom}" bottom: "y" top: "loss" }}
"""


def write_solver(d: Path, extra: str = "", nan_at: int | None = None, name: str = "s",
                 lr: float = 0.01) -> Path:
    net = d / f"{name}_net.prototxt"
    net.write_text(net_text(nan_at))
    solver = d / f"{name}.prototxt"
    solver.write_text(f'net: "{net}" base_lr: {lr} lr_policy: "fixed" max_iter: 6 display: 2 '
                      f'random_seed: 3 snapshot_prefix: "{d / name}" {extra}\n')
    return solver


# -- agreement (item 1) ---------------------------------------------------------------------
class FakeWorld(comm_mod.SelfComm):
    """Rank ``rank`` of ``size``; allgather_obj answers with ``others`` for the other ranks."""

    def __init__(self, rank: int = 0, size: int = 3, others: Sequence[Any] = ()) -> None:
        self.rank, self.size, self.others = rank, size, list(others)

    def allgather_obj(self, obj: Any) -> list[Any]:
        out = [*self.others[:self.rank], obj, *self.others[self.rank:]]
        return out + [obj] * (self.size - len(out))

    def allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        recvbuf[...] = sendbuf


def solver_param(text: str) -> Any:
    return text_format.Merge(text, caffe_pb2.SolverParameter())  # the last value wins


def test_settings_digest_names_field_ranks_values_and_files() -> None:
    a = agreement.settings_digest(solver_param("max_iter: 8 test_iter: 2 test_interval: 4"))
    b = agreement.settings_digest(solver_param("max_iter: 8 test_iter: 3 test_interval: 4"))
    assert agreement.first_mismatch([a, a, a]) is None
    msg = agreement.first_mismatch([a, a, b], ["a.prototxt", "a.prototxt", "b.prototxt"])
    assert msg is not None
    assert 'solver field "test_iter": ranks 0,1: test_iter = [2]; rank 2: test_iter = [3]' in msg
    assert "rank 2 b.prototxt" in msg


@pytest.mark.parametrize("field", ["max_iter: 9", "iter_size: 2", "display: 3",
                                   "test_initialization: false", "average_loss: 4",
                                   "snapshot: 5", "test_interval: 7"])
def test_solver_refuses_ranks_that_disagree(tmp_path: Path, field: str) -> None:
    mine = solver_param("max_iter: 8 display: 1 test_interval: 4 snapshot: 0")
    theirs = solver_param(f"max_iter: 8 display: 1 test_interval: 4 snapshot: 0 {field}")
    world = FakeWorld(0, 2, [(agreement.settings_digest(theirs, {"nonfinite": "stop"}), "")])
    name = field.split(":")[0]
    with pytest.raises(errors.SolverError, match=rf'solver field "{name}".*rank 1: {name} = '):
        agreement.check_settings(world, mine, None, {"nonfinite": "stop"})


def test_solver_checks_before_building_nets(tmp_path: Path) -> None:
    solver = write_solver(tmp_path)
    theirs = solvers.read_solver_param(str(solver))
    theirs.max_iter = 7
    world = FakeWorld(1, 2, [(agreement.settings_digest(theirs, {"nonfinite": "stop"}),
                              "other.prototxt")])
    with pytest.raises(errors.SolverError, match=r'"max_iter": rank 0: max_iter = 7; rank 1: '
                                                 r"max_iter = 6.*rank 0 other.prototxt"):
        solvers.Solver(str(solver), comm=world)


def test_ranks_resumed_at_different_iterations() -> None:
    world = FakeWorld(0, 2, [(10, "b_iter_10.solverstate")])
    with pytest.raises(errors.SolverError, match=r"rank 0: iteration 20.*rank 1: iteration 10"):
        agreement.check_iteration(world, 20, "a_iter_20.solverstate")
    agreement.check_iteration(FakeWorld(0, 2, [(20, "")]), 20, None)


def test_sys_exit_during_mpi_training_becomes_an_error(tmp_path: Path) -> None:
    world = FakeWorld(0, 2)  # the other rank agrees with everything
    s = solvers.Solver(str(write_solver(tmp_path)), comm=world, results=False)

    def leave() -> None:
        sys.exit(2)

    s.add_callback(on_start=leave)
    with pytest.raises(errors.SolverError, match=r"sys.exit\(2\).*iteration 0 on rank 0/2"):
        s.solve()
    one = solvers.Solver(str(write_solver(tmp_path)), results=False)
    one.add_callback(on_start=leave)
    with pytest.raises(SystemExit):  # one process: sys.exit means what it says
        one.solve()


# -- non-finite loss (item 4) ---------------------------------------------------------------
def test_nan_loss_stops_naming_iteration_and_layer(tmp_path: Path) -> None:
    s = solvers.Solver(str(write_solver(tmp_path, nan_at=3)), results=False)
    with pytest.raises(nonfinite.NonFiniteError) as info:
        s.solve()
    msg = str(info.value)
    assert msg.startswith("iteration 3: the loss became non-finite (loss = nan;"), msg
    assert 'top "ipn" of ' in msg and 'layer "nanny" (type Python)' in msg, msg
    assert "_net.prototxt:" in msg and "--nonfinite continue" in msg, msg
    assert s.iter == 3


def test_nonfinite_continue_keeps_caffes_behaviour(tmp_path: Path) -> None:
    s = solvers.Solver(str(write_solver(tmp_path, nan_at=3)), results=False,
                       nonfinite="continue")
    s.solve()
    assert s.iter == 6 and np.isnan(s.smoothed_loss)
    with pytest.raises(errors.SolverError, match="nonfinite must be one of stop, continue"):
        solvers.Solver(str(write_solver(tmp_path)), nonfinite="ignore")


def test_diverging_weights_are_named(tmp_path: Path) -> None:
    """A huge rate: the loss overflows; the search names a parameter or a top of a layer."""
    s = solvers.Solver(str(write_solver(tmp_path, "momentum: 0.9", lr=1e30)),
                       results=False, dtype=np.float32)
    with np.errstate(all="ignore"), pytest.raises(
            nonfinite.NonFiniteError, match=r"iteration \d+: .*first non-finite value: "
                                            r'(parameter \d|top "\w+"|bottom "\w+" diff) of '
                                            r'.*layer "'):
        s.solve()


def test_first_nonfinite_reads_params_tops_and_diffs(tmp_path: Path) -> None:
    (tmp_path / "n.prototxt").write_text(net_text())
    net = Net(str(tmp_path / "n.prototxt"), 0, seed=1)
    net.forward_backward()
    assert nonfinite.first_nonfinite(net) is None
    net.params["ip"][1].diff[0] = np.inf
    assert nonfinite.first_nonfinite(net).startswith('parameter 1 of ')
    assert 'layer "ip"' in nonfinite.first_nonfinite(net)
    net.params["ip"][0].data[0, 0] = np.nan
    assert nonfinite.first_nonfinite(net).startswith("parameter 0 of ")


# -- results file and the averaging path (item 6) -------------------------------------------
def test_results_file_beside_snapshots(tmp_path: Path) -> None:
    s = solvers.Solver(str(write_solver(tmp_path, "test_iter: 2 test_interval: 3 "
                                                  "test_compute_loss: true")))
    s.solve()
    s.close()
    records = results.read_results(tmp_path / "s_results.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    test = [r for r in records if r["kind"] == "test"]
    assert [r["iter"] for r in train] == [0, 2, 4, 6]
    assert [r["iter"] for r in test] == [0, 3, 6]  # test_initialization, then every 3
    assert all(r["rank"] == 0 and r["lr"] == pytest.approx(0.01) for r in train)
    assert all(set(r["outputs"]) == {"loss", "smoothed_loss"} for r in train)
    assert all(set(r["outputs"]) == {"loss", "test_loss"} for r in test)
    assert test[-1]["outputs"]["loss"] == pytest.approx(s.mean_scores[0][0])
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[0] >= 0


def test_results_file_off_and_elsewhere(tmp_path: Path) -> None:
    s = solvers.Solver(str(write_solver(tmp_path)), results=False)
    s.solve()
    assert not (tmp_path / "s_results.jsonl").exists()
    other = tmp_path / "out" / "r.jsonl"
    s = solvers.Solver(str(write_solver(tmp_path)), results=str(other))
    s.solve()
    s.close()
    assert [r["iter"] for r in results.read_results(other)] == [0, 2, 4, 6]
    assert not (tmp_path / "s_results.jsonl").exists()


def test_average_outputs_means_batches(tmp_path: Path) -> None:
    (tmp_path / "n.prototxt").write_text(net_text())
    net = Net(str(tmp_path / "n.prototxt"), 1, seed=99)
    seen: list[tuple[float, float]] = []

    def record(i: int, loss: float, values: list[tuple[str, np.ndarray]]) -> None:
        seen.append((loss, float(values[0][1][0])))

    scores = testing.average_outputs(net, 3, after_batch=record)
    assert scores is not None and scores.iterations == 3 and len(seen) == 3
    assert scores.loss == pytest.approx(np.mean([lo for lo, _ in seen]))
    assert scores.flat() == pytest.approx([np.mean([v for _, v in seen])])
    assert [name for name, _ in scores.outputs] == ["loss"]
    assert testing.average_outputs(net, 2, before_batch=lambda i: i < 1) is None


def test_solver_and_cli_test_share_the_averaging(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pycaffe_mpi import cli

    calls: list[int] = []
    real = testing.average_outputs

    def spy(net: Any, iterations: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(iterations)
        return real(net, iterations, *args, **kwargs)

    monkeypatch.setattr(testing, "average_outputs", spy)
    s = solvers.Solver(str(write_solver(tmp_path, "test_iter: 3 test_interval: 100")),
                       results=False)
    means = s.test(0)
    assert calls == [3] and len(means) == 1 and np.isfinite(means[0])
    assert cli.main(["test", "--model", str(tmp_path / "s_net.prototxt"),
                     "--iterations", "2"]) == 0
    assert calls == [3, 2]


# -- damaged layer_state (item 4 of the issue) ------------------------------------------------
def test_damaged_layer_state_names_file_and_layer(tmp_path: Path) -> None:
    s = solvers.Solver(str(write_solver(tmp_path, "snapshot: 2")), results=False)
    s.step(2)
    state_path = tmp_path / "s_iter_2.solverstate"
    s.snapshot()
    from pycaffe_mpi import snapshot as io

    state = io.read_proto_binary(str(state_path), caffe_pb2.SolverState())
    for entry in state.layer_state:
        if entry.layer == "ip":
            entry.state = b'{"bit_generator": "PCG64", "state": 3'  # cut short
    io.write_proto_binary(str(state_path), state)
    fresh = solvers.Solver(str(write_solver(tmp_path, "snapshot: 2")), results=False)
    with pytest.raises(errors.SnapshotError,
                       match=rf'{state_path}: the run-time state \(layer_state\) of layer "ip" '
                             r"of the train net is damaged"):
        fresh.restore(str(state_path))


# -- pycaffe settings (item 7) --------------------------------------------------------------
@pytest.fixture
def settings() -> Any:
    from pycaffe_mpi.pycaffe import settings as s

    saved = (s.mode, s.device_id, s.random_seed, s.draws)
    yield s
    s.mode, s.device_id, s.random_seed, s.draws = saved


def test_set_random_seed_seeds_nets_and_solvers(tmp_path: Path, settings: Any) -> None:
    import pycaffe_mpi as caffe

    (tmp_path / "n.prototxt").write_text(net_text())
    def weights() -> np.ndarray:
        return Net(str(tmp_path / "n.prototxt"), 0).params["ip"][0].data.copy()

    caffe.set_random_seed(5)
    a, b = weights(), weights()
    assert not np.array_equal(a, b)  # two nets draw on, as from Caffe's global generator
    caffe.set_random_seed(5)
    np.testing.assert_array_equal(weights(), a)  # the same script gives the same nets
    np.testing.assert_array_equal(weights(), b)
    caffe.set_random_seed(6)
    assert not np.array_equal(weights(), a)
    solver = write_solver(tmp_path, name="noseed")
    solver.write_text(solver.read_text().replace("random_seed: 3", ""))
    s1 = solvers.Solver(str(solver), results=False)
    s2 = solvers.Solver(str(solver), results=False)
    assert s1.seed == 6
    np.testing.assert_array_equal(s1.net.params["ip"][0].data, s2.net.params["ip"][0].data)
    seeded = solvers.Solver(str(write_solver(tmp_path, name="seeded")), results=False)
    assert seeded.seed == 3  # the file's random_seed wins


def test_set_mode_chooses_the_default_backend(tmp_path: Path, settings: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pycaffe_mpi import backend as backend_mod

    chosen = backend_mod.Backend("cpu")
    monkeypatch.setattr(type(settings), "backend", lambda self: chosen)
    (tmp_path / "n.prototxt").write_text(net_text())
    assert Net(str(tmp_path / "n.prototxt"), 0).backend is chosen
    assert solvers.Solver(str(write_solver(tmp_path)), results=False).backend is chosen
    explicit = backend_mod.Backend("cpu")
    assert Net(str(tmp_path / "n.prototxt"), 0, backend=explicit).backend is explicit


def test_logs_name_results_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pycaffe_mpi"):
        solvers.Solver(str(write_solver(tmp_path)), results=None).solve()
    assert f"Writing results to {tmp_path / 's_results.jsonl'}" in caplog.text


def test_mpi_net_without_mpiexec_says_how_to_start_it(tmp_path: Path) -> None:
    net = tmp_path / "m_net.prototxt"
    net.write_text(net_text().replace(
        'layer { name: "loss"',
        'layer { name: "g" type: "MPIGather" bottom: "ip" top: "g0" top: "g1" top: "g2" }\n'
        'layer { name: "loss"'))
    solver = tmp_path / "m.prototxt"
    solver.write_text(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 1\n')
    with pytest.raises(errors.NetError,
                       match=rf'{net}:\d+: layer "g" \(type MPIGather\) .*needs 3 MPI ranks.*'
                             rf"`mpiexec -n 3 pycaffe-mpi train --solver {solver}`"):
        solvers.Solver(str(solver), results=False)
