"""The `pycaffe-mpi` command line as a whole: the command list, --version, each subcommand's
--help, Caffe's single-dash flags, and the commands that read what a run leaves (parse-log,
plot) or draw a net (draw); the ensemble generator's train command, run as printed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pycaffe_mpi
from pycaffe_mpi import cli, cli_tools, datasets
from pycaffe_mpi.reports import parse_log, plot, results
from pycaffe_mpi.testing import mpirun

REPO = Path(__file__).resolve().parents[2]
MCL_NET = REPO / "models" / "cifar10_mcl" / "train_test.prototxt"

NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.01 }} data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.01 }} data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 6 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
SOLVER = """net: "{net}"
base_lr: 0.05 momentum: 0.9 lr_policy: "step" gamma: 0.5 stepsize: 4 max_iter: 6 display: 2
test_iter: 2 test_interval: 3 snapshot_prefix: "{prefix}" random_seed: 5 solver_mode: CPU
"""

# A BVLC Caffe log (caffe train, glog heads with solver.cpp / sgd_solver.cpp tags).
CAFFE_LOG = """\
I0305 10:00:00.000000 4242 caffe.cpp:218] Using GPUs 0
I0305 10:00:01.000000 4242 solver.cpp:337] Solving LeNet
I0305 10:00:01.000100 4242 solver.cpp:338] Learning Rate Policy: inv
I0305 10:00:01.500000 4242 solver.cpp:398] Iteration 0, Testing net (#0)
I0305 10:00:02.000000 4242 solver.cpp:465]     Test net output #0: accuracy = 0.0875
I0305 10:00:02.000000 4242 solver.cpp:465]     Test net output #1: loss = 2.3 (* 1 = 2.3 loss)
I0305 10:00:02.250000 4242 solver.cpp:218] Iteration 0 (0 iter/s, 1.2s/100 iters), loss = 2.31
I0305 10:00:02.250000 4242 solver.cpp:237]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I0305 10:00:02.250000 4242 sgd_solver.cpp:105] Iteration 0, lr = 0.01
I0305 10:00:04.000000 4242 solver.cpp:218] Iteration 100 (57 iter/s, 1.75s/100 iters), loss = 0.2
I0305 10:00:04.000000 4242 solver.cpp:237]     Train net output #0: loss = 0.2 (* 1 = 0.2 loss)
I0305 10:00:04.000000 4242 sgd_solver.cpp:105] Iteration 100, lr = 0.00992565
I0305 10:00:05.000000 4242 solver.cpp:398] Iteration 200, Testing net (#0)
I0305 10:00:06.000000 4242 solver.cpp:465]     Test net output #0: accuracy = 0.9712
I0305 10:00:06.000000 4242 solver.cpp:465]     Test net output #1: loss = 0.09 (* 1 = 0.09 loss)
I0305 10:00:06.000000 4242 solver.cpp:315] Optimization Done.
"""

# what each command's --help must show: its own flags (Caffe's where it is Caffe's command)
HELP_SHOWS = {
    "train": ["--solver", "--snapshot", "--weights", "--gpu", "--sigint_effect", "--same_seed"],
    "test": ["--model", "--weights", "--iterations", "--phase", "--gpu"],
    "time": ["--model", "--iterations", "--phase", "--gpu"],
    "device_query": ["--gpu"],
    "ensemble": ["--model", "--solver", "--members", "--split", "--loss", "--output_dir"],
    "upgrade-net": ["IN", "OUT"],
    "upgrade-solver": ["IN", "OUT"],
    "parse-log": ["LOG", "--output-dir", "--delimiter"],
    "plot": ["RUN", "--output", "--x", "--label"],
    "draw": ["--model", "--rank", "--all-ranks", "--phase", "--output"],
    "assignment": ["CSV", "--output", "--labels", "--iteration"],
}
# flags a command's --help must not show (another command's, or a Caffe flag it ignores)
HELP_HIDES = {"train": ["--model", "--iterations", "--members"],
              "device_query": ["--solver", "--iterations"], "test": ["--solver", "--snapshot"]}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    datasets.write_datum_lmdb(tmp_path / "db", rng.integers(0, 256, (16, 2, 3, 3), np.uint8),
                              rng.integers(0, 3, 16))
    (tmp_path / "net.prototxt").write_text(NET.format(db=tmp_path / "db"))
    (tmp_path / "solver.prototxt").write_text(SOLVER.format(net=tmp_path / "net.prototxt",
                                                            prefix=tmp_path / "run" / "tiny"))
    return tmp_path


def png_pixels(path: Path) -> np.ndarray:
    """The PNG as a grey-level array, after checking it is an image of a readable size with
    something drawn on it."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    h, w = grey.shape
    assert w >= 300 and h >= 200, (w, h)
    assert (grey < 200).mean() > 0.005 and grey.std() > 10, "blank image"
    return grey


# -- the command line ------------------------------------------------------------------------


def test_bare_command_lists_the_commands(capsys: pytest.CaptureFixture) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pycaffe-mpi")
    for command in cli.COMMANDS:
        assert f"\n    {command} " in out or f"\n    {command}\n" in out, command


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version(flag: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([flag])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"pycaffe-mpi {pycaffe_mpi.__version__}\n"


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_each_command_has_its_own_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pycaffe-mpi {command} ")
    for word in HELP_SHOWS[command]:
        assert word in out, word
    for word in HELP_HIDES.get(command, []):
        assert f"{word} " not in out, word


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "pycaffe-mpi"
    if not script.is_file():
        pytest.skip("the pycaffe-mpi console script is not installed beside this Python")
    out = subprocess.run([str(script), "plot", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: pycaffe-mpi plot ")


def test_single_dash_flags_as_gflags_reads_them() -> None:
    parser = cli.build_parser()

    def parse(*argv: str):
        return parser.parse_args(cli.normalise_argv(argv, parser))

    a = parse("train", "-solver", "s.prototxt", "-weights=a.caffemodel,b.caffemodel", "-gpu",
              "0", "-sigint_effect", "none", "-level", "2", "-stage=x,y")
    assert (a.solver, a.weights, a.gpu, a.sigint_effect, a.level, a.stage) == \
        ("s.prototxt", "a.caffemodel,b.caffemodel", "0", "none", 2, "x,y")
    a = parse("test", "-model", "m", "-iterations", "7", "-phase", "TRAIN", "--weights", "w")
    assert (a.command, a.model, a.iterations, a.phase, a.weights) == ("test", "m", 7, "TRAIN",
                                                                      "w")
    # gflags reads flags anywhere: before the command too
    a = parse("-gpu", "1", "--same_seed", "train", "-solver", "s")
    assert (a.command, a.gpu, a.solver, a.same_seed) == ("train", "1", "s", True)
    a = parse("-log_level=DEBUG", "device_query")
    assert (a.command, a.log_level) == ("device_query", "DEBUG")
    # short options of the file tools stay short; their single-dash long forms work too
    a = parse("plot", "a.log", "b.jsonl", "-o", "c.png", "-x", "seconds", "-title", "T")
    assert (a.runs, a.output, a.x, a.title) == (["a.log", "b.jsonl"], "c.png", "seconds", "T")
    a = parse("draw", "-model", "m", "-all-ranks", "-phase", "test", "-o", "n.svg")
    assert (a.model, a.all_ranks, a.phase, a.output) == ("m", True, "TEST", "n.svg")
    assert parse("parse-log", "x.log", "-o", "d").output_opt == "d"


def test_flags_of_other_commands_are_refused(capsys: pytest.CaptureFixture) -> None:
    for argv in (["train", "--members", "3"], ["plot", "x", "-o", "y", "--solver", "s"],
                 ["ensemble", "--snapshot", "s"], ["nosuchcommand"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    assert "invalid choice: 'nosuchcommand'" in capsys.readouterr().err


def test_a_caffe_flag_a_command_ignores_warns(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["device_query", "-iterations", "5", "--solver", "s"]) == 0
    err = capsys.readouterr().err
    assert "--iterations is not used by device_query" in err
    assert "--solver is not used by device_query" in err


# -- parse-log and plot ----------------------------------------------------------------------


def test_parse_log_reads_a_bvlc_caffe_log(tmp_path: Path) -> None:
    log = tmp_path / "caffe.log"
    log.write_text(CAFFE_LOG)
    assert cli.main(["parse-log", str(log), "-o", str(tmp_path / "out")]) == 0
    train = (tmp_path / "out" / "caffe.log.train").read_text().splitlines()
    test = (tmp_path / "out" / "caffe.log.test").read_text().splitlines()
    assert train[0] == "NumIters,Seconds,LearningRate,loss"
    assert [r.split(",")[0] for r in train[1:]] == ["0", "100"]
    assert train[2].split(",")[1:] == ["3.0", "0.00992565", "0.2"]  # 3 s after "Solving"
    assert test[0] == "NumIters,Seconds,LearningRate,accuracy,loss"
    assert test[2].split(",") == ["200", "5.0", "0.00992565", "0.9712", "0.09"]
    # Caffe's positional OUTPUT_DIR works as well
    assert cli.main(["parse-log", str(log), str(tmp_path / "pos")]) == 0
    assert (tmp_path / "pos" / "caffe.log.train").read_text().splitlines() == train


def test_parse_log_on_own_log_and_results_then_plot(run_dir: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "-solver", str(run_dir / "solver.prototxt")]) == 0
    log = run_dir / "train.log"
    log.write_text(capsys.readouterr().err)
    jsonl = run_dir / "run" / "tiny_results.jsonl"
    assert jsonl.is_file(), "the solver wrote no results file"
    records = results.read_results(jsonl)
    assert {r["kind"] for r in records} == {"train", "test"}

    tables = {}
    for src in (log, jsonl):
        out = run_dir / f"csv_{src.suffix[1:]}"
        assert cli.main(["parse-log", str(src), "-o", str(out)]) == 0
        tables[src] = [parse_log.read_csv(out / f"{src.name}.{which}")
                       for which in ("train", "test")]
    # the log and the results file give the same tables (the log's numbers are rounded); the
    # results file also keeps the last iteration's loss, which the log shows without outputs
    (log_train, log_test), (train, test) = tables[log], tables[jsonl]
    assert [r["NumIters"] for r in log_train] == [0, 2, 4]
    assert [r["NumIters"] for r in train] == [0, 2, 4, 6]
    assert [r["NumIters"] for r in log_test] == [r["NumIters"] for r in test] == [0, 3, 6]
    for from_log, from_json in ((log_train, train), (log_test, test)):
        for a, b in zip(from_log, from_json):
            for name in ("loss", "accuracy"):
                if name in a or name in b:
                    assert a[name] == pytest.approx(b[name], rel=1e-4), name
    assert [r["LearningRate"] for r in log_train] == pytest.approx([0.05, 0.05, 0.025])

    png = run_dir / "curves.png"
    assert cli.main(["plot", str(log), str(jsonl), "-o", str(png), "--x", "seconds"]) == 0
    assert f"Wrote {png}" in capsys.readouterr().out
    png_pixels(png)


def write_ensemble_results(path: Path, members: int = 3) -> None:
    with results.ResultsWriter(path) as w:
        for it in range(0, 50, 10):
            w.write_train(it, 0.01, it / 10, {"loss": 2.0 / (1 + it)})
            acc = [0.2 + 0.01 * it + 0.05 * m for m in range(members)]
            w.write_test(it, it / 10 + 0.5, {"ensemble_accuracy": max(acc) + 0.02,
                                             "oracle_accuracy": min(1.0, sum(acc)),
                                             "member_accuracy": acc, "loss": 1.0 / (1 + it)})


def test_plot_an_ensemble_run_beside_a_plain_one(tmp_path: Path) -> None:
    ens = tmp_path / "mcl_results.jsonl"
    write_ensemble_results(ens)
    plain = tmp_path / "plain.log"
    plain.write_text(CAFFE_LOG)
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert cli.main(["plot", str(plain), "-o", str(one)]) == 0
    assert cli.main(["plot", str(plain), str(ens), "-o", str(two), "--label", "lenet",
                     "mcl"]) == 0
    # the ensemble run adds a panel: the figure grows
    assert png_pixels(two).shape[0] > png_pixels(one).shape[0]
    fig = plot.plot([plot.load_run(ens)], tmp_path / "three.png")
    ensemble_panel = fig.axes[-1]
    labels = [line.get_label() for line in ensemble_panel.get_lines()]
    assert sorted(labels) == ["ensemble mean", "member 0", "member 1", "member 2", "oracle"]


def test_plot_and_parse_log_errors_are_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert cli.main(["parse-log", str(empty)]) == 1
    assert cli.main(["plot", str(tmp_path / "missing.log"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2, err
    assert "no train or test outputs" in lines[0] and "missing.log" in lines[1]


# -- draw ------------------------------------------------------------------------------------


def test_draw_all_ranks_one_rank_and_dot(tmp_path: Path) -> None:
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot program is not installed")
    png = tmp_path / "net.png"
    assert cli.main(["draw", "--model", str(MCL_NET), "--all-ranks", "--phase", "TEST",
                     "-o", str(png)]) == 0
    png_pixels(png)
    svg = tmp_path / "rank1.svg"
    assert cli.main(["draw", "-model", str(MCL_NET), "--rank", "1", "-o", str(svg)]) == 0
    assert "<svg" in svg.read_text()
    dot = tmp_path / "net.dot"
    assert cli.main(["draw", "--model", str(MCL_NET), "--all-ranks", "-o", str(dot)]) == 0
    text = dot.read_text()
    assert all(f"cluster_rank{r}" in text for r in range(3)) and "dashed" in text


def test_draw_without_dot_writes_dot_and_says_how_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert cli.main(["draw", "--model", str(MCL_NET), "-o", str(tmp_path / "net.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "apt-get install graphviz" in err[0]
    assert (tmp_path / "net.dot").is_file() and not (tmp_path / "net.png").exists()


# -- the ensemble generator's train command --------------------------------------------------


def printed_command(capsys: pytest.CaptureFixture) -> list[str]:
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("train with: ")
    return shlex.split(line[len("train with: "):])


def check_program(word: str) -> None:
    """``word`` runs from the current directory: a path to an executable, or on PATH."""
    path = word if os.sep in word else shutil.which(word)
    assert path and os.path.isfile(path) and os.access(path, os.X_OK), word


def check_train_args(argv: list[str], cwd: Path) -> None:
    """``argv`` (what follows the program) parses as a train command naming existing files."""
    from pycaffe_mpi import prototxt

    parser = cli.build_parser()
    args = parser.parse_args(cli.normalise_argv(argv, parser))
    assert args.command == "train"
    solver = cwd / args.solver
    assert solver.is_file()
    assert (cwd / prototxt.read_solver(str(solver)).net).is_file()


def run_as_printed(words: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run the command, ending its whole process group if it outlives ``timeout``."""
    proc = subprocess.Popen(words, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(words, proc.returncode, out, err)


def test_ensemble_prints_a_train_command_that_runs_as_printed(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(run_dir)
    assert cli.main(["ensemble", "--model", "net.prototxt", "--solver", "solver.prototxt",
                     "--members", "2", "--output_dir", "ens"]) == 0
    words = printed_command(capsys)
    i = words.index("train")
    check_program(words[0])
    check_train_args(words[i:], run_dir)
    assert words[i - 2:i] == ["-m", "pycaffe_mpi.cli"] or i == 1
    out = run_as_printed(words, run_dir, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Optimization Done." in out.stderr
    # the run's results plot as an ensemble: ensemble-mean, oracle and one curve per member
    run = plot.load_run(run_dir / "ens" / "ens_results.jsonl")
    assert run.members() == ["member_accuracy_0", "member_accuracy_1"]
    assert cli.main(["plot", "ens/ens_results.jsonl", "-o", "ens.png"]) == 0
    png_pixels(run_dir / "ens.png")


@pytest.mark.mpi
def test_ensemble_over_ranks_prints_mpiexec_and_runs(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(run_dir)
    assert cli.main(["ensemble", "--model", "net.prototxt", "--solver", "solver.prototxt",
                     "--members", "2", "--ranks", "2", "--same_init", "--output_dir",
                     "placed"]) == 0
    words = printed_command(capsys)
    assert words[1:3] == ["-n", "2"] and words[-1] == "--same_seed"
    check_program(words[0])
    check_program(words[3])
    check_train_args(words[words.index("train"):], run_dir)
    reason = mpirun.mpi_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = run_as_printed(words, run_dir, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Optimization Done." in out.stderr


def test_train_command_is_plain_when_the_programs_are_on_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "pycaffe-mpi").is_file() or not (bin_dir / "mpiexec").is_file():
        pytest.skip("pycaffe-mpi or mpiexec is not installed beside this Python")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert cli_tools.train_command("a b/solver.prototxt", ranks=3) == \
        "mpiexec -n 3 pycaffe-mpi train --solver 'a b/solver.prototxt'"
    monkeypatch.setenv("PATH", "/nonexistent")
    cmd = cli_tools.train_command("s.prototxt", ranks=3)
    assert cmd.split()[0].endswith(os.path.join("bin", "mpiexec")), cmd
    assert cmd.split()[3].endswith(os.path.join("bin", "pycaffe-mpi")), cmd


# -- the documents' commands -----------------------------------------------------------------


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``pycaffe-mpi`` command in the shell blocks of the README and the models' readmes:
    (where, its words after ``pycaffe-mpi``)."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "models").glob("*/readme.md"))]:
        in_block = False
        lines = doc.read_text().splitlines()
        joined: list[tuple[int, str]] = []
        for n, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_block = line.strip() in ("```sh", "```bash", "```shell")
                continue
            if not in_block:
                continue
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((n, line.split("#", 1)[0].strip()))
        for n, text in joined:
            words = shlex.split(text) if "pycaffe-mpi " in text else []
            at = [i for i, w in enumerate(words) if os.path.basename(w) == "pycaffe-mpi"]
            if at:
                found.append((f"{doc.relative_to(REPO)}:{n}", words[at[0] + 1:]))
    return found


def test_documented_commands_parse_and_name_shipped_files() -> None:
    parser = cli.build_parser()
    commands = documented_commands()
    assert any(where.startswith("README.md") and argv[:1] == ["train"]
               for where, argv in commands), "the README shows no train command"
    for where, argv in commands:
        try:
            args = parser.parse_args(cli.normalise_argv(argv, parser))
        except SystemExit:
            pytest.fail(f"{where}: pycaffe-mpi {' '.join(argv)} does not parse")
        for flag in ("solver", "model"):
            value = getattr(args, flag, "") or ""
            for path in value.split(","):
                # files under models/ and solvers/ ship with the project; others are the user's
                if path.startswith(("models/", "solvers/")) and "<" not in path:
                    assert (REPO / path).is_file(), f"{where}: --{flag} {path} does not exist"


def test_assignment_command_draws_a_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pycaffe_mpi.reports import assignment

    csv = tmp_path / "ens_assignment.csv"
    share = np.array([[0.75, 0.1, 0.5], [0.25, 0.9, 0.5]])
    csv.write_text(assignment.assignment_csv(share))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nship\n")
    png = tmp_path / "fig" / "ens.png"
    assert cli.main(["assignment", str(csv), "--labels", str(labels), "-o", str(png)]) == 0
    assert f"Wrote {png}" in capsys.readouterr().out
    png_pixels(png)
    labels.write_text("cat\ndog\n")
    assert cli.main(["assignment", str(csv), "--labels", str(labels), "-o", str(png)]) == 1
    assert "2 class names for 3 classes" in capsys.readouterr().err
