"""Update rules: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta and Adam (Caffe's ``*Solver``
``ComputeUpdateValue``), with the shared steps of ``SGDSolver::ApplyUpdate`` around them.

One update, for learning rate ``rate`` at iteration ``it`` (Caffe's order):

1. clip: if ``clip_gradients >= 0`` and the global L2 norm ‖g‖ of all learnable diffs exceeds it,
   scale every diff by ``clip_gradients / ‖g‖``;
2. per parameter: divide the diff by ``iter_size`` (when > 1); regularise with
   ``λ = weight_decay · decay_mult`` (L2: ``g += λ·w``; L1: ``g += λ·sign(w)``);
   turn ``g`` into the step with the rule below, with ``lr = rate · lr_mult``;
3. ``w ← w − step`` for every parameter.

The rules (``h`` = history, all zero at start; ``δ`` = ``delta``):

* SGD:      ``h ← momentum·h + lr·g``; step = h.
* Nesterov: ``h' ← momentum·h + lr·g``; step = (1+momentum)·h' − momentum·h.
* AdaGrad:  ``h ← h + g²``; step = lr·g / (√h + δ)  (momentum must be 0).
* RMSProp:  ``h ← rms_decay·h + (1−rms_decay)·g²``; step = lr·g / (√h + δ)
  (momentum must be 0, 0 ≤ rms_decay < 1).
* AdaDelta (ρ = momentum): ``h_g ← ρ·h_g + (1−ρ)·g²``; ``u = g·√((h_u + δ)/(h_g + δ))``;
  ``h_u ← ρ·h_u + (1−ρ)·u²``; step = lr·u.
* Adam (β1 = momentum, β2 = momentum2, ε = δ, t = it + 1): ``m ← β1·m + (1−β1)·g``;
  ``v ← β2·v + (1−β2)·g²``; step = lr·√(1−β2^t)/(1−β1^t) · m/(√v + ε).

AdaDelta and Adam keep two history sets; :attr:`UpdateRule.history` lists all first-set arrays,
then all second-set arrays (the order of ``SolverState.history`` in a ``.solverstate``).

Everything works in place on the parameters' own ``xp`` arrays (NumPy or CuPy); the few
temporaries come from scratch buffers sized for the largest parameter and reused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from pycaffe_mpi import backend, errors, upgrade

LOG = logging.getLogger("pycaffe_mpi")

# Deprecated SolverParameter.solver_type enum values -> the `type` string (UpgradeSolverType).
SOLVER_TYPE_NAMES = upgrade.SOLVER_TYPE_NAMES
REGULARIZATION_TYPES = ("L2", "L1")


def solver_type(param: Any) -> str:
    """The update rule's name, honouring the deprecated ``solver_type`` enum
    (:func:`pycaffe_mpi.upgrade.solver_type_name`)."""
    return upgrade.solver_type_name(param)


def upgrade_solver_type(param: Any) -> bool:
    """Move a deprecated ``solver_type`` into ``type`` in place; True if it changed ``param``."""
    return upgrade.upgrade_solver_type(param)


class _Scratch:
    """Reusable temporaries: ``get(k, like)`` is a view of flat buffer k shaped like ``like``."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, Any], Any] = {}

    def get(self, k: int, like: Any) -> Any:
        key = (k, like.dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.size < like.size:
            xp = _xp_of(like)
            buf = xp.empty(like.size, dtype=like.dtype)
            self._bufs[key] = buf
        return buf[: like.size].reshape(like.shape)


def _xp_of(arr: Any) -> Any:
    return backend.get_array_module(arr)


class UpdateRule:
    """Plain SGD with momentum; the base of the other rules (Caffe's ``SGDSolver``).

    Attributes:
        history: the history arrays (``num_history_sets`` per parameter, set by set).
    """

    type: ClassVar[str] = "SGD"
    num_history_sets: ClassVar[int] = 1

    def __init__(self, param: Any) -> None:
        self.param = param
        self.momentum = float(param.momentum)
        self.delta = float(param.delta)
        self.weight_decay = float(param.weight_decay)
        self.regularization_type = param.regularization_type
        self.iter_size = int(param.iter_size)
        self.clip_gradients = float(param.clip_gradients)
        if self.regularization_type not in REGULARIZATION_TYPES:
            upper = self.regularization_type.upper()
            hint = f'; did you mean "{upper}"?' if upper in REGULARIZATION_TYPES else \
                errors.did_you_mean(self.regularization_type, REGULARIZATION_TYPES)
            raise errors.SolverError(
                f'Unknown regularization type: "{self.regularization_type}"{hint} (use L2 or L1)')
        if self.iter_size < 1:
            raise errors.SolverError(f"iter_size must be >= 1, got {self.iter_size}")
        self.check()
        self.history: list[Any] = []
        self._n = 0
        self._scratch = _Scratch()

    def check(self) -> None:
        """Rule-specific checks of the solver parameters (Caffe's constructor CHECKs)."""

    # -- history ---------------------------------------------------------------------------------
    def setup(self, params: Sequence[Any]) -> None:
        """Allocate zero history for ``params`` (objects with ``.data``/``.diff`` arrays)."""
        self._n = len(params)
        self.history = []
        for _ in range(self.num_history_sets):
            for p in params:
                xp = _xp_of(p.data)
                self.history.append(xp.zeros(p.data.shape, dtype=p.data.dtype))

    def hist(self, set_index: int, param_index: int) -> Any:
        return self.history[set_index * self._n + param_index]

    # -- one update ----------------------------------------------------------------------------
    def apply(
        self,
        params: Sequence[Any],
        lr_mults: Sequence[float],
        decay_mults: Sequence[float],
        rate: float,
        it: int,
    ) -> None:
        """Caffe's ``ApplyUpdate`` after the rate is known: clip, then per parameter normalise,
        regularise and compute the step into ``diff``; finally ``data -= diff``.

        Args:
            params: the learnable parameters (``.data``/``.diff`` arrays), as given to setup.
            lr_mults / decay_mults: per-parameter multipliers (ParamSpec lr_mult/decay_mult).
            rate: the learning rate of this iteration.
            it: the iteration (Adam's bias correction uses ``t = it + 1``).
        """
        if len(params) != self._n or len(self.history) != self._n * self.num_history_sets:
            raise errors.SolverError(
                f"update rule set up for {self._n} parameters, asked to update {len(params)}")
        self.clip(params)
        stepped = [False] * len(params)
        for i, p in enumerate(params):
            self.normalize(p)
            local_decay = self.weight_decay * float(decay_mults[i])
            local_rate = rate * float(lr_mults[i])
            stepped[i] = self.fused_step(i, p, local_decay, local_rate)
            if not stepped[i]:
                self.regularize(p, local_decay)
                self.compute_update_value(i, p, local_rate, it)
        for p, done in zip(params, stepped):
            if not done:
                p.data[...] -= p.diff

    def fused_step(self, i: int, p: Any, local_decay: float, local_rate: float) -> bool:
        """Regularise, compute the step into ``p.diff`` and apply it to ``p.data`` in one pass,
        with the same results, where a kernel does all three; False (nothing done) elsewhere."""
        return False

    def clip(self, params: Sequence[Any]) -> float | None:
        """Scale all diffs so their global L2 norm is at most ``clip_gradients`` (if >= 0).

        Returns the norm when clipping happened, else None.
        """
        clip = self.clip_gradients
        if clip < 0 or not params:
            return None
        # NOTE: summed on the device, read once: one wait for the GPU per step, not per blob
        xp = _xp_of(params[0].diff)
        sumsq = float(sum(xp.dot(p.diff.ravel(), p.diff.ravel()) for p in params))
        norm = math.sqrt(sumsq)
        if not norm > clip:  # NaN norms are left alone, as in Caffe
            return None
        scale = clip / norm
        LOG.info("Gradient clipping: scaling down gradients (L2 norm %.6g > %.6g) "
                 "by scale factor %.6g", norm, clip, scale)
        for p in params:
            p.diff[...] *= scale
        return norm

    def normalize(self, p: Any) -> None:
        """Undo the gradient accumulation of ``iter_size`` forward/backward passes."""
        if self.iter_size > 1:
            p.diff[...] *= 1.0 / self.iter_size

    def regularize(self, p: Any, local_decay: float) -> None:
        """Add the weight-decay gradient: L2 ``λ·w`` or L1 ``λ·sign(w)``."""
        if not local_decay:
            return
        xp = _xp_of(p.data)
        tmp = self._scratch.get(0, p.data)
        if self.regularization_type == "L2":
            xp.multiply(p.data, local_decay, out=tmp)
        else:
            xp.sign(p.data, out=tmp)
            tmp *= local_decay
        p.diff[...] += tmp

    def compute_update_value(self, i: int, p: Any, local_rate: float, it: int) -> None:
        """Turn ``p.diff`` (the regularised gradient) into the step, in place."""
        h = self.hist(0, i)
        g = p.diff
        # h = local_rate·g + momentum·h (caffe_cpu_axpby); then diff = h
        g *= local_rate
        h *= self.momentum
        h += g
        g[...] = h


class SGDRule(UpdateRule):
    """Stochastic gradient descent with momentum (``type: "SGD"``)."""

    def fused_step(self, i: int, p: Any, local_decay: float, local_rate: float) -> bool:
        """On the host, with L2 decay (or none): :func:`pycaffe_mpi.kernels.update_cpu.sgd`."""
        h = self.hist(0, i)
        if (self.regularization_type != "L2" and local_decay) or _xp_of(h) is not np:
            return False
        from pycaffe_mpi.kernels import update_cpu  # imports numba: on first use

        if not update_cpu.supports(p.data, p.diff, h):
            return False
        update_cpu.sgd(p.data, p.diff, h, local_decay, local_rate, self.momentum)
        return True


class NesterovRule(UpdateRule):
    """Nesterov's accelerated gradient (``type: "Nesterov"``)."""

    type = "Nesterov"

    def compute_update_value(self, i: int, p: Any, local_rate: float, it: int) -> None:
        h, g, m = self.hist(0, i), p.diff, self.momentum
        xp = _xp_of(g)
        old = self._scratch.get(1, g)
        old[...] = h
        tmp = self._scratch.get(0, g)
        xp.multiply(g, local_rate, out=tmp)
        h *= m
        h += tmp
        # step back, then over-step: diff = (1+m)·h_new − m·h_old
        xp.multiply(h, 1.0 + m, out=g)
        old *= m
        g -= old


class AdaGradRule(UpdateRule):
    """AdaGrad (``type: "AdaGrad"``); ``momentum`` must be 0."""

    type = "AdaGrad"

    def check(self) -> None:
        if self.momentum != 0:
            raise errors.SolverError("Momentum cannot be used with AdaGrad.")

    def compute_update_value(self, i: int, p: Any, local_rate: float, it: int) -> None:
        h, g = self.hist(0, i), p.diff
        xp = _xp_of(g)
        tmp = self._scratch.get(0, g)
        xp.multiply(g, g, out=tmp)
        h += tmp
        _divide_by_root(xp, g, h, tmp, self.delta, local_rate)


def _divide_by_root(xp: Any, g: Any, h: Any, tmp: Any, delta: float, rate: float) -> None:
    """g ← rate · g / (√h + delta), in place (``tmp`` is scratch the size of g)."""
    xp.sqrt(h, out=tmp)
    tmp += delta
    xp.divide(g, tmp, out=g)
    g *= rate


class RMSPropRule(UpdateRule):
    """RMSProp (``type: "RMSProp"``); ``momentum`` must be 0, ``0 <= rms_decay < 1``."""

    type = "RMSProp"

    def check(self) -> None:
        if self.momentum != 0:
            raise errors.SolverError("Momentum cannot be used with RMSProp.")
        decay = float(self.param.rms_decay)
        if not 0 <= decay < 1:
            raise errors.SolverError(f"rms_decay should lie between 0 and 1, got {decay:g}.")
        self.rms_decay = decay

    def compute_update_value(self, i: int, p: Any, local_rate: float, it: int) -> None:
        h, g, r = self.hist(0, i), p.diff, self.rms_decay
        xp = _xp_of(g)
        tmp = self._scratch.get(0, g)
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - r
        h *= r
        h += tmp
        _divide_by_root(xp, g, h, tmp, self.delta, local_rate)


class AdaDeltaRule(UpdateRule):
    """AdaDelta (``type: "AdaDelta"``); ``momentum`` is the decay ρ, history = (h_g, h_u)."""

    type = "AdaDelta"
    num_history_sets = 2

    def compute_update_value(self, i: int, p: Any, local_rate: float, it: int) -> None:
        hg, hu, g, rho = self.hist(0, i), self.hist(1, i), p.diff, self.momentum
        xp = _xp_of(g)
        upd = self._scratch.get(0, g)
        tmp = self._scratch.get(1, g)
        # h_g = ρ·h_g + (1−ρ)·g²
        xp.multiply(g, g, out=upd)
        upd *= 1.0 - rho
        hg *= rho
        hg += upd
        # u = g·√((h_u + δ) / (h_g + δ))
        xp.add(hu, self.delta, out=upd)
        xp.add(hg, self.delta, out=tmp)
        upd /= tmp
        xp.sqrt(upd, out=upd)
        g *= upd
        # h_u = ρ·h_u + (1−ρ)·u²
        xp.multiply(g, g, out=upd)
        upd *= 1.0 - rho
        hu *= rho
        hu += upd
        g *= local_rate


class AdamRule(UpdateRule):
    """Adam (``type: "Adam"``): β1 = ``momentum``, β2 = ``momentum2``, ε = ``delta``."""

    type = "Adam"
    num_history_sets = 2

    def check(self) -> None:
        # NOTE: Caffe does not check; β = 1 divides by zero and β2 > 1 takes a negative root
        b1, b2 = self.momentum, float(self.param.momentum2)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise errors.SolverError(
                f"Adam needs 0 <= momentum < 1 and 0 <= momentum2 < 1 (beta1, beta2), got "
                f"momentum {b1:g}, momentum2 {b2:g}")

    def compute_update_value(self, i: int, p: Any, local_rate: float, it: int) -> None:
        m, v, g = self.hist(0, i), self.hist(1, i), p.diff
        b1, b2 = self.momentum, float(self.param.momentum2)
        t = it + 1
        correction = math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        xp = _xp_of(g)
        tmp = self._scratch.get(0, g)
        # m = β1·m + (1−β1)·g
        xp.multiply(g, 1.0 - b1, out=tmp)
        m *= b1
        m += tmp
        # v = β2·v + (1−β2)·g²
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v *= b2
        v += tmp
        # step = lr·correction · m / (√v + ε)
        xp.sqrt(v, out=tmp)
        tmp += self.delta
        xp.divide(m, tmp, out=g)
        g *= local_rate * correction


RULES: dict[str, type[UpdateRule]] = {
    cls.type: cls
    for cls in (SGDRule, NesterovRule, AdaGradRule, RMSPropRule, AdaDeltaRule, AdamRule)
}


def make_rule(param: Any) -> UpdateRule:
    """The update rule named by ``param.type`` (or the deprecated ``solver_type``)."""
    name = solver_type(param)
    cls = RULES.get(name)
    if cls is None:
        hint = errors.did_you_mean(name, RULES)
        raise errors.SolverError(
            f'Unknown solver type: "{name}"{hint} (known types: {", ".join(RULES)})')
    return cls(param)
