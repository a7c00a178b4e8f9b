"""The fuzz suite's mutations written out once each, on the shipped CIFAR10-Quick and MPI nets
and solver: every one must be refused with a located PycaffeError of the expected kind, in
both phases, within the example limits. Hypothesis explores around these; this list makes sure
each kind of mistake is tried in every default run."""

from __future__ import annotations

import re
from pathlib import Path

import harness
import pytest

from pycaffe_mpi import errors, solvers

QUICK = "models/cifar10_quick/train_test.prototxt"
MPI = "models/cifar10_mpi/train_test.prototxt"


def _sub(pattern: str, repl: str, count: int = 1):
    return lambda t: re.sub(pattern, repl, t, count=count)


# (id, seed net, mutation, expected error type)
NET_CASES = [
    ("brace-missing", QUICK, _sub(r"\}\n", "\n"), errors.PrototxtError),
    ("brace-extra", QUICK, _sub(r"layer \{", "layer { {"), errors.PrototxtError),
    ("wrong-type-string", QUICK, _sub(r"num_output: 32", 'num_output: "32"'),
     errors.PrototxtError),
    ("wrong-type-message", QUICK, _sub(r"kernel_size: 5", "kernel_size { }"),
     errors.PrototxtError),
    ("bad-enum", QUICK, _sub(r"pool: MAX", "pool: MAXIMUM"), errors.PrototxtError),
    ("enum-number-out-of-range", QUICK, _sub(r"pool: MAX", "pool: 9"), errors.PrototxtError),
    ("phase-enum", QUICK, _sub(r"phase: TRAIN", "phase: TRAINING"), errors.PrototxtError),
    ("num-output-over-uint32", QUICK, _sub(r"num_output: 32", "num_output: 99999999999"),
     errors.PrototxtError),
    ("num-output-zero", QUICK, _sub(r"num_output: 32", "num_output: 0"), errors.NetError),
    ("num-output-huge", QUICK, _sub(r"num_output: 32", "num_output: 2147483647"),
     errors.NetError),
    ("kernel-size-zero", QUICK, _sub(r"kernel_size: 5", "kernel_size: 0"), errors.NetError),
    ("pool-kernel-zero", QUICK, _sub(r"kernel_size: 3", "kernel_size: 0"), errors.NetError),
    ("stride-zero", QUICK, _sub(r"stride: 1", "stride: 0"), errors.NetError),
    ("pad-huge", QUICK, _sub(r"pad: 2", "pad: 4000000"), errors.NetError),
    ("batch-over-int-max", QUICK, _sub(r"batch_size: \d+", "batch_size: 2147483647"),
     errors.ShapeError),
    ("batch-zero", QUICK, _sub(r"batch_size: \d+", "batch_size: 0"), errors.NetError),
    ("std-negative", QUICK, _sub(r"std: 0.0001", "std: -1"), errors.PycaffeError),
    ("std-nan", QUICK, _sub(r"std: 0.0001", "std: nan"), errors.PycaffeError),
    ("unknown-field", QUICK, _sub(r'name: "conv1"', 'name: "conv1" bogus: 1'),
     errors.PrototxtError),
    ("unknown-param-block", QUICK, _sub(r'name: "conv1"', 'name: "conv1" conv_param { }'),
     errors.PrototxtError),
    ("unknown-type", QUICK, _sub(r'type: "ReLU"', 'type: "ReLu"'), errors.NetError),
    ("missing-bottom", QUICK, _sub(r'bottom: "pool1"', 'bottom: "pool_1"'), errors.NetError),
    ("cyclic-bottom", QUICK, _sub(r'bottom: "data"\n  top: "conv1"',
                                  'bottom: "ip2"\n  top: "conv1"'), errors.NetError),
    ("self-loop", QUICK, _sub(r'bottom: "data"\n  top: "conv1"',
                              'bottom: "conv1"\n  top: "conv1"'), errors.NetError),
    ("duplicate-top", QUICK, _sub(r'top: "pool1"\n  pooling', 'top: "conv1"\n  pooling'),
     errors.NetError),
    ("duplicate-layer-name", QUICK, _sub(r'name: "pool1"', 'name: "conv1"'), errors.NetError),
    ("singular-twice", QUICK, _sub(r"num_output: 32", "num_output: 32 num_output: 16"),
     errors.PrototxtError),
    ("split-like-top", QUICK, _sub(r'top: "pool1"\n  pooling',
                                   'top: "conv1_conv1_0_split_0"\n  pooling'), errors.NetError),
    ("loss-weight-count", QUICK, _sub(r'name: "loss"', 'name: "loss" loss_weight: 1 '
                                      "loss_weight: 2"), errors.NetError),
    ("include-and-exclude", QUICK, _sub(r'name: "conv1"', 'name: "conv1" include { phase: '
                                        "TRAIN } exclude { phase: TEST }"), errors.NetError),
    ("rank-outside-world", QUICK, _sub(r'name: "conv1"', 'name: "conv1" include { '
                                       "mpi_rank: 7 }"), errors.NetError),
    ("rank-negative", QUICK, _sub(r'name: "conv1"', 'name: "conv1" include { mpi_rank: -1 }'),
     errors.PrototxtError),
    ("mpi-rank-outside-world", MPI, _sub(r'name: "broadcast_pool2"', 'name: "broadcast_pool2" '
                                         "include { mpi_rank: 0 mpi_rank: 5 }"),
     errors.NetError),
    # a rank listed twice counts once
    ("mpi-rank-duplicate", MPI, _sub(r'name: "broadcast_pool2"', 'name: "broadcast_pool2" '
                                     "include { mpi_rank: 0 mpi_rank: 1 mpi_rank: 1 }"), None),
    ("mpi-root-outside-world", MPI, _sub(r"root: 0", "root: 9"), errors.NetError),
    ("mpi-root-not-member", MPI, _sub(r'name: "broadcast_pool2"', 'name: "broadcast_pool2" '
                                      "include { mpi_rank: 1 mpi_rank: 2 }"), errors.NetError),
    ("non-utf8", QUICK, lambda t: t.replace('name: "conv1"', 'name: "conv\udcff1"'),
     errors.PrototxtError),
    ("truncated", QUICK, lambda t: t[: len(t) // 2], errors.PrototxtError),
    ("comments-only", QUICK, lambda t: "# nothing here\n", None),  # Caffe: an empty net
]


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize(("seed", "mutate", "expected"), [c[1:] for c in NET_CASES],
                         ids=[c[0] for c in NET_CASES])
def test_named_net_mutation(seed: str, mutate, expected, fuzz_dir: Path):
    text = harness.localise_net((harness.ROOT / seed).read_text(), fuzz_dir)
    mutated = mutate(text)
    assert mutated != text or not text
    path = fuzz_dir / "named.prototxt"
    path.write_bytes(_encode(mutated))
    error = harness.expect_clean(harness.build_nets, path)
    if expected is None:
        assert error is None, error
    else:
        assert isinstance(error, expected), f"{type(error).__name__}: {error}"


SOLVER = "models/cifar10_quick/solver.prototxt"
def _both(*subs):
    def apply(t: str) -> str:
        for sub in subs:
            t = sub(t)
        return t
    return apply


# (id, mutation, expected error type, whether Solver() itself refuses it: else the first
# iteration does, as in Caffe)
SOLVER_CASES = [
    ("solver-type", _sub(r"^", 'type: "SGDD"\n'), errors.SolverError, True),
    ("solver-mode-enum", _sub(r"solver_mode: CPU", "solver_mode: TPU"), errors.PrototxtError,
     True),
    ("lr-policy", _sub(r'lr_policy: "multistep"', 'lr_policy: "bogus"'), errors.SolverError,
     False),
    ("max-iter-over-int32", _sub(r"max_iter: \d+", "max_iter: 2147483648"),
     errors.PrototxtError, True),
    ("test-interval-zero", _sub(r"test_interval: \d+", "test_interval: 0"), errors.SolverError,
     True),
    ("iter-size-zero", _sub(r"^", "iter_size: 0\n"), errors.SolverError, True),
    ("average-loss-zero", _sub(r"^", "average_loss: 0\n"), errors.SolverError, True),
    ("net-missing-file", _sub(r'net: "[^"]*"', 'net: "no/such.prototxt"'),
     errors.PrototxtError, True),
    ("no-net", _sub(r'net: "[^"]*"\n', ""), errors.SolverError, True),
    ("base-lr-twice", _sub(r"base_lr: ", "base_lr: 1 base_lr: "), errors.PrototxtError, True),
    ("unknown-field", _sub(r"^", "learning_rate: 0.1\n"), errors.PrototxtError, True),
    ("snapshot-dir-missing", _both(_sub(r'snapshot_prefix: "[^"]*"',
                                        'snapshot_prefix: "/no/such/dir/x"'),
                                   _sub(r"snapshot: \d+", "snapshot: 1")),
     errors.SolverError, True),
]


@pytest.mark.parametrize(("mutate", "expected", "at_setup"), [c[1:] for c in SOLVER_CASES],
                         ids=[c[0] for c in SOLVER_CASES])
def test_named_solver_mutation(mutate, expected, at_setup, solver_seeds, fuzz_dir: Path):
    text = dict(solver_seeds)[SOLVER]
    mutated = mutate(text)
    assert mutated != text
    path = fuzz_dir / "named_solver.prototxt"
    path.write_text(mutated)
    error = harness.expect_clean(
        lambda p: solvers.Solver(str(p), comm=harness.FakeWorld()).close(), path)
    if at_setup:
        assert isinstance(error, expected), f"{type(error).__name__}: {error}"
    else:
        assert error is None, error
    code, err = harness.run_cli(["train", "--solver", str(path), "--log_level", "ERROR"])
    assert code == 1 and f"error: {path}" in err, err
