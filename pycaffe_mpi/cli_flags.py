"""Caffe's flags for ``pycaffe-mpi``: which command reads which, their help, and gflags'
spellings.

:data:`CAFFE_FLAGS` holds every flag of Caffe's ``tools/caffe.cpp`` with its default;
:data:`CAFFE_USES` the flags each Caffe command reads (help worded per command where the generic
text is vague); :func:`add_caffe_flags` adds them to a command's parser, the others hidden
(gflags accepts every flag with every command). :func:`gflags_argv` rewrites gflags' spellings
(``-solver x``, ``-gpu=0``, flags before the command) as argparse expects them. The parser
itself and the commands are :mod:`pycaffe_mpi.cli`'s.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any

EFFECTS = ("stop", "snapshot", "none")

ENVIRONMENT = """\
environment:
  Under an MPI launcher (mpiexec), unless you set them yourself:
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS = cores / ranks on the node
    MPIR_CVAR_ENABLE_HEAVY_YIELD=1   (MPICH: waiting ranks yield the CPU instead of spinning)
  Otherwise pycaffe-mpi reads no environment variables of its own.
"""

# -- Caffe's flags ---------------------------------------------------------------------------
# Every flag of tools/caffe.cpp, with its default; the help text may be worded per command.
CAFFE_FLAGS: dict[str, dict[str, Any]] = {
    "solver": {"default": "", "help": "the solver prototxt"},
    "model": {"default": "", "help": "the net prototxt"},
    "phase": {"default": "", "help": "TRAIN or TEST: the phase of the net"},
    "level": {"type": int, "default": 0, "help": "the NetState level (default 0)"},
    "stage": {"default": "", "help": "comma-separated NetState stages"},
    "snapshot": {"default": "", "help": "a .solverstate to resume training from"},
    "weights": {"default": "", "help": "comma-separated .caffemodel files"},
    "gpu": {"default": "", "help": "a GPU id to run on; empty means the CPU; 'all': each MPI "
                                   "rank takes a GPU (local rank mod GPUs on its node)"},
    "iterations": {"type": int, "default": 50, "help": "the number of batches (default 50)"},
    "sigint_effect": {"default": "stop", "choices": EFFECTS,
                      "help": "what Ctrl-C does while training (default stop)"},
    "sighup_effect": {"default": "snapshot", "choices": EFFECTS,
                      "help": "what SIGHUP does while training (default snapshot); under "
                              "MPI a signal to any one rank acts on every rank"},
}

# The flags each Caffe command reads, with help worded for it where the generic text is vague.
CAFFE_USES: dict[str, dict[str, str | None]] = {
    "train": {"solver": None, "snapshot": None,
              "weights": "comma-separated .caffemodel files to finetune from; exclusive with "
                         "--snapshot",
              "gpu": "a GPU id to run on (overrides the solver's solver_mode); empty means the "
                     "CPU unless the solver says GPU; 'all': each MPI rank takes a GPU (local "
                     "rank mod GPUs on its node)",
              "level": "the NetState level of the train net (default 0)",
              "stage": "comma-separated NetState stages of the train net",
              "sigint_effect": None, "sighup_effect": None},
    "test": {"model": None, "weights": "comma-separated .caffemodel files to test",
             "phase": "TRAIN or TEST: the phase of the net (default TEST)", "level": None,
             "stage": None, "gpu": None,
             "iterations": "the number of batches to score (default 50)"},
    "time": {"model": None, "phase": "TRAIN or TEST: the phase of the net (default TRAIN)",
             "level": None, "stage": None, "gpu": None,
             "iterations": "the number of forward-backward passes timed (default 50)"},
    "device_query": {"gpu": "comma-separated GPU ids to query, or all (default: all)"},
}

DESCRIPTIONS = {
    "train": "Train or finetune a model: the solver prototxt names the net and the schedule. "
             "Snapshots are <snapshot_prefix>_iter_<N>.caffemodel/.solverstate (with "
             "_rank_<R> under MPI) and the results, one JSON line per display and test pass, "
             "<snapshot_prefix>_results.jsonl.",
    "test": "Score a model: run --iterations batches of the net's --phase (default TEST) and "
            "print the mean of every output. An ensemble's oracle assignment is written beside "
            "the --weights file (<weights without extension>_<layer>_assignment.csv|.png); "
            "without --weights it is only logged.",
    "time": "Benchmark a model's execution time: forward and backward milliseconds per layer "
            "and per pass, as caffe time prints them.",
    "device_query": "Show the CPU array library and each GPU's properties.",
    "ensemble": "Write an ensemble or TreeNet of a single model: OUTPUT_DIR/train_test.prototxt "
                "and, with --solver, OUTPUT_DIR/solver.prototxt, then print the command that "
                "trains it.",
    "upgrade-net": "Upgrade a net from an old format (V0 or V1 'layers', net-level input "
                   "fields, old data transformation fields, old BatchNorm params) to the "
                   "current one. A text prototxt gives a text prototxt; a binary NetParameter "
                   "(.caffemodel, judged by content) gives a binary one.",
    "upgrade-solver": "Upgrade a solver prototxt's deprecated solver_type enum to the type "
                      "string.",
}

SUMMARIES = {
    "train": "train or finetune a model",
    "test": "score a model",
    "time": "benchmark a model's execution time",
    "device_query": "show device information",
    "ensemble": "write an ensemble or TreeNet of a single model's net and solver",
    "upgrade-net": "upgrade a net prototxt or .caffemodel to the current format",
    "upgrade-solver": "upgrade a solver prototxt to the current format",
}

class HelpFormatter(argparse.HelpFormatter):
    """Wraps paragraphs (descriptions) and keeps indented lines as written (the environment
    table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith(" ") else
                         textwrap.fill(line, width, initial_indent=indent,
                                       subsequent_indent=indent)
                         for line in text.splitlines())


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def add_caffe_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags ``command`` reads, shown in its help; Caffe's other flags hidden (gflags
    accepts them with every command; :func:`pycaffe_mpi.cli._warn_unused` says they are ignored)."""
    uses = CAFFE_USES[command]
    for name, spec in CAFFE_FLAGS.items():
        if name in uses:
            p.add_argument(f"--{name}", **{**spec, "help": uses[name] or spec["help"]})
        else:
            p.add_argument(f"--{name}", **{**spec, "default": argparse.SUPPRESS,
                                           "help": argparse.SUPPRESS})
    p.set_defaults(unused_flags=tuple(n for n in CAFFE_FLAGS if n not in uses))


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s[2:]: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def command_index(argv: Sequence[str], subs: dict[str, argparse.ArgumentParser]) -> int:
    """Where the command is in ``argv`` when flags may come before it (gflags reads flags
    anywhere); -1 when there is none, or a top-level option (--help, --version) comes first."""
    options: dict[str, argparse.Action] = {}
    for name in CAFFE_USES:
        options.update(long_options(subs[name]))
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in subs:
            return i
        if not a.startswith("-") or a.lstrip("-") in ("h", "help", "version"):
            return -1
        name, has_value = a.lstrip("-").split("=", 1)[0], "=" in a
        action = options.get(name)
        i += 1 if has_value or (action is not None and action.nargs == 0) else 2
    return -1


def gflags_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """gflags' spellings in argparse's for ``parser``: ``-solver x`` becomes ``--solver x`` and
    flags given before the command move after it."""
    subs = subparsers(parser)
    out = list(argv)
    i = command_index(out, subs)
    if i > 0:
        out = [out[i], *out[:i], *out[i + 1:]]
    target = subs[out[0]] if out and out[0] in subs else parser
    names = long_options(target)
    for j, a in enumerate(out):
        if (a.startswith("-") and not a.startswith("--") and len(a) > 2
                and a[1:].split("=", 1)[0] in names):
            out[j] = "-" + a
    return out
