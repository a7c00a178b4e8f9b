#!/usr/bin/env python
"""Write the shipped ensemble nets and solvers from CIFAR10-Quick with the ensemble generator.

The files under models/cifar10_mcl/, models/cifar10_ensembles/ and solvers/cifar10_mcl.prototxt
are this tool's output (the same as `pycaffe-mpi ensemble` with the options listed in SETTINGS);
edit the settings here and rerun rather than editing the files. --check only compares.

Example:
    python tools/make_ensemble_models.py            # rewrite the files
    python tools/make_ensemble_models.py --check    # exit 1 if a file differs
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import _tool

from pycaffe_mpi import errors
from pycaffe_mpi.ensemble import EnsembleSpec, write_ensemble

REPO = Path(__file__).resolve().parent.parent
BASE_NET = "models/cifar10_quick/train_test.prototxt"
BASE_SOLVER = "models/cifar10_quick/solver.prototxt"

# folder -> the ensemble (four CIFAR10-Quick members, as in the paper's CIFAR-10 tables)
SETTINGS: dict[str, EnsembleSpec] = {
    "models/cifar10_mcl": EnsembleSpec(members=4, loss="mcl", k=1, ranks=3),
    "models/cifar10_ensembles/random_init": EnsembleSpec(members=4),
    "models/cifar10_ensembles/bagging": EnsembleSpec(members=4, bagging=True, same_init=True),
    "models/cifar10_ensembles/combined": EnsembleSpec(members=4, bagging=True),
    "models/cifar10_ensembles/score_avg": EnsembleSpec(members=4, loss="score-avg"),
    "models/cifar10_ensembles/prob_avg": EnsembleSpec(members=4, loss="prob-avg"),
    **{f"models/cifar10_ensembles/mcl_k{k}": EnsembleSpec(members=4, loss="mcl", k=k)
       for k in (1, 2, 3, 4)},
    "models/cifar10_ensembles/mcl_ce": EnsembleSpec(members=4, loss="mcl", k=1, ce_weight=0.5),
    "models/cifar10_ensembles/treenet_conv2": EnsembleSpec(members=4, split="pool2", ranks=3),
}
# the main job's solver lives under solvers/ (a copy of the generated one)
MAIN_SOLVER = ("models/cifar10_mcl/solver.prototxt", "solvers/cifar10_mcl.prototxt")


def generate(root: Path) -> list[Path]:
    """Write every setting's files under ``root`` (paths inside them stay repo-relative)."""
    written = []
    for folder, spec in SETTINGS.items():
        out = root / folder
        out.mkdir(parents=True, exist_ok=True)
        target = folder if root == REPO else str(out)
        for path in write_ensemble(BASE_NET, BASE_SOLVER, target, spec, name="train_test"):
            assert path is not None
            written.append(Path(path) if Path(path).is_absolute() else REPO / path)
            # paths inside the files stay repo-relative wherever they were written
            text = written[-1].read_text().replace(f"{root}/", "")
            written[-1].write_text(text)
    src, dst = MAIN_SOLVER
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    text = (root / src).read_text()
    (root / dst).write_text("# The main job: an MCL (k = 1) ensemble of four CIFAR10-Quick members "
                            "over 3 MPI ranks.\n# Written by tools/make_ensemble_models.py.\n"
                            + text)
    written.append(root / dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = _tool.parser(__doc__)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = ap.parse_args(argv)

    def body() -> int:
        import os

        os.chdir(REPO)
        if not args.check:
            for path in generate(REPO):
                print(path.relative_to(REPO))
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            stale = [p for p in generate(Path(tmp))
                     if not (REPO / p.relative_to(tmp)).exists()
                     or (REPO / p.relative_to(tmp)).read_text() != p.read_text()]
        for p in stale:
            print(f"out of date: {p.relative_to(tmp)}", file=sys.stderr)
        if stale:
            raise errors.PycaffeError("run python tools/make_ensemble_models.py")
        return 0

    return _tool.run("make_ensemble_models", body)


if __name__ == "__main__":
    sys.exit(main())
