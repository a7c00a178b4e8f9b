#!/usr/bin/env python
"""Run the paper's CIFAR10-Quick ensemble experiments and tabulate them beside its numbers.

Tables 1 (random init, bagging, combined), 3 (score- and probability-averaged losses),
4 (MCL with k = 1..4), 5 (MCL k = 1 fine-tuned from a cross-entropy ensemble pretrained for
100..4000 iterations), MCL + CE, and a TreeNet split sweep, all with four CIFAR10-Quick
members. Every experiment is a `pycaffe-mpi ensemble` net trained by `pycaffe-mpi train` in a
process of its own; --jobs processes run side by side with the cores shared between them.

By default every member is trained in the paper's own setting: CIFAR10-Quick at batch 350
(models/cifar10_quick/train_test_b350.prototxt) with models/cifar10_quick/solver_paper.prototxt
(5,000 iterations, lr 0.001 dropped x0.1 at 4,000). --solver picks another base solver (its
`net` is the single model unless --model names one), e.g. models/cifar10_quick/solver.prototxt
for BVLC's batch-100 net. --scale shrinks the schedule: max_iter, the learning-rate step and
the pretraining points are multiplied by it. --only keeps the named experiments of the chosen
tables (e.g. `--tables 1,4 --only random_init,mcl_k1`).
Each net is tested once, on the whole test set, at the end; its numbers are read from the
results file its solver writes (OUT/<run>/snap_results.jsonl, one JSON line per display and
test pass). Results go to OUT/results.csv (one row per experiment, trial and metric),
OUT/table.md (means and standard deviations over the trials beside the paper's numbers) and
OUT/plots/ (the oracle assignment heat maps, Fig. 2).
A finished experiment is not run again when the command is repeated with the same OUT.

Needs the CIFAR-10 LMDBs: run `python tools/get_cifar10.py` first.

Examples (what the README's tables were measured with):
    python tools/reproduce.py --tables 1,4 --only random_init,mcl_k1 --out runs/paper
    python tools/reproduce.py --solver models/cifar10_quick/solver.prototxt --scale 0.2 \
        --trials 2 --out runs/reproduce
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import _tool

from pycaffe_mpi import errors, prototxt
from pycaffe_mpi.ensemble import EnsembleSpec, write_ensemble
from pycaffe_mpi.reports import parse_log, results

REPO = Path(__file__).resolve().parent.parent
MEMBERS = 4
PRETRAIN_POINTS = (100, 500, 1000, 2000, 4000)
SPLITS = (("relu1", "conv1"), ("pool2", "conv2"), ("pool3", "conv3"), ("ip1", "ip1"))
PAPER_SOLVER = "models/cifar10_quick/solver_paper.prototxt"
METRICS = ("ensemble_accuracy", "score_mean_accuracy", "oracle_accuracy",
           "oracle_accuracy_authors", "member_accuracy")


@dataclasses.dataclass
class Experiment:
    """One row of a table: how to build it and what the paper reports for it."""

    key: str
    table: str
    label: str
    spec: EnsembleSpec | None  # None = the single base model
    paper: dict[str, float] = dataclasses.field(default_factory=dict)
    pretrain: int | None = None  # fine-tune from the random-init ensemble at this iteration


def experiments(tables: Sequence[str], scale: float = 1.0) -> list[Experiment]:
    """The experiments of the requested tables ("1", "3", "4", "5", "ce", "split")."""
    def ens(**kw: object) -> EnsembleSpec:
        return EnsembleSpec(members=MEMBERS, **kw)  # type: ignore[arg-type]

    out = [
        Experiment("single", "1", "single model", None, {"accuracy": 77.06}),
        Experiment("random_init", "1", "random init", ens(),
                   {"ensemble_accuracy": 80.72, "oracle_accuracy": 89.89}),
    ]
    if "1" in tables:
        out += [
            Experiment("bagging", "1", "bagging", ens(bagging=True, same_init=True),
                       {"ensemble_accuracy": 78.40, "oracle_accuracy": 89.94}),
            Experiment("combined", "1", "combined", ens(bagging=True),
                       {"ensemble_accuracy": 78.95, "oracle_accuracy": 89.28}),
        ]
    if "3" in tables:
        out += [
            Experiment("score_avg", "3", "score-averaged loss", ens(loss="score-avg"),
                       {"ensemble_accuracy": 79.32}),
            Experiment("prob_avg", "3", "probability-averaged loss", ens(loss="prob-avg"),
                       {"ensemble_accuracy": 77.10}),
        ]
    if "4" in tables:
        paper4 = {1: (28.38, 93.10), 2: (75.16, 92.78), 3: (79.76, 92.55), 4: (80.72, 89.78)}
        for k in (1, 2, 3, 4):
            out.append(Experiment(f"mcl_k{k}", "4", f"MCL k={k}", ens(loss="mcl", k=k),
                                  {"ensemble_accuracy": paper4[k][0],
                                   "oracle_accuracy": paper4[k][1]}))
    if "5" in tables:
        paper5 = (94.21, 94.21, 94.65, 95.75, 96.00)
        for p, oracle in zip(PRETRAIN_POINTS, paper5):
            label = f"MCL k=1 after {scaled(p, scale)} CE iterations (paper: {p})"
            out.append(Experiment(f"mcl_k1_pre{p}", "5", label,
                                  ens(loss="mcl", k=1), {"oracle_accuracy": oracle}, pretrain=p))
    if "ce" in tables:
        out.append(Experiment("mcl_ce", "ce", "MCL k=1 + CE (ce_weight 0.5)",
                              ens(loss="mcl", k=1, ce_weight=0.5),
                              {"ensemble_accuracy": 81.72}))
    if "split" in tables:
        for split, after in SPLITS:
            out.append(Experiment(f"treenet_{after}", "split",
                                  f"TreeNet sharing up to {after} (split at {split})",
                                  ens(split=split)))
    return out


# -- the schedule ---------------------------------------------------------------------------------


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def write_base_solver(base_solver: str, out: Path, scale: float, seed: int,
                      max_iter: int | None = None, checkpoint: int = 0,
                      test_interval: int = 0) -> Path:
    """The base solver with its schedule scaled, ``seed``, a test pass at the end (and every
    ``test_interval`` iterations) and a snapshot every ``checkpoint`` iterations (0: none)."""
    p = prototxt.read_solver(base_solver)
    full = p.max_iter
    p.max_iter = max_iter if max_iter is not None else scaled(full, scale)
    steps = [scaled(s, scale) for s in p.stepvalue]
    del p.stepvalue[:]
    p.stepvalue.extend(steps)
    if p.HasField("stepsize"):
        p.stepsize = scaled(p.stepsize, scale)
    p.test_interval = test_interval or scaled(full, scale)
    p.test_initialization = False
    p.snapshot = checkpoint
    p.display = max(1, min(p.display, scaled(full, scale) // 5))
    p.random_seed = seed
    p.snapshot_prefix = str(out / "snap")
    path = out / "base_solver.prototxt"
    path.write_text(str(p))
    return path


def rewrite_solver(path: Path, **fields: object) -> None:
    p = prototxt.read_solver(str(path))
    for name, value in fields.items():
        setattr(p, name, value)
    path.write_text(str(p))


# -- jobs -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    name: str
    cwd: Path
    args: list[str]
    log: Path
    after: list[str]
    done_marker: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0


def prepare(exp: Experiment, trial: int, args: object, out: Path) -> list[Job]:
    """Write an experiment's files and return its jobs (in dependency order)."""
    a = args  # argparse namespace
    d = out / f"{exp.key}_t{trial}"
    d.mkdir(parents=True, exist_ok=True)
    seed = 1000 + trial
    base_solver = write_base_solver(a.solver, d, a.scale, seed, checkpoint=a.checkpoint,
                                    test_interval=a.test_interval)
    train = [sys.executable, "-m", "pycaffe_mpi.cli", "train"]
    if exp.spec is None:
        rewrite_solver(base_solver, net=a.model)
        return [Job(exp.key + f"_t{trial}", REPO, [*train, "--solver", str(base_solver)],
                    d / "train.log", [], d / "done")]
    _, solver_path = write_ensemble(a.model, str(base_solver), str(d), exp.spec,
                                           name="train_test")
    assert solver_path is not None
    solver = Path(solver_path)
    rewrite_solver(solver, snapshot_prefix=str(d / "snap"))
    jobs = []
    if exp.key == "random_init" and "5" in a.tables:
        # the pretraining chain: the random-init run itself, stopped at each pretraining point
        # and resumed exactly from its snapshot, so every fine-tune starts from that run
        prev = None
        for p in sorted({scaled(x, a.scale) for x in PRETRAIN_POINTS}):
            stage = d / f"solver_to_{p}.prototxt"
            shutil.copy(solver, stage)
            rewrite_solver(stage, max_iter=p, test_interval=10 ** 9, snapshot_after_train=True)
            cmd = [*train, "--solver", str(stage)]
            if prev is not None:
                cmd += ["--snapshot", str(d / f"snap_iter_{prev}.solverstate")]
            jobs.append(Job(f"{exp.key}_t{trial}_to{p}", REPO, cmd, d / f"train_to{p}.log",
                            [jobs[-1].name] if jobs else [], d / f"done_to{p}"))
            prev = p
        cmd = [*train, "--solver", str(solver),
               "--snapshot", str(d / f"snap_iter_{prev}.solverstate")]
        jobs.append(Job(f"{exp.key}_t{trial}", REPO, cmd, d / "train.log", [jobs[-1].name],
                        d / "done"))
        return jobs
    cmd = [*train, "--solver", str(solver)]
    after = []
    if exp.pretrain is not None:
        p = scaled(exp.pretrain, a.scale)
        pre = out / f"random_init_t{trial}"
        cmd += ["--weights", str(pre / f"snap_iter_{p}.caffemodel")]
        after = [f"random_init_t{trial}_to{p}"]
    return [Job(f"{exp.key}_t{trial}", REPO, cmd, d / "train.log", after, d / "done")]


def run_jobs(jobs: list[Job], n_parallel: int) -> list[str]:
    """Run jobs, at most ``n_parallel`` at a time, respecting ``after``; returns failures."""
    threads = str(max(1, (os.cpu_count() or 1) // n_parallel))
    env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads, PYTHONPATH=str(REPO))
    pending = [j for j in jobs if not j.done_marker.exists()]
    for j in pending:
        _resume_from_checkpoint(j)
    done = {j.name for j in jobs if j.done_marker.exists()}
    failed: list[str] = []
    running: list[Job] = []
    while pending or running:
        for j in list(running):
            rc = j.proc.poll() if j.proc else None
            if rc is None:
                continue
            running.remove(j)
            took = time.monotonic() - j.started
            if rc == 0:
                j.done_marker.write_text(f"{took:.1f}\n")
                done.add(j.name)
                print(f"done   {j.name} ({took / 60:.1f} min)", flush=True)
            else:
                failed.append(j.name)
                print(f"FAILED {j.name} (exit {rc}; see {j.log})", flush=True)
        blocked = [j for j in pending if any(a in failed for a in j.after)]
        for j in blocked:
            pending.remove(j)
            failed.append(j.name)
            print(f"skip   {j.name} (a job it needs failed)", flush=True)
        for j in list(pending):
            if len(running) >= n_parallel:
                break
            if all(a in done for a in j.after):
                pending.remove(j)
                with open(j.log, "a" if "--snapshot" in j.args else "w") as fh:
                    j.proc = subprocess.Popen(j.args, cwd=j.cwd, env=env, stdout=fh,
                                              stderr=subprocess.STDOUT)
                j.started = time.monotonic()
                running.append(j)
                print(f"start  {j.name}", flush=True)
        time.sleep(0.5)
    return failed


def _resume_from_checkpoint(job: Job) -> None:
    """A job stopped part-way (``--checkpoint``) goes on from its latest snapshot."""
    if "--snapshot" in job.args:
        return
    states = sorted(job.log.parent.glob("snap_iter_*.solverstate"),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if states:
        job.args += ["--snapshot", str(states[-1])]
        print(f"resume {job.name} from {states[-1].name}", flush=True)


# -- results --------------------------------------------------------------------------------------


def final_test_outputs(run_dir: Path) -> dict[str, float]:
    """The last test pass of a run, output name -> value (an output with several elements is
    ``name_0 … name_{n-1}``).

    Read from the results file the solver writes beside its snapshots
    (``<snapshot_prefix>_results.jsonl``, here ``snap_results.jsonl``: rank 0, test net 0);
    a run without one (made before the solver wrote results files) has its log parsed instead.
    """
    path = run_dir / "snap_results.jsonl"
    if path.is_file():
        tests = [r for r in results.read_results(path)
                 if r["kind"] == "test" and r["rank"] == 0 and r["test_net"] == 0]
        return dict(tests[-1]["outputs"]) if tests else {}
    log = run_dir / "train.log"
    if not log.is_file():
        return {}
    _, test_rows = parse_log.parse_log(log)
    if not test_rows:
        return {}
    # columns tagged "@rank<r>" or "@test<i>" come from other ranks or test nets
    return {k: v for k, v in test_rows[-1].items()
            if k not in parse_log.FIXED_COLUMNS and "@" not in k}


def collect(exps: Sequence[Experiment], trials: int, out: Path) -> list[dict[str, object]]:
    rows = []
    for exp in exps:
        for t in range(trials):
            d = out / f"{exp.key}_t{t}"
            if not (d / "done").exists():
                continue
            for name, v in final_test_outputs(d).items():
                rows.append({"experiment": exp.key, "trial": t, "metric": name,
                             "value": 100 * v if "accuracy" in name else v})
            plots = out / "plots"
            for png in sorted(d.glob("*_assignment.png")):
                plots.mkdir(exist_ok=True)
                shutil.copy(png, plots / f"{exp.key}_t{t}_assignment.png")
    return rows


def _stat(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ±{sd:.2f}"


def table(exps: Sequence[Experiment], rows: list[dict[str, object]], header: str) -> str:
    """Markdown: one line per experiment, measured (mean ±sd over trials) beside the paper."""
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by.setdefault((str(r["experiment"]), str(r["metric"])), []).append(float(r["value"]))
    lines = [header, "",
             "| table | experiment | ensemble-mean | (paper) | mean-score | oracle | (paper) "
             "| authors' oracle | members |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in exps:
        def get(metric: str, key: str = e.key) -> list[float]:
            return by.get((key, metric), [])
        if e.spec is None:
            mean = _stat(get("accuracy"))
            members, score, oracle, authors = "—", "—", "—", "—"
        else:
            mean = _stat(get("ensemble_accuracy"))
            score = _stat(get("score_mean_accuracy"))
            oracle = _stat(get("oracle_accuracy"))
            authors = _stat(get("oracle_accuracy_authors"))
            members = " / ".join(_stat(get(f"member_accuracy_{i}"))
                                 for i in range(e.spec.members))
        p_mean = e.paper.get("ensemble_accuracy", e.paper.get("accuracy"))
        p_oracle = e.paper.get("oracle_accuracy")
        lines.append(f"| {e.table} | {e.label} | {mean} | {_p(p_mean)} | {score} | {oracle} "
                     f"| {_p(p_oracle)} | {authors} | {members} |")
    return "\n".join(lines) + "\n"


def _p(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="schedule scale: 1 = the paper's 5,000 iterations (default: 1)")
    ap.add_argument("--trials", type=int, default=1, help="trials per experiment (default: 1)")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                    help="training processes side by side (default: the number of cores)")
    ap.add_argument("--tables", default="1,3,4,5,ce,split",
                    help="which experiments: 1,3,4,5,ce,split (default: all)")
    ap.add_argument("--solver", default=PAPER_SOLVER,
                    help="the base solver (default: the paper's batch-350 schedule, "
                         f"{PAPER_SOLVER})")
    ap.add_argument("--model", default=None,
                    help="the single-model net the members are made from "
                         "(default: the base solver's net)")
    ap.add_argument("--only", default="",
                    help="comma-separated experiment keys to keep, e.g. random_init,mcl_k1 "
                         "(default: every experiment of the chosen tables)")
    ap.add_argument("--checkpoint", type=int, default=0, metavar="N",
                    help="snapshot every N iterations; a repeated command resumes an unfinished "
                         "run from its latest snapshot (default 0: no snapshots)")
    ap.add_argument("--test-interval", type=int, default=0, metavar="N",
                    help="also test every N iterations (default 0: once, at the end)")
    ap.add_argument("--out", default="runs/reproduce", help="output folder")
    ap.add_argument("--dry-run", action="store_true", help="write the files, run nothing")
    args = ap.parse_args(argv)
    args.tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    bad = [t for t in args.tables if t not in ("1", "3", "4", "5", "ce", "split")]
    if bad:
        ap.error(f"unknown table {bad[0]!r}; choose from 1,3,4,5,ce,split")
    if args.scale <= 0 or args.trials < 1 or args.jobs < 1:
        ap.error("--scale must be > 0, --trials and --jobs >= 1")
    if args.checkpoint < 0 or args.test_interval < 0:
        ap.error("--checkpoint and --test-interval must be >= 0")
    only = {k.strip() for k in args.only.split(",") if k.strip()}

    def body() -> int:
        os.chdir(REPO)
        if not args.dry_run and not (REPO / "data/cifar10/cifar10_train_lmdb").exists():
            raise errors.PycaffeError("no CIFAR-10 LMDBs under data/cifar10: run "
                                      "`python tools/get_cifar10.py` first")
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        if args.model is None:
            args.model = prototxt.read_solver(args.solver).net
        exps = experiments(args.tables, args.scale)
        if only:
            unknown = sorted(only - {e.key for e in exps})
            if unknown:
                raise errors.PycaffeError(
                    f"--only: no experiment {unknown[0]!r} in tables {','.join(args.tables)} "
                    f"(they have: {', '.join(e.key for e in exps)})")
            exps = [e for e in exps if e.key in only]
        jobs = [j for t in range(args.trials) for e in exps for j in prepare(e, t, args, out)]
        print(f"{len(jobs)} training runs, {args.jobs} at a time, in {out}", flush=True)
        if args.dry_run:
            return 0
        failed = run_jobs(jobs, args.jobs)
        rows = collect(exps, args.trials, out)
        with open(out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["experiment", "trial", "metric", "value"])
            w.writeheader()
            w.writerows(rows)
        cmd = " ".join(["python tools/reproduce.py", *(argv if argv is not None
                                                        else sys.argv[1:])])
        minutes = sum(float(j.done_marker.read_text()) for j in jobs
                      if j.done_marker.exists()) / 60
        base = prototxt.read_solver(args.solver)
        setting = ("the paper's setting" if Path(args.solver).resolve()
                   == (REPO / PAPER_SOLVER).resolve() else f"solver {args.solver}")
        header = (f"CIFAR10-Quick x{MEMBERS} ({setting}: net {args.model}), schedule scale "
                  f"{args.scale:g} ({scaled(base.max_iter, args.scale)} iterations), "
                  f"{args.trials} trial(s); "
                  f"accuracies in %. Command: `{cmd}`; {len(jobs)} training runs, "
                  f"{minutes:.0f} min of training in all, {args.jobs} at a time.")
        (out / "table.md").write_text(table(exps, rows, header))
        print((out / "table.md").read_text())
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    return _tool.run("reproduce", body)


if __name__ == "__main__":
    sys.exit(main())
