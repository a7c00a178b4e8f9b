"""Recurrent layers: RNN and LSTM (Caffe's RecurrentLayer family) and LSTMUnit.

Caffe's RecurrentLayer unrolls the recurrence into an internal net (Slice, InnerProduct, Scale,
Eltwise, TanH/LSTMUnit, Concat per time step). Here the same function is computed directly:
one GEMM applies the input weights to all T·N rows at once, then one loop over the T time steps
does a whole-batch GEMM with the recurrent weights per step. The parameter blobs keep the order
and shapes of the unrolled net's parameters, so BVLC ``.caffemodel`` weights load unchanged.

What the unrolled net does and this module keeps:

- without ``expose_hidden``, the final hidden (and cell) state of one forward is the initial
  state of the next one (zeros after setup, :meth:`reset` or a change of N); no gradient flows
  across forwards (truncated back-propagation, as Caffe);
- ``cont`` (T, N) scales the previous state: ``h_{t-1}`` before the recurrent GEMM and, in the
  LSTM, ``c_{t-1}`` through the forget gate. It never receives a gradient: back-propagating to
  it is an error, as Caffe's "Cannot backpropagate to sequence indicators".

Where this module goes beyond Caffe (identical results in Caffe's own use):

- with ``expose_hidden``, the diffs of the h_T [, c_T] tops are back-propagated and the h_0
  [, c_0] bottoms receive their gradient (Caffe's unrolled net shares only their data, so it
  ignores the former and leaves the latter untouched);
- T may change between reshapes (Caffe's unrolled net is built for one T and refuses);
- the forget-gate gradient is the exact derivative of ``cont · σ(f')`` (Caffe's ``f · (1 − f)``
  with ``f = cont · σ(f')`` agrees for binary ``cont``, the documented input).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from pycaffe_mpi import layer as layer_mod
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.registry import register_layer

_LOG = logging.getLogger("pycaffe_mpi")
_count = layer_mod.count_of


def _sigmoid(xp: Any, x: Any) -> Any:
    # NOTE: tanh form, so large |x| never overflows exp.
    return 0.5 * xp.tanh(0.5 * x) + 0.5


def lstm_unit_forward(xp: Any, c_prev: Any, gates: Any, cont: Any) -> tuple[Any, Any, Any, Any]:
    """One LSTM step for a whole batch.

    Args:
        xp: the array module.
        c_prev: (N, H) previous cell state.
        gates: (N, 4H) gate pre-activations, blocks i', f', o', g'.
        cont: (N,) continuation indicators.

    Returns:
        ``(c, h, acts, tanh_c)``: c and h (N, H); acts (N, 4H) = [σ(i'), σ(f'), σ(o'), tanh(g')]
        (the forget gate before ``cont``); tanh_c = tanh(c).
    """
    hdim = c_prev.shape[1]
    acts = xp.empty_like(gates)
    acts[:, : 3 * hdim] = _sigmoid(xp, gates[:, : 3 * hdim])
    acts[:, 3 * hdim:] = xp.tanh(gates[:, 3 * hdim:])
    i, f, o, g = (acts[:, k * hdim:(k + 1) * hdim] for k in range(4))
    c = (cont[:, None] * f) * c_prev + i * g
    tanh_c = xp.tanh(c)
    return c, o * tanh_c, acts, tanh_c


def lstm_unit_backward(xp: Any, dc: Any, dh: Any, c_prev: Any, acts: Any, tanh_c: Any,
                       cont: Any) -> tuple[Any, Any]:
    """Gradient of one LSTM step (see :func:`lstm_unit_forward`): ``(dc_prev, dgates)``.

    ``dc``/``dh`` are dE/dc_t and dE/dh_t (N, H); dgates is (N, 4H) over the pre-activations.
    """
    hdim = c_prev.shape[1]
    i, f, o, g = (acts[:, k * hdim:(k + 1) * hdim] for k in range(4))
    keep = cont[:, None]
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)  # (N, H): through c_t and through h_t
    dgates = xp.empty_like(acts)
    dgates[:, :hdim] = dc_total * g * i * (1 - i)
    dgates[:, hdim:2 * hdim] = dc_total * c_prev * keep * f * (1 - f)
    dgates[:, 2 * hdim:3 * hdim] = dh * tanh_c * o * (1 - o)
    dgates[:, 3 * hdim:] = dc_total * i * (1 - g * g)
    return dc_total * keep * f, dgates


class _Recurrent(Layer):
    """Shared machinery of RNN and LSTM (Caffe's RecurrentLayer).

    Subclasses set ``n_recur`` (recurrent state blobs), ``gate_mult`` (rows of the input
    weights per output unit), ``recur_names`` and implement ``_recur_shapes``, ``_run`` and
    ``_run_backward``.
    """

    min_bottom = 2
    min_top = 1
    n_recur: ClassVar[int] = 1
    gate_mult: ClassVar[int] = 1
    recur_names: ClassVar[tuple[str, ...]] = ("h_0",)

    # -- setup / reshape ---------------------------------------------------------------------
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.recurrent_param
        self.num_output = int(p.num_output)
        self.expose_hidden = bool(p.expose_hidden)
        self.debug_info = bool(p.debug_info)
        self.require(self.num_output > 0, "recurrent_param.num_output",
                     f"num_output must be positive, got {self.num_output}")
        exposed = self.n_recur if self.expose_hidden else 0
        names = ", ".join(("x", "cont", "[x_static]", *self.recur_names[:exposed]))
        self.require(2 + exposed <= len(bottom) <= 3 + exposed, "bottom",
                     f"expected bottoms ({names}), got {len(bottom)} bottom(s)")
        self.require(len(top) == 1 + exposed, "top",
                     f"expected {1 + exposed} top(s) with expose_hidden "
                     f"{str(self.expose_hidden).lower()}, got {len(top)}")
        self.static_input = len(bottom) > 2 + exposed
        self.require(bottom[0].num_axes >= 3, "bottom[0]",
                     f"x must be (T, N, ...) with at least one feature axis, got shape "
                     f"{bottom[0].shape}")
        self.D = _count(bottom[0].shape, 2)
        if self.static_input:
            self.require(bottom[2].num_axes >= 2, "bottom[2]",
                         f"x_static must be (N, ...) with at least one feature axis, got shape "
                         f"{bottom[2].shape}")
        self.S = _count(bottom[2].shape, 1) if self.static_input else 0
        self._state: list[Any] | None = None
        shapes = self.param_shapes()
        # Caffe's unrolled-net order: matrices take the weight filler, vectors the bias filler
        self.init_param_blobs(shapes, "recurrent_param",
                              ["weight_filler" if len(s) == 2 else "bias_filler"
                               for s in shapes])

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes in Caffe's order: W_x, b, [W_x_static], then ``_recur_shapes``."""
        rows = self.gate_mult * self.num_output
        shapes: list[tuple[int, ...]] = [(rows, self.D), (rows,)]
        if self.static_input:
            shapes.append((rows, self.S))
        return shapes + self._recur_shapes()

    def _recur_shapes(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    @property
    def _w_h(self) -> int:
        """Index of the recurrent weight blob (after W_x, b and the optional static weight)."""
        return 3 if self.static_input else 2

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xs, cs = bottom[0].shape, bottom[1].shape
        self.require(len(xs) >= 3 and _count(xs, 2) == self.D, "bottom[0]",
                     f"x must be (T, N, ...) with {self.D} values per step and stream (fixed at "
                     f"setup), got shape {xs}")
        self.T, self.N = int(xs[0]), int(xs[1])
        self.require(self.T >= 1, "bottom[0]", f"x has no time steps, shape {xs}")
        self.require(tuple(cs) == (self.T, self.N), "bottom[1]",
                     f"cont must be (T, N) = ({self.T}, {self.N}) to match x {xs}, got {cs}")
        if self.static_input:
            ss = bottom[2].shape
            self.require(len(ss) >= 2 and ss[0] == self.N and _count(ss, 1) == self.S,
                         "bottom[2]", f"x_static must be (N, ...) with N = {self.N} and "
                         f"{self.S} values per stream, got shape {ss}")
        state_shape = (1, self.N, self.num_output)
        if self.expose_hidden:
            first = 3 if self.static_input else 2
            for k, name in enumerate(self.recur_names):
                got = bottom[first + k].shape
                self.require(tuple(got) == state_shape, f"bottom[{first + k}]",
                             f"{name} must be {state_shape}, got {got}")
            for t in top[1:]:
                t.reshape(*state_shape)
        elif self._state is not None and self._state[0].shape != (self.N, self.num_output):
            self._state = None  # a new number of streams starts from zero state
        top[0].reshape(self.T, self.N, self.num_output)

    def reset(self) -> None:
        """Zero the carried hidden state (Caffe's ``RecurrentLayer::Reset``)."""
        self._state = None

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1  # never into the sequence indicators

    # -- forward / backward ------------------------------------------------------------------
    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, w = self.xp, self.blobs
        rows = self.gate_mult * self.num_output
        x = bottom[0].data.reshape(self.T * self.N, self.D)
        pre = (x @ w[0].data.T + w[1].data).reshape(self.T, self.N, rows)
        if self.static_input:
            xs = bottom[2].data.reshape(self.N, self.S)
            pre += (xs @ w[2].data.T)[None]  # the same static term at every step
        if self.expose_hidden:
            first = 3 if self.static_input else 2
            init = [bottom[first + k].data.reshape(self.N, self.num_output)
                    for k in range(self.n_recur)]
        elif self._state is not None:
            init = self._state
        else:
            init = [xp.zeros((self.N, self.num_output), self.dtype)
                    for _ in range(self.n_recur)]
        final = self._run(pre, bottom[1].data, init, top[0].data)
        if self.expose_hidden:
            for t, f in zip(top[1:], final):
                t.data[...] = f.reshape(t.shape)
        else:
            self._state = [xp.array(f, copy=True) for f in final]
        if self.debug_info:
            self._log("Forward", "top", [("data", t.data) for t in top])

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.require(not propagate_down[1], "propagate_down",
                     "cannot backpropagate to the sequence indicators (bottom[1], cont)")
        w = self.blobs
        shape = (self.N, self.num_output)
        if self.expose_hidden:
            dfinal = [t.diff.reshape(shape) for t in top[1:]]
        else:  # no gradient across forwards, as Caffe
            dfinal = [self.xp.zeros(shape, self.dtype) for _ in range(self.n_recur)]
        dpre, dinit = self._run_backward(top, bottom[1].data, dfinal)
        rows = self.gate_mult * self.num_output
        dpre2 = dpre.reshape(self.T * self.N, rows)
        x = bottom[0].data.reshape(self.T * self.N, self.D)
        w[0].diff[...] += dpre2.T @ x
        w[1].diff[...] += dpre2.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (dpre2 @ w[0].data).reshape(bottom[0].shape)
        if self.static_input:
            dstatic = dpre.sum(axis=0)  # (N, rows): the static term enters every step
            w[2].diff[...] += dstatic.T @ bottom[2].data.reshape(self.N, self.S)
            if propagate_down[2]:
                bottom[2].diff[...] = (dstatic @ w[2].data).reshape(bottom[2].shape)
        if self.expose_hidden:
            first = 3 if self.static_input else 2
            for k, d in enumerate(dinit):
                if propagate_down[first + k]:
                    bottom[first + k].diff[...] = d.reshape(bottom[first + k].shape)
        if self.debug_info:
            self._log("Backward", "param", [("diff", p.diff) for p in w])

    def _run(self, pre: Any, cont: Any, init: list[Any], out: Any) -> list[Any]:
        """Forward the recurrence from pre-activations ``pre`` (T, N, rows); write top 0 into
        ``out`` and return the final states (N, H) each."""
        raise NotImplementedError

    def _run_backward(self, top: Sequence[Blob], cont: Any,
                      dfinal: list[Any]) -> tuple[Any, list[Any]]:
        """From the top diffs and dE/d(final states): (dE/dpre (T, N, rows), dE/d(initial
        states)); recurrent parameter diffs are accumulated here."""
        raise NotImplementedError

    def _log(self, phase: str, what: str, arrays: list[tuple[str, Any]]) -> None:
        # Caffe's debug_info prints the mean absolute value of each blob.
        for k, (kind, a) in enumerate(arrays):
            mean_abs = float(abs(a).mean()) if a.size else 0.0
            _LOG.info("    [%s] Layer %s, %s %d %s: %g", phase, self.name, what, k, kind,
                      mean_abs)


@register_layer("RNN")
class RNN(_Recurrent):
    """Elman recurrent network with a tanh output layer (Caffe's RNNLayer).

    Params (``recurrent_param``): num_output H (required, > 0); weight_filler, bias_filler
    (constant 0); expose_hidden (false); debug_info (false: log mean |blob| per pass).

    Shapes:
        bottom[0]: x, (T, N, ...) with D = product of the axes after the first two.
        bottom[1]: cont, (T, N); 0 where a sequence starts.
        bottom[2]: x_static, (N, ...) with S values per stream (optional).
        bottom[-1]: h_0, (1, N, H) (only with expose_hidden).
        top[0]: o, (T, N, H). top[1]: h_T, (1, N, H) (only with expose_hidden).
        blobs: W_xh (H, D), b_h (H,), [W_xh_static (H, S)], W_hh (H, H), W_ho (H, H), b_o (H,).

    Forward, for t = 1..T:
        h_t = tanh(W_xh x_t + b_h [+ W_xh_static x_static] + W_hh (cont_t · h_{t−1}))
        o_t = tanh(W_ho h_t + b_o)

    Backward, with a_t the pre-activation of h_t:
        dE/da_t = (dE/dh_t) ⊙ (1 − h_t²), dE/dh_t = W_hoᵀ (dE/do_t ⊙ (1 − o_t²))
        + cont_{t+1} · W_hhᵀ dE/da_{t+1}; dE/dx_t = W_xhᵀ dE/da_t;
        dE/dx_static = W_xh_staticᵀ Σ_t dE/da_t; dE/dh_0 = cont_1 · W_hhᵀ dE/da_1;
        parameter diffs are the matching sums of outer products over t and n. cont gets none.
    """

    max_bottom = 4
    max_top = 2
    n_recur = 1
    gate_mult = 1
    recur_names = ("h_0",)

    def _recur_shapes(self) -> list[tuple[int, ...]]:
        h = self.num_output
        return [(h, h), (h, h), (h,)]

    def _run(self, pre: Any, cont: Any, init: list[Any], out: Any) -> list[Any]:
        xp, w_hh = self.xp, self.blobs[self._w_h].data
        w_ho, b_o = self.blobs[self._w_h + 1].data, self.blobs[self._w_h + 2].data
        self._hc = xp.empty_like(out)  # cont-gated h_{t−1}, kept for dW_hh
        self._h = xp.empty_like(out)
        h_prev = init[0]
        for t in range(self.T):
            self._hc[t] = h_prev * cont[t][:, None]
            self._h[t] = xp.tanh(pre[t] + self._hc[t] @ w_hh.T)
            h_prev = self._h[t]
        rows = self.T * self.N
        out[...] = xp.tanh(self._h.reshape(rows, -1) @ w_ho.T + b_o).reshape(out.shape)
        return [self._h[self.T - 1]]

    def _run_backward(self, top: Sequence[Blob], cont: Any,
                      dfinal: list[Any]) -> tuple[Any, list[Any]]:
        xp, w = self.xp, self.blobs
        w_hh, w_ho, b_o = w[self._w_h], w[self._w_h + 1], w[self._w_h + 2]
        rows = self.T * self.N
        o = top[0].data
        do = (top[0].diff * (1 - o * o)).reshape(rows, -1)  # through o's tanh
        h2 = self._h.reshape(rows, -1)
        w_ho.diff[...] += do.T @ h2
        b_o.diff[...] += do.sum(axis=0)
        dh_out = (do @ w_ho.data).reshape(self._h.shape)
        dpre = xp.empty_like(self._h)
        dh_next = dfinal[0]
        for t in range(self.T - 1, -1, -1):
            dpre[t] = (dh_out[t] + dh_next) * (1 - self._h[t] * self._h[t])
            dh_next = (dpre[t] @ w_hh.data) * cont[t][:, None]
        w_hh.diff[...] += dpre.reshape(rows, -1).T @ self._hc.reshape(rows, -1)
        return dpre, [dh_next]


@register_layer("LSTM")
class LSTM(_Recurrent):
    """Long short-term memory (Caffe's LSTMLayer), gate order i, f, o, g.

    Params (``recurrent_param``): num_output H (required, > 0); weight_filler, bias_filler
    (constant 0); expose_hidden (false); debug_info (false: log mean |blob| per pass).

    Shapes:
        bottom[0]: x, (T, N, ...) with D = product of the axes after the first two.
        bottom[1]: cont, (T, N); 0 where a sequence starts.
        bottom[2]: x_static, (N, ...) with S values per stream (optional).
        then h_0, c_0: (1, N, H) each (only with expose_hidden).
        top[0]: h, (T, N, H). top[1], top[2]: h_T, c_T, (1, N, H) (only with expose_hidden).
        blobs: W_xc (4H, D), b_c (4H,), [W_xc_static (4H, S)], W_hc (4H, H).

    Forward, for t = 1..T:
        [i'; f'; o'; g'] = W_xc x_t + b_c [+ W_xc_static x_static] + W_hc (cont_t · h_{t−1})
        i, f, o = σ(i'), σ(f'), σ(o');  g = tanh(g')
        c_t = cont_t · f ⊙ c_{t−1} + i ⊙ g;  h_t = o ⊙ tanh(c_t)

    Backward: the LSTMUnit gradient at each step (see :class:`LSTMUnit`), with dE/dh_t from
    top 0 plus cont_{t+1} · W_hcᵀ dE/d[gates_{t+1}], and dE/dc_t from step t+1 (or c_T's top).
    dE/dx_t = W_xcᵀ dE/d[gates_t]; dE/dx_static = W_xc_staticᵀ Σ_t dE/d[gates_t];
    parameter diffs are the matching sums of outer products. cont gets none.
    """

    max_bottom = 5
    max_top = 3
    n_recur = 2
    gate_mult = 4
    recur_names = ("h_0", "c_0")

    def _recur_shapes(self) -> list[tuple[int, ...]]:
        return [(4 * self.num_output, self.num_output)]

    def _run(self, pre: Any, cont: Any, init: list[Any], out: Any) -> list[Any]:
        xp, w_hc = self.xp, self.blobs[self._w_h].data
        t_, n, h = self.T, self.N, self.num_output
        self._hc = xp.empty((t_, n, h), self.dtype)  # cont-gated h_{t−1}, kept for dW_hc
        self._c = xp.empty((t_ + 1, n, h), self.dtype)  # c_0 … c_T
        self._acts = xp.empty_like(pre)
        self._tanh_c = xp.empty((t_, n, h), self.dtype)
        h_prev, self._c[0] = init[0], init[1]
        for t in range(t_):
            self._hc[t] = h_prev * cont[t][:, None]
            gates = pre[t] + self._hc[t] @ w_hc.T  # (N, 4H)
            self._c[t + 1], out[t], self._acts[t], self._tanh_c[t] = lstm_unit_forward(
                xp, self._c[t], gates, cont[t])
            h_prev = out[t]
        return [out[t_ - 1], self._c[t_]]

    def _run_backward(self, top: Sequence[Blob], cont: Any,
                      dfinal: list[Any]) -> tuple[Any, list[Any]]:
        xp, w_hc = self.xp, self.blobs[self._w_h]
        dh_top = top[0].diff
        dpre = xp.empty_like(self._acts)
        dh_next, dc_next = dfinal
        for t in range(self.T - 1, -1, -1):
            dc_next, dpre[t] = lstm_unit_backward(
                xp, dc_next, dh_top[t] + dh_next, self._c[t], self._acts[t], self._tanh_c[t],
                cont[t])
            dh_next = (dpre[t] @ w_hc.data) * cont[t][:, None]
        rows = self.T * self.N
        w_hc.diff[...] += dpre.reshape(rows, -1).T @ self._hc.reshape(rows, -1)
        return dpre, [dh_next, dc_next]


@register_layer("LSTMUnit")
class LSTMUnit(Layer):
    """One LSTM time step on gate pre-activations (Caffe's LSTMUnitLayer); no parameters.

    Shapes:
        bottom[0]: c_{t−1}, (1, N, H).
        bottom[1]: gate pre-activations [i'; f'; o'; g'], (1, N, 4H).
        bottom[2]: cont_t, (1, N).
        top[0]: c_t, (1, N, H). top[1]: h_t, (1, N, H).

    Forward:
        i, f, o = σ(i'), σ(f'), σ(o');  g = tanh(g')
        c_t = cont_t · f ⊙ c_{t−1} + i ⊙ g;  h_t = o ⊙ tanh(c_t)

    Backward, with dc = dE/dc_t + dE/dh_t ⊙ o ⊙ (1 − tanh²(c_t)):
        dE/dc_{t−1} = dc ⊙ cont_t · f
        dE/di' = dc ⊙ g ⊙ i(1 − i);  dE/df' = dc ⊙ c_{t−1} ⊙ cont_t · f(1 − f)
        dE/do' = dE/dh_t ⊙ tanh(c_t) ⊙ o(1 − o);  dE/dg' = dc ⊙ i ⊙ (1 − g²)
        cont gets none (back-propagating to it is an error, as Caffe).
    """

    exact_num_bottom = 3
    exact_num_top = 2

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        cs, gs, ks = bottom[0].shape, bottom[1].shape, bottom[2].shape
        self.require(len(cs) == 3 and cs[0] == 1, "bottom[0]",
                     f"c_prev must be (1, N, H), got shape {cs}")
        n, h = int(cs[1]), int(cs[2])
        self.require(tuple(gs) == (1, n, 4 * h), "bottom[1]",
                     f"gates must be (1, N, 4H) = (1, {n}, {4 * h}) to match c_prev {cs}, "
                     f"got {gs}")
        self.require(tuple(ks) == (1, n), "bottom[2]",
                     f"cont must be (1, N) = (1, {n}) to match c_prev {cs}, got {ks}")
        top[0].reshape(*cs)
        top[1].reshape(*cs)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        c, h, self._acts, self._tanh_c = lstm_unit_forward(
            self.xp, bottom[0].data[0], bottom[1].data[0], bottom[2].data[0])
        top[0].data[0] = c
        top[1].data[0] = h

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        self.require(not propagate_down[2], "propagate_down",
                     "cannot backpropagate to the sequence indicators (bottom[2], cont)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        dc_prev, dgates = lstm_unit_backward(
            self.xp, top[0].diff[0], top[1].diff[0], bottom[0].data[0], self._acts,
            self._tanh_c, bottom[2].data[0])
        if propagate_down[0]:
            bottom[0].diff[0] = dc_prev
        if propagate_down[1]:
            bottom[1].diff[0] = dgates

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2
