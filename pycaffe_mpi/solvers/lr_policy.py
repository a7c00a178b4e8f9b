"""Learning-rate policies (Caffe's ``SGDSolver::GetLearningRate``).

``it`` is the solver's iteration counter (the number of updates done so far). Every policy reads
``base_lr`` and some of ``gamma``, ``power``, ``stepsize``, ``stepvalue`` and ``max_iter``:

============  =====================================================================
fixed         base_lr
step          base_lr · gamma^floor(it / stepsize)
exp           base_lr · gamma^it
inv           base_lr · (1 + gamma·it)^(−power)
multistep     base_lr · gamma^s, s = number of ``stepvalue`` entries reached so far
poly          base_lr · (1 − it/max_iter)^power
sigmoid       base_lr · 1 / (1 + exp(−gamma·(it − stepsize)))
============  =====================================================================

``current_step`` is solver state (saved in the ``.solverstate``): "step" sets it to
``it // stepsize``, "multistep" advances it by one when ``it >= stepvalue[current_step]``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pycaffe_mpi import errors

LOG = logging.getLogger("pycaffe_mpi")

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise errors.SolverError(msg)


def learning_rate(param: Any, it: int, current_step: int, log: bool = True) -> tuple[float, int]:
    """The rate for iteration ``it`` and the new ``current_step``.

    Args:
        param: the ``SolverParameter``.
        it: the current iteration (updates already applied).
        current_step: the solver's step counter before this call.
        log: log Caffe's "MultiStep Status" line when multistep advances.

    Returns:
        ``(rate, current_step)``; only "step" and "multistep" change ``current_step``.

    Raises:
        SolverError: an unknown policy, or a field out of range (Caffe's CHECKs).
    """
    policy = param.lr_policy
    base_lr = float(param.base_lr)
    gamma = float(param.gamma)
    if policy in ("step", "exp", "inv", "multistep", "sigmoid"):
        _check(gamma >= 0, f'lr_policy "{policy}" needs gamma >= 0, got {gamma:g}')
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        _check(param.stepsize > 0,
               f'lr_policy "step" needs stepsize > 0, got {param.stepsize}')
        current_step = it // param.stepsize
        rate = base_lr * _pow(gamma, current_step)
    elif policy == "exp":
        rate = base_lr * _pow(gamma, it)
    elif policy == "inv":
        rate = base_lr * _pow(1.0 + gamma * it, -float(param.power))
    elif policy == "multistep":
        # NOTE: one step per call, as Caffe: a restored run resumes with its saved current_step.
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            if log:
                LOG.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        rate = base_lr * _pow(gamma, current_step)
    elif policy == "poly":
        _check(param.max_iter > 0, f'lr_policy "poly" needs max_iter > 0, got {param.max_iter}')
        frac = 1.0 - it / float(param.max_iter)
        rate = base_lr * _pow(frac, float(param.power))
    elif policy == "sigmoid":
        _check(param.stepsize > 0,
               f'lr_policy "sigmoid" needs stepsize > 0, got {param.stepsize}')
        rate = base_lr / (1.0 + _exp(-gamma * (it - param.stepsize)))
    else:
        hint = errors.did_you_mean(policy, POLICIES)
        raise errors.SolverError(
            f'Unknown learning rate policy: "{policy}"{hint} (known: {", ".join(POLICIES)})')
    return float(rate), current_step


def _pow(base: float, exponent: float) -> float:
    """C's ``pow``: a negative base with a fractional exponent gives NaN, not a complex."""
    try:
        return math.pow(base, exponent)
    except (ValueError, OverflowError):
        return math.nan if base < 0 else math.inf


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
