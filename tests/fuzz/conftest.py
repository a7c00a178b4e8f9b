"""Fixtures of the fuzz suite: tiny data and the shipped nets and solvers made to read it.

Default runs are short and reproducible (``derandomize``); ``pytest -m slow tests/fuzz`` runs
the longer variant. Each example has its own time and memory limits (harness.limits), so
Hypothesis' deadline is off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import harness
import pytest
from hypothesis import HealthCheck, Phase, settings

# NOTE: no "explain" phase: it traces every line, which slows a failing CLI example past its
# time limit and buries the real failure under a TimeLimit
_COMMON = {"derandomize": True, "deadline": None, "database": None, "print_blob": True,
           "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture]}
settings.register_profile("fuzz", max_examples=100, **_COMMON)
settings.register_profile("fuzz-slow", max_examples=1500, **_COMMON)


class Seeds(list):
    """(name, text) pairs that print as their names: Hypothesis shows a failing example's
    arguments, and the texts are long."""

    def __repr__(self) -> str:
        return f"<{len(self)} seed files: {', '.join(n for n, _ in self)}>"


@pytest.fixture(autouse=True)
def _quiet_log():
    """The nets log every layer they build; a fuzz run builds thousands."""
    logger = logging.getLogger("pycaffe_mpi")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(old)


@pytest.fixture(scope="session")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return harness.make_data(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(autouse=True)
def _run_in_fuzz_dir(fuzz_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutated solvers name relative snapshot prefixes ("x"): whatever a run writes lands in
    the fuzz directory, never in the checkout. Per test (NOTE: a session-wide chdir would
    outlive this folder and move every later test's working directory)."""
    work = fuzz_dir / "cwd"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)


@pytest.fixture(scope="session")
def net_seeds(fuzz_dir: Path) -> list[tuple[str, str]]:
    """(path relative to the repository, localised text) of every shipped net."""
    seeds = Seeds((str(p.relative_to(harness.ROOT)),
                   harness.localise_net(p.read_text(), fuzz_dir)) for p in harness.seed_nets())
    quick = dict(seeds)["models/cifar10_quick/train_test.prototxt"]
    seeds.append(("v1/models/cifar10_quick/train_test.prototxt", harness.as_v1(quick)))
    return seeds


@pytest.fixture(scope="session")
def solver_seeds(fuzz_dir: Path) -> list[tuple[str, str]]:
    """(path, localised text) of every shipped solver, each naming a localised copy of its
    own net and snapshotting under the fuzz directory."""
    out = Seeds()
    for p in harness.seed_solvers():
        text = p.read_text()
        nets = [n for n in harness.seed_nets() if str(n.relative_to(harness.ROOT)) in text]
        net = nets[0] if nets else harness.ROOT / "models/cifar10_quick/train_test.prototxt"
        local = fuzz_dir / ("net_" + "_".join(net.relative_to(harness.ROOT).parts))
        local.write_text(harness.localise_net(net.read_text(), fuzz_dir))
        out.append((str(p.relative_to(harness.ROOT)),
                    harness.localise_solver(text, local, fuzz_dir)))
    return out
