"""Issue 9 tried as a user would: the installed ``pycaffe-mpi`` script under ``mpiexec -n 3``.

- item 1: per-rank ``--solver a,a,b`` where b differs in max_iter, test_interval, test_iter,
  display or iter_size is refused within seconds, naming the field, the ranks and the values;
- item 2: ``sys.exit`` in a user's Python layer on one rank ends every rank non-zero, with a
  ``[rank r/3]`` line naming the layer, its file:line, and the user's traceback;
- items 8-10, 12: a 3-member MCL ensemble from ``pycaffe-mpi ensemble --ranks 3``, trained with
  the command it prints, logs and writes per-member names (``member_accuracy_0`` ...) that
  ``parse-log`` keeps as columns; ``draw --all-ranks`` of the generated net draws one cluster per
  rank.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pycaffe_mpi.testing import mpirun

pytestmark = pytest.mark.skipif(mpirun.mpi_unavailable_reason() is not None,
                                reason=str(mpirun.mpi_unavailable_reason()))

SCRIPT = str(Path(sys.executable).parent / "pycaffe-mpi")
LIMIT_S = 30.0  # a refusal or a failure must end the job this fast (a hang meets the timeout)

NET = """name: "tiny_mpi"
layer { name: "data" type: "DummyData" top: "data" top: "label" include { mpi_rank: 0 }
  dummy_data_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "bcast" type: "MPIBroadcast" bottom: "data" top: "data_b" }
layer { name: "ip" type: "InnerProduct" bottom: "data_b" top: "ip0"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
USER
layer { name: "gather" type: "MPIGather" bottom: "ip" top: "ip_0" top: "ip_1" top: "ip_2" }
layer { name: "avg" type: "Eltwise" bottom: "ip_0" bottom: "ip_1" bottom: "ip_2" top: "score"
  include { mpi_rank: 0 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  include { mpi_rank: 0 } }
"""
IDENTITY = 'layer { name: "same" type: "Split" bottom: "ip0" top: "ip" }'
USER_LAYER = ('layer { name: "user" type: "Python" bottom: "ip0" top: "ip"\n'
              '  python_param { module: "audit_user_layer" layer: "OnRank1" param_str: "MODE" '
              '} }')
USER_MODULE = '''import os
import signal
import sys
import time

import caffe
from pycaffe_mpi import comm


class OnRank1(caffe.Layer):
    def setup(self, bottom, top):
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self.calls += 1
        rank = comm.world().rank
        if self.param_str == "signals":  # a signal to one process, as kill PID sends it
            if (rank, self.calls) in ((2, 3), (1, 6)):
                os.kill(os.getpid(), signal.SIGHUP if rank == 2 else signal.SIGINT)
        elif rank == 1 and self.calls == 3:
            if self.param_str == "stall":
                time.sleep(600)
            sys.exit("leaving early")
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
'''
SOLVER = """net: "{net}"
base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" max_iter: 6 display: 1
test_iter: 2 test_interval: 3
snapshot_prefix: "{prefix}" random_seed: 1 solver_mode: CPU
"""


def mpiexec(args: list[str], cwd: Path, timeout: float = 60,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    try:
        proc = mpirun.run_mpi(3, args, timeout=timeout, cwd=cwd, env=env)
    except TimeoutError as e:
        pytest.fail(f"the job hung (killed after {timeout:g} s):\n{e}")
    return proc, time.monotonic() - t0


def show(proc: subprocess.CompletedProcess) -> str:
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def write_job(d: Path, user: str = IDENTITY) -> Path:
    net = d / "net.prototxt"
    net.write_text(NET.replace("USER", user))
    solver = d / "a.prototxt"
    solver.write_text(SOLVER.format(net=net, prefix=d / "snap"))
    return solver


def test_solver_fields_that_decide_collectives_must_agree(tmp_path: Path) -> None:
    good = write_job(tmp_path)
    text = good.read_text()
    proc, _ = mpiexec([SCRIPT, "train", "--solver", str(good)], tmp_path)
    assert proc.returncode == 0 and "Optimization Done." in proc.stderr, show(proc)
    for field, old, new, values in [
            ("max_iter", "max_iter: 6", "max_iter: 7", ("6", "7")),
            ("test_interval", "test_interval: 3", "test_interval: 2", ("3", "2")),
            ("test_iter", "test_iter: 2", "test_iter: 3", ("[2]", "[3]")),
            ("display", "display: 1", "display: 2", ("1", "2")),
            ("iter_size", "max_iter: 6", "max_iter: 6 iter_size: 2", ("1", "2"))]:
        other = tmp_path / f"b_{field}.prototxt"
        other.write_text(text.replace(old, new))
        proc, seconds = mpiexec([SCRIPT, "train", "--solver", f"{good},{good},{other}"],
                                tmp_path)
        assert proc.returncode != 0, show(proc)
        assert seconds < LIMIT_S, f"{field}: took {seconds:.1f} s\n{show(proc)}"
        want = (f'solver field "{field}": ranks 0,1: {field} = {values[0]}; '
                f"rank 2: {field} = {values[1]}")
        lines = [ln for ln in proc.stderr.splitlines() if want in ln]
        assert lines, f"{field}:\n{show(proc)}"
        assert lines[0].startswith("[rank ") and f"rank 2 {other}" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr, show(proc)


def user_env(d: Path) -> dict[str, str]:
    (d / "audit_user_layer.py").write_text(USER_MODULE)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(d), os.environ.get("PYTHONPATH", "")) if p))


def test_sys_exit_in_a_user_layer_ends_every_rank(tmp_path: Path) -> None:
    solver = write_job(tmp_path, USER_LAYER.replace("MODE", "exit"))
    env = user_env(tmp_path)
    proc, seconds = mpiexec([SCRIPT, "train", "--solver", str(solver)], tmp_path, env=env)
    assert proc.returncode != 0, show(proc)
    assert seconds < LIMIT_S, f"took {seconds:.1f} s\n{show(proc)}"
    assert "Optimization Done." not in proc.stderr, show(proc)
    head = [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank 1/3] error:")]
    assert head, show(proc)
    assert f'{tmp_path / "net.prototxt"}:8: layer "user" (type Python)' in head[0], head[0]
    assert "sys.exit('leaving early')" in head[0] and "forward" in head[0], head[0]
    # the user's own traceback follows, rank-tagged
    assert "[rank 1/3] SystemExit: leaving early" in proc.stderr, show(proc)
    assert 'audit_user_layer.py", line 26, in forward' in proc.stderr, show(proc)


def test_collective_timeout_in_pycaffe_test(tmp_path: Path) -> None:
    """``pycaffe-mpi test`` takes --collective_timeout too: a rank stuck in its 3rd forward."""
    write_job(tmp_path, USER_LAYER.replace("MODE", "stall"))
    proc, seconds = mpiexec([SCRIPT, "test", "--model", str(tmp_path / "net.prototxt"),
                             "--iterations", "5", "--collective_timeout", "2"], tmp_path,
                            env=user_env(tmp_path))
    assert proc.returncode != 0, show(proc)
    assert seconds < LIMIT_S, f"took {seconds:.1f} s\n{show(proc)}"
    lines = [ln for ln in proc.stderr.splitlines() if "error: collective timeout" in ln]
    assert lines and lines[0].startswith(("[rank 0/3]", "[rank 2/3]")), show(proc)
    assert "rank 1 never arrived" in lines[0], lines[0]


def test_a_signal_to_one_rank_reaches_every_rank(tmp_path: Path) -> None:
    """SIGHUP to rank 2 alone snapshots every rank, SIGINT to rank 1 alone stops them all (the
    ranks act together at the end of an iteration; before, only rank 0's signals counted)."""
    solver = write_job(tmp_path, USER_LAYER.replace("MODE", "signals"))
    solver.write_text(solver.read_text().replace("max_iter: 6", "max_iter: 1000").replace(
        "test_interval: 3", "test_interval: 1000"))
    proc, _ = mpiexec([SCRIPT, "train", "--solver", str(solver), "--sighup_effect",
                       "snapshot"], tmp_path, env=user_env(tmp_path))
    assert proc.returncode == 0, show(proc)
    assert "Optimization stopped early." in proc.stderr, show(proc)
    snapshots = sorted(p.name for p in tmp_path.glob("snap_iter_*.caffemodel"))
    # the SIGHUP in iteration 2's forward: snapshot 3; the SIGINT in iteration 5's: stop at 6
    assert snapshots == [f"snap_iter_{i}_rank_{r}.caffemodel" for i in (3, 6)
                         for r in range(3)], (snapshots, show(proc))


def test_ensemble_over_ranks_names_every_member_output(tmp_path: Path) -> None:
    net = tmp_path / "single.prototxt"
    net.write_text(NET.split('layer { name: "bcast"')[0].replace(' include { mpi_rank: 0 }', '')
                   + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
                   '  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }\n'
                   'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" '
                   'top: "loss" }\n'
                   'layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" '
                   'top: "accuracy" include { phase: TEST } }\n')
    solver = tmp_path / "single_solver.prototxt"
    solver.write_text(SOLVER.format(net=net, prefix=tmp_path / "single").replace(
        "test_interval: 3", "test_interval: 3 snapshot: 6"))
    gen = subprocess.run([SCRIPT, "ensemble", "--model", str(net), "--solver", str(solver),
                          "--output_dir", "ens", "--members", "3", "--loss", "mcl", "--k", "1",
                          "--ranks", "3"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert gen.returncode == 0, show(gen)
    command = [ln for ln in gen.stdout.splitlines() if ln.startswith("train with: ")]
    assert command, show(gen)
    words = shlex.split(command[0].removeprefix("train with: "))
    assert words[1:3] == ["-n", "3"], words
    t0 = time.monotonic()
    run = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, show(run)
    assert time.monotonic() - t0 < 60
    members = [f"member_{kind}_{m}" for kind in ("loss", "assigned", "accuracy")
               for m in range(3)]
    test_lines = [ln for ln in run.stderr.splitlines() if "Test net output #" in ln]
    for name in members:
        assert sum(f": {name} = " in ln for ln in test_lines) == 3, (name, show(run))
    # the results file: one line per display and test pass, every output by name
    rows = [json.loads(ln) for ln in (tmp_path / "ens" / "ens_results.jsonl").open()]
    assert not list((tmp_path / "ens").glob("*_rank_*_results.jsonl"))  # no outputs there
    assert [(r["kind"], r["iter"]) for r in rows if r["kind"] == "test"] == \
        [("test", 0), ("test", 3), ("test", 6)]
    assert [r["iter"] for r in rows if r["kind"] == "train"] == list(range(7))
    for r in rows:
        assert r["rank"] == 0 and r["seconds"] >= 0
        assert r["kind"] == "test" or r["lr"] == 0.01  # as written, not float32's 0.00999...
        assert set(members[:6]) <= set(r["outputs"]), r
    for r in rows:
        if r["kind"] == "test":
            assert set(members) | {"oracle_accuracy", "ensemble_accuracy"} <= set(r["outputs"])
    # parse-log keeps every member as its own column
    log = tmp_path / "train.log"
    log.write_text(run.stderr)
    parsed = subprocess.run([SCRIPT, "parse-log", str(log), "-o", "csv"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert parsed.returncode == 0, show(parsed)
    header = (tmp_path / "csv" / "train.log.test").read_text().splitlines()[0].split(",")
    assert set(members) <= set(header), header
    assert len((tmp_path / "csv" / "train.log.test").read_text().splitlines()) == 4
    # the generated net drawn per rank: one cluster each, the comm layers dashed between them
    drawn = subprocess.run([SCRIPT, "draw", "--model", "ens/train_test.prototxt", "--all-ranks",
                            "-o", "net.dot"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert drawn.returncode == 0, show(drawn)
    dot = (tmp_path / "net.dot").read_text()
    assert all(f"cluster_rank{r}" in dot for r in range(3)) and "cluster_rank3" not in dot
    assert dot.count("dashed") >= 4, dot  # broadcast to ranks 1, 2; gather from ranks 1, 2


def test_every_rank_with_outputs_writes_its_results(tmp_path: Path) -> None:
    """Three independent nets, a loss and an accuracy on each rank: rank 0's results file
    as in a single process, ranks 1 and 2 in files named as their snapshots are."""
    net = tmp_path / "own.prototxt"
    net.write_text(NET.split('layer { name: "bcast"')[0].replace(" include { mpi_rank: 0 }", "")
                   + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
                   '  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }\n'
                   'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" '
                   'top: "loss" }\n'
                   'layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" '
                   'top: "accuracy" include { phase: TEST } }\n')
    solver = tmp_path / "own_solver.prototxt"
    solver.write_text(SOLVER.format(net=net, prefix=tmp_path / "own"))
    proc, _ = mpiexec([SCRIPT, "train", "--solver", str(solver)], tmp_path)
    assert proc.returncode == 0, show(proc)
    for rank, name in enumerate(("own_results.jsonl", "own_rank_1_results.jsonl",
                                 "own_rank_2_results.jsonl")):
        rows = [json.loads(ln) for ln in (tmp_path / name).open()]
        assert {r["rank"] for r in rows} == {rank}, rows
        assert [r["iter"] for r in rows if r["kind"] == "train"] == list(range(7))
        assert [r["iter"] for r in rows if r["kind"] == "test"] == [0, 3, 6]
        assert all(set(r["outputs"]) >= {"loss", "accuracy"} for r in rows
                   if r["kind"] == "test"), rows
