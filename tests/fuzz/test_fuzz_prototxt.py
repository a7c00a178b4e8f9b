"""Fuzz: mutated nets and solvers (from the shipped files) end in a located PycaffeError.

Never a raw traceback of another type, a hang or a huge allocation: see harness.py for the
limits each example runs under. ``pytest -m slow tests/fuzz`` runs the longer variant.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import pytest
import strategies
from google.protobuf import text_format
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pycaffe_mpi import errors, solvers
from pycaffe_mpi.proto import caffe_pb2


def _fast_and_slow(body: Callable[..., None], fast_examples: int | None = None,
                   slow_examples: int | None = None) -> tuple[Any, Any]:
    """The same fuzz test as a short default run and a long run marked slow (example counts:
    the profiles' unless given)."""
    def make(profile: str, n: int | None) -> Any:
        extra = {"max_examples": n} if n else {}
        return settings(settings.get_profile(profile), **extra)(given(st.data())(body))

    return make("fuzz", fast_examples), pytest.mark.slow(make("fuzz-slow", slow_examples))


def _write(fuzz_dir: Path, name: str, data: bytes) -> Path:
    path = fuzz_dir / ("fuzzed_" + Path(name).name)
    path.write_bytes(data)
    return path


# -- nets: parse, prepare and build for TRAIN and TEST ------------------------------------------
def _net_case(net_seeds: list[tuple[str, str]], fuzz_dir: Path, data: st.DataObject) -> None:
    name, content = data.draw(strategies.mutated(net_seeds))
    path = _write(fuzz_dir, name, content)
    harness.expect_clean(harness.build_nets, path)


test_net_mutations, test_net_mutations_slow = _fast_and_slow(_net_case)


# -- nets: one forward and backward pass (mistakes that only show when data flows) -------------
def _run_case(net_seeds: list[tuple[str, str]], fuzz_dir: Path, data: st.DataObject) -> None:
    name, content = data.draw(strategies.mutated(net_seeds, byte_damage=False))
    path = _write(fuzz_dir, name, content)
    harness.expect_clean(harness.run_nets, path)


test_run_mutations, test_run_mutations_slow = _fast_and_slow(_run_case, 40, 300)


# -- solvers: read and set up (train and test nets) ----------------------------------------------
def _build_solver(path: Path) -> None:
    solver = solvers.Solver(str(path), comm=harness.FakeWorld())
    solver.close()


def _solver_case(solver_seeds: list[tuple[str, str]], fuzz_dir: Path,
                 data: st.DataObject) -> None:
    name, content = data.draw(strategies.mutated(solver_seeds))
    path = _write(fuzz_dir, name, content)
    harness.expect_clean(_build_solver, path)


test_solver_mutations, test_solver_mutations_slow = _fast_and_slow(_solver_case, 60)


# -- the command line: pycaffe-mpi train --solver X (two iterations at most) ---------------------
def _runs_long(content: bytes) -> bool:
    """True when a solver that parses asks for more than a couple of iterations or test
    batches: the CLI would do what it is asked, but not within an example's time."""
    param = caffe_pb2.SolverParameter()
    try:
        text_format.Merge(content.decode(), param)
    except Exception:
        return False  # the CLI must refuse it; that is quick
    return param.max_iter > 2 or any(t > 2 for t in param.test_iter) or param.iter_size > 2


def _cli_case(solver_seeds: list[tuple[str, str]], fuzz_dir: Path, data: st.DataObject) -> None:
    name, content = data.draw(strategies.mutated(solver_seeds))
    assume(not _runs_long(content))
    path = _write(fuzz_dir, name, content)

    def train(p: Path) -> None:
        code, err = harness.run_cli(["train", "--solver", str(p), "--log_level", "ERROR"])
        assert code in (0, 1), f"exit code {code}: {err}"
        if code == 1:
            line = next((x for x in err.splitlines() if x.startswith("error:")), "")
            assert line, f"no error line: {err}"
            # the solver file or the net file it names (both live in the fuzz directory)
            harness.check_error(errors.PycaffeError(line), p.parent)

    harness.expect_clean(train, path)


test_cli_train, test_cli_train_slow = _fast_and_slow(_cli_case, 20, 150)


def _cli_model_case(net_seeds: list[tuple[str, str]], fuzz_dir: Path,
                    data: st.DataObject) -> None:
    """``pycaffe-mpi test|time --model X --iterations 1`` on a mutated net."""
    name, content = data.draw(strategies.mutated(net_seeds))
    command = data.draw(st.sampled_from(["test", "time"]))
    path = _write(fuzz_dir, name, content)

    def run(p: Path) -> None:
        code, err = harness.run_cli([command, "--model", str(p), "--iterations", "1",
                                     "--log_level", "ERROR"])
        assert code in (0, 1), f"exit code {code}: {err}"
        if code == 1:
            line = next((x for x in err.splitlines() if x.startswith("error:")), "")
            assert line, f"no error line: {err}"
            harness.check_error(errors.PycaffeError(line), p)

    harness.expect_clean(run, path)


test_cli_model, test_cli_model_slow = _fast_and_slow(_cli_model_case, 15, 150)


def _cli_upgrade_case(net_seeds: list[tuple[str, str]], fuzz_dir: Path,
                      data: st.DataObject) -> None:
    """``pycaffe-mpi upgrade-net IN OUT`` on a mutated net (the V1 seed reaches the upgrade)."""
    name, content = data.draw(strategies.mutated(net_seeds))
    path = _write(fuzz_dir, name, content)

    def run(p: Path) -> None:
        code, err = harness.run_cli(["upgrade-net", str(p), str(fuzz_dir / "upgraded.prototxt")])
        assert code in (0, 1, 2), f"exit code {code}: {err}"  # 2: Caffe's "failed to parse"
        if code:
            assert str(p) in err, f"error without the file: {err}"

    harness.expect_clean(run, path)


test_cli_upgrade, test_cli_upgrade_slow = _fast_and_slow(_cli_upgrade_case, 30, 400)


# -- every seed once, with byte damage (non-UTF-8, truncated, empty) ----------------------------
def _bytes_case(net_seeds: list[tuple[str, str]], solver_seeds: list[tuple[str, str]],
                fuzz_dir: Path, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["net", "solver"]))
    name, text = data.draw(st.sampled_from(net_seeds if kind == "net" else solver_seeds))
    path = _write(fuzz_dir, name, strategies.damage_bytes(data.draw, text.encode()))
    fn = harness.build_nets if kind == "net" else _build_solver
    harness.expect_clean(fn, path)


test_damaged_bytes, test_damaged_bytes_slow = _fast_and_slow(_bytes_case)


def test_every_seed_builds(net_seeds: list[tuple[str, str]], solver_seeds, fuzz_dir: Path):
    """Unmutated, every shipped net and solver builds here: the fuzz starts from working
    files, so what it finds is the mutation's doing."""
    for name, text in net_seeds:
        harness.build_nets(_write(fuzz_dir, name, text.encode()))
    for name, text in solver_seeds:
        _build_solver(_write(fuzz_dir, name, text.encode()))
    assert not re.search(r"data/cifar10", "".join(t for _, t in net_seeds))
