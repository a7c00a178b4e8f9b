"""Layer cases for the recurrent family: RNN, LSTM, LSTMUnit.

References are plain loops over time steps, streams and units in float64, written from the
formulas of Caffe's unrolled nets (rnn_layer.cpp, lstm_layer.cpp, lstm_unit_layer.cpp),
independent of the layers. Without ``expose_hidden`` every case starts each sequence at t = 0
(cont 0 there), so the state a layer carries from one forward to the next never matters.
"""

from __future__ import annotations

import math

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

_FILLERS = ('weight_filler { type: "gaussian" std: 0.5 } '
            'bias_filler { type: "gaussian" std: 0.5 }')
_H = 3  # num_output of every RNN/LSTM case


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _cont(rows):
    """A bottom spec giving the fixed (T, N) continuation indicators ``rows``."""
    arr = np.array(rows, dtype=np.float64)
    return lambda rng: arr.copy()


def _matvec(w, v):
    return [sum(w[r, k] * v[k] for k in range(len(v))) for r in range(w.shape[0])]


def _params(layer, static: bool):
    ps = [np.asarray(b.data, np.float64) for b in layer.blobs]
    w_x, b_x = ps[0], ps[1]
    w_s = ps[2] if static else None
    return w_x, b_x, w_s, ps[3 if static else 2:]


def _input_terms(bottoms, w_x, b_x, w_s):
    """pre[t][n] = W_x x_t,n + b (+ W_s x_static,n), as lists."""
    x = bottoms[0]
    t_, n_ = x.shape[:2]
    flat = x.reshape(t_, n_, -1)
    xs = bottoms[2].reshape(n_, -1) if w_s is not None else None
    pre = []
    for t in range(t_):
        row = []
        for n in range(n_):
            v = [a + b for a, b in zip(_matvec(w_x, flat[t, n]), b_x)]
            if xs is not None:
                v = [a + b for a, b in zip(v, _matvec(w_s, xs[n]))]
            row.append(v)
        pre.append(row)
    return pre


def _rnn_ref(static: bool, expose: bool):
    def ref(bottoms, layer):
        w_x, b_x, w_s, (w_hh, w_ho, b_o) = _params(layer, static)
        pre = _input_terms(bottoms, w_x, b_x, w_s)
        cont = bottoms[1]
        t_, n_ = cont.shape
        h_prev = (bottoms[-1].reshape(n_, _H) if expose else np.zeros((n_, _H))).tolist()
        out = np.zeros((t_, n_, _H))
        for t in range(t_):
            h_new = []
            for n in range(n_):
                hc = [cont[t, n] * v for v in h_prev[n]]
                rec = _matvec(w_hh, hc)
                h = [math.tanh(pre[t][n][u] + rec[u]) for u in range(_H)]
                o = _matvec(w_ho, h)
                out[t, n] = [math.tanh(o[u] + b_o[u]) for u in range(_H)]
                h_new.append(h)
            h_prev = h_new
        tops = [out]
        if expose:
            tops.append(np.array(h_prev).reshape(1, n_, _H))
        return tops
    return ref


def _lstm_ref(static: bool, expose: bool):
    def ref(bottoms, layer):
        w_x, b_x, w_s, (w_hc,) = _params(layer, static)
        pre = _input_terms(bottoms, w_x, b_x, w_s)
        cont = bottoms[1]
        t_, n_ = cont.shape
        if expose:
            h_prev = bottoms[-2].reshape(n_, _H).tolist()
            c_prev = bottoms[-1].reshape(n_, _H).tolist()
        else:
            h_prev, c_prev = np.zeros((n_, _H)).tolist(), np.zeros((n_, _H)).tolist()
        out = np.zeros((t_, n_, _H))
        for t in range(t_):
            for n in range(n_):
                hc = [cont[t, n] * v for v in h_prev[n]]
                rec = _matvec(w_hc, hc)
                a = [pre[t][n][r] + rec[r] for r in range(4 * _H)]
                for u in range(_H):
                    i, f = _sig(a[u]), _sig(a[_H + u])
                    o, g = _sig(a[2 * _H + u]), math.tanh(a[3 * _H + u])
                    c_prev[n][u] = cont[t, n] * f * c_prev[n][u] + i * g
                    out[t, n, u] = o * math.tanh(c_prev[n][u])
            h_prev = out[t].tolist()
        tops = [out]
        if expose:
            tops += [np.array(h_prev).reshape(1, n_, _H), np.array(c_prev).reshape(1, n_, _H)]
        return tops
    return ref


# (id, x shape, cont rows, static shape or None, expose_hidden); the cont rows of the cases
# without expose_hidden start at 0, those with it continue from the given h_0/c_0.
_SEQ = (
    ("plain", (3, 2, 3), [[0, 0], [1, 1], [1, 1]], None, False),
    ("features_4d_cont_zero_mid", (4, 2, 2, 2), [[0, 0], [1, 0], [0, 1], [1, 1]], None, False),
    ("static", (3, 2, 3), [[0, 0], [1, 1], [0, 1]], (2, 2, 2), False),
    ("expose_hidden", (3, 2, 3), [[1, 1], [1, 0], [1, 1]], None, True),
    ("static_expose_hidden", (4, 2, 3), [[1, 0], [1, 1], [0, 1], [1, 1]], (2, 3), True),
)


def _reshaped(x_shape, cont_rows, static_shape, expose, nrec):
    """Reshape bottoms: one more stream (and one more step), cont 0 at the start."""
    t_, n_ = x_shape[0] + 1, x_shape[1] + 1
    cont = [[0] * n_] + [[1] * n_] * (t_ - 1)
    cont[t_ // 2][0] = 0
    specs = [(t_, n_, *x_shape[2:]), _cont(cont)]
    if static_shape is not None:
        specs.append((n_, *static_shape[1:]))
    if expose:
        specs += [(1, n_, _H)] * nrec
    return specs


for _type, _nrec, _refmaker in (("RNN", 1, _rnn_ref), ("LSTM", 2, _lstm_ref)):
    for _id, _x, _rows, _static, _expose in _SEQ:
        _bottoms = [_x, _cont(_rows)]
        if _static is not None:
            _bottoms.append(_static)
        if _expose:
            _bottoms += [(1, _x[1], _H)] * _nrec
        _flag = " expose_hidden: true" if _expose else ""
        add_case(LayerCase(
            type=_type, id=_id,
            proto=f"recurrent_param {{ num_output: {_H} {_FILLERS}{_flag} }}",
            bottoms=_bottoms, reference=_refmaker(_static is not None, _expose),
            ntop=1 + (_nrec if _expose else 0),
            reshape=_reshaped(_x, _rows, _static, _expose, _nrec)))


# -- LSTMUnit ----------------------------------------------------------------------------------

def _unit_ref(bottoms, layer):
    c_prev, gates, cont = bottoms
    _, n_, h_ = c_prev.shape
    c_out, h_out = np.zeros_like(c_prev), np.zeros_like(c_prev)
    for n in range(n_):
        for d in range(h_):
            i, f = _sig(gates[0, n, d]), _sig(gates[0, n, h_ + d])
            o, g = _sig(gates[0, n, 2 * h_ + d]), math.tanh(gates[0, n, 3 * h_ + d])
            c = cont[0, n] * f * c_prev[0, n, d] + i * g
            c_out[0, n, d] = c
            h_out[0, n, d] = o * math.tanh(c)
    return [c_out, h_out]


for _id, _rows in (("cont_zero", [[0, 0, 0]]), ("cont_mixed", [[1, 0, 1]])):
    add_case(LayerCase(
        type="LSTMUnit", id=_id,
        bottoms=[(1, 3, 4), (1, 3, 16), _cont(_rows)], reference=_unit_ref, ntop=2,
        reshape=[(1, 2, 5), (1, 2, 20), _cont([[1, 0]])]))
