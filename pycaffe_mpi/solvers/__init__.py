"""Solvers: learning-rate policies, update rules and the Caffe train loop.

``Solver(path_or_param)`` (or pycaffe's ``SGDSolver`` … ``AdamSolver`` and ``get_solver``)
trains the net a solver prototxt names; see :mod:`pycaffe_mpi.solvers.solver`. Run-time
trust: :mod:`~pycaffe_mpi.solvers.agreement` (MPI ranks agree on the iteration schedule),
:mod:`~pycaffe_mpi.solvers.nonfinite` (stop on a NaN/Inf loss, naming the first non-finite
layer), :mod:`~pycaffe_mpi.solvers.testing` (the one test-pass averaging path, also used by
``pycaffe-mpi test``).
"""

from __future__ import annotations

from pycaffe_mpi.solvers import testing
from pycaffe_mpi.solvers.lr_policy import POLICIES, learning_rate
from pycaffe_mpi.solvers.nonfinite import NonFiniteError
from pycaffe_mpi.solvers.rules import RULES, UpdateRule, make_rule, solver_type
from pycaffe_mpi.solvers.solver import (
    SOLVER_CLASSES,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    Solver,
    get_solver,
    read_solver_param,
)

__all__ = [
    "POLICIES",
    "RULES",
    "SOLVER_CLASSES",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "NesterovSolver",
    "NonFiniteError",
    "RMSPropSolver",
    "SGDSolver",
    "Solver",
    "UpdateRule",
    "get_solver",
    "learning_rate",
    "make_rule",
    "read_solver_param",
    "solver_type",
    "testing",
]
