"""The console path in a real process: ``pycaffe-mpi test --model X`` on huge-number and
damaged nets, under an address-space cap and a timeout, prints one located ``error:`` line and
exits 1: no traceback, no hang, no allocation past the cap."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from pathlib import Path

import harness
import pytest

DEPLOY = "models/cifar10_quick/deploy.prototxt"
CAP_BYTES = 3 << 30  # far below what the huge shapes below would take


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


CASES = [
    ("dim-over-int-max", lambda t: re.sub(r"dim: 2 ", "dim: 2147483648 ", t, count=1),
     r':\d+: layer "data" \(type Input\).*exceeds INT_MAX'),
    ("dim-huge-product", lambda t: t.replace("dim: 32 dim: 32", "dim: 65536 dim: 65536"),
     r':\d+: layer "data".*exceeds INT_MAX'),
    # fits INT_MAX, not the cap: the allocation fails and names layer, shape and bytes
    ("num-output-past-memory", lambda t: t.replace("num_output: 64\n", "num_output: 2000000\n",
                                                   1),
     r':\d+: layer "conv3" \(type Convolution\).*cannot allocate.*GiB'),
    ("num-output-over-uint32", lambda t: t.replace("num_output: 32", "num_output: 99999999999",
                                                   1), r":\d+:\d+ .*num_output"),
    ("kernel-size-zero", lambda t: t.replace("kernel_size: 5", "kernel_size: 0", 1),
     r':\d+: layer "conv1".*kernel'),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_console_refuses_huge_and_damaged_nets(mutate, expected, fuzz_dir: Path):
    text = harness.localise_net((harness.ROOT / DEPLOY).read_text(), fuzz_dir)
    mutated = mutate(text)
    assert mutated != text
    path = fuzz_dir / "console.prototxt"
    path.write_text(mutated)
    done = subprocess.run([sys.executable, "-m", "pycaffe_mpi.cli", "test", "--model",
                           str(path), "--iterations", "1"], capture_output=True, text=True,
                          timeout=60, preexec_fn=_cap, cwd=harness.ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert re.search(re.escape(str(path)) + expected, errors[0]), errors[0]
