"""Ensembles and TreeNets made from a single-model net (``pycaffe-mpi ensemble``).

:mod:`~pycaffe_mpi.ensemble.spec` says what to make (:class:`EnsembleSpec`);
:mod:`~pycaffe_mpi.ensemble.build` makes the net (trunk, member copies, loss head);
:mod:`~pycaffe_mpi.ensemble.placement` places it over MPI ranks with comm layers;
:mod:`~pycaffe_mpi.ensemble.files` writes the net and its solver and counts parameters.
The names below are the package's face.
"""

from __future__ import annotations

from pycaffe_mpi.ensemble.build import ACCURACY_LAYER, ACCURACY_TOPS, make_ensemble_net
from pycaffe_mpi.ensemble.files import (
    make_ensemble_solver,
    param_counts,
    parameters_line,
    write_ensemble,
)
from pycaffe_mpi.ensemble.spec import (
    AVERAGED_LOSSES,
    LOSSES,
    NORMALIZATIONS,
    EnsembleError,
    EnsembleSpec,
)

__all__ = [
    "ACCURACY_LAYER",
    "ACCURACY_TOPS",
    "AVERAGED_LOSSES",
    "LOSSES",
    "NORMALIZATIONS",
    "EnsembleError",
    "EnsembleSpec",
    "make_ensemble_net",
    "make_ensemble_solver",
    "param_counts",
    "parameters_line",
    "write_ensemble",
]
