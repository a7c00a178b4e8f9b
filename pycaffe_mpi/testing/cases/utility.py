"""Layer cases for the utility family: ArgMax, BatchReindex, Filter, Silence, Tile, Parameter,
Embed, Reduction. References are plain loops, independent of the layers."""

from __future__ import annotations

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

# -- ArgMax ------------------------------------------------------------------------------------


def _ranked(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first (ties: larger index first, as Caffe)."""
    pairs = sorted(((v, j) for j, v in enumerate(values)), reverse=True)
    return [j for _, j in pairs[:k]]


def _argmax_ref(top_k: int = 1, out_max_val: bool = False, axis: int | None = None):
    def ref(bottoms, layer):
        x = bottoms[0]
        if axis is None:
            n = x.shape[0]
            flat = x.reshape(n, -1)
            out = np.zeros((n, 2 if out_max_val else 1, top_k) + (1,) * max(0, x.ndim - 3))
            for i in range(n):
                order = _ranked(list(flat[i]), top_k)
                for j, idx in enumerate(order):
                    out[(i, 0, j) + (0,) * (out.ndim - 3)] = idx
                    if out_max_val:
                        out[(i, 1, j) + (0,) * (out.ndim - 3)] = flat[i, idx]
            return [out]
        ax = axis % x.ndim
        shape = list(x.shape)
        shape[ax] = top_k
        out = np.zeros(shape)
        for pos in np.ndindex(*[d for a, d in enumerate(x.shape) if a != ax]):
            line = [x[(*pos[:ax], c, *pos[ax:])] for c in range(x.shape[ax])]
            for j, idx in enumerate(_ranked(line, top_k)):
                out[(*pos[:ax], j, *pos[ax:])] = line[idx] if out_max_val else idx
        return [out]
    return ref


for _id, _proto, _kw, _shape in (
        ("default", "", {}, (4, 3, 2, 5)),
        ("top3_values", "argmax_param { top_k: 3 out_max_val: true }",
         {"top_k": 3, "out_max_val": True}, (4, 3, 2, 5)),
        ("two_axes", "argmax_param { top_k: 2 }", {"top_k": 2}, (5, 7)),
        ("axis1", "argmax_param { axis: 1 top_k: 2 }", {"top_k": 2, "axis": 1}, (3, 5, 2, 4)),
        ("axis_neg_values", "argmax_param { axis: -1 top_k: 3 out_max_val: true }",
         {"top_k": 3, "out_max_val": True, "axis": -1}, (3, 5, 6))):
    add_case(LayerCase(type="ArgMax", id=_id, proto=_proto, bottoms=[_shape],
                       reference=_argmax_ref(**_kw), grad=False))

# -- BatchReindex ------------------------------------------------------------------------------


def _batch_reindex_ref(bottoms, layer):
    x, idx = bottoms
    out = np.zeros((idx.shape[0], *x.shape[1:]))
    for m in range(idx.shape[0]):
        out[m] = x[int(idx[m])]
    return [out]


def _reindex(n: int, m: int):
    """M indices into a batch of N with repeats and gaps (every draw repeats index 0)."""
    def draw(rng):
        idx = rng.integers(0, n, size=m).astype(float)
        idx[:2] = 0
        return idx
    return draw


add_case(LayerCase(type="BatchReindex", id="repeats", bottoms=[(5, 3, 2), _reindex(5, 7)],
                   reference=_batch_reindex_ref, reshape=[(6, 3, 2), _reindex(6, 4)]))
add_case(LayerCase(type="BatchReindex", id="two_axes", bottoms=[(4, 6), _reindex(4, 4)],
                   reference=_batch_reindex_ref))

# -- Filter ------------------------------------------------------------------------------------


def _filter_ref(bottoms, layer):
    *data, sel = bottoms
    keep = [n for n in range(sel.shape[0]) if sel.reshape(sel.shape[0], -1)[n, 0] != 0]
    outs = []
    for x in data:
        out = np.zeros((len(keep), *x.shape[1:]))
        for r, n in enumerate(keep):
            out[r] = x[n]
        outs.append(out)
    return outs


def _selector(shape: tuple[int, ...]):
    """0/1 selector with at least one item kept and one dropped."""
    def draw(rng):
        s = (rng.random(shape) < 0.5).astype(float)
        s.reshape(-1)[:2] = (1.0, 0.0)
        return s
    return draw


add_case(LayerCase(type="Filter", id="one_bottom", bottoms=[(6, 3, 2), _selector((6,))],
                   reference=_filter_ref, reshape=[(7, 3, 2), _selector((7,))]))
add_case(LayerCase(type="Filter", id="two_bottoms",
                   bottoms=[(5, 4), (5, 2, 3), _selector((5, 1))], ntop=2,
                   reference=_filter_ref, reshape=[(8, 4), (8, 2, 3), _selector((8, 1))]))

# -- Silence -----------------------------------------------------------------------------------

add_case(LayerCase(type="Silence", id="two_bottoms", bottoms=[(2, 3), (4,)], ntop=0,
                   reference=lambda bottoms, layer: []))

# -- Tile --------------------------------------------------------------------------------------


def _tile_ref(axis: int, tiles: int):
    def ref(bottoms, layer):
        x = bottoms[0]
        ax = axis % x.ndim
        shape = list(x.shape)
        shape[ax] *= tiles
        out = np.zeros(shape)
        for pos in np.ndindex(*shape):
            src = (*pos[:ax], pos[ax] % x.shape[ax], *pos[ax + 1:])
            out[pos] = x[src]
        return [out]
    return ref


for _id, _axis, _tiles, _shape in (("default_axis", None, 3, (2, 3, 4)), ("axis0", 0, 2, (3, 4)),
                                   ("last_axis", -1, 4, (2, 3, 2, 2))):
    _ax = "" if _axis is None else f"axis: {_axis} "
    add_case(LayerCase(type="Tile", id=_id, proto=f"tile_param {{ {_ax}tiles: {_tiles} }}",
                       bottoms=[_shape], reference=_tile_ref(1 if _axis is None else _axis,
                                                             _tiles)))

# -- Parameter ---------------------------------------------------------------------------------

add_case(LayerCase(type="Parameter", id="shape_2x3x4",
                   proto="parameter_param { shape { dim: 2 dim: 3 dim: 4 } }",
                   reference=lambda bottoms, layer: [np.array(layer.blobs[0].data, np.float64)]))

# -- Embed -------------------------------------------------------------------------------------


def _embed_ref(bottoms, layer):
    x = bottoms[0]
    w = np.asarray(layer.blobs[0].data, np.float64)
    b = np.asarray(layer.blobs[1].data, np.float64) if len(layer.blobs) > 1 else None
    out = np.zeros((*x.shape, w.shape[1]))
    for pos in np.ndindex(*x.shape):
        out[pos] = w[int(x[pos])] + (b if b is not None else 0.0)
    return [out]


def _tokens(k: int, shape: tuple[int, ...]):
    """Integer indices in [0, k) with a repeat (index 0 twice)."""
    def draw(rng):
        t = rng.integers(0, k, size=shape).astype(float)
        t.reshape(-1)[:2] = 0
        return t
    return draw


_FILL = "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' }"
add_case(LayerCase(
    type="Embed", id="bias", proto=f"embed_param {{ num_output: 4 input_dim: 6 {_FILL} }}",
    bottoms=[_tokens(6, (5,))], reference=_embed_ref, reshape=[_tokens(6, (8,))]))
add_case(LayerCase(
    type="Embed", id="no_bias_2d",
    proto="embed_param { num_output: 3 input_dim: 5 bias_term: false "
          "weight_filler { type: 'uniform' min: -1 max: 1 } }",
    bottoms=[_tokens(5, (3, 4))], reference=_embed_ref, reshape=[_tokens(5, (2, 4))]))

# -- Reduction ---------------------------------------------------------------------------------

_OP_FN = {"SUM": lambda v: v, "ASUM": abs, "SUMSQ": lambda v: v * v, "MEAN": lambda v: v}


def _reduction_ref(op: str, axis: int, coeff: float):
    def ref(bottoms, layer):
        x = bottoms[0]
        ax = axis % x.ndim
        num = int(np.prod(x.shape[:ax]))
        rows = x.reshape(num, -1)
        out = np.zeros(num)
        for i in range(num):
            total = sum(_OP_FN[op](float(v)) for v in rows[i])
            out[i] = coeff * (total / rows.shape[1] if op == "MEAN" else total)
        return [out.reshape(x.shape[:ax])]
    return ref


def _away_from_zero(shape):
    return lambda rng: (lambda x: x + np.where(x >= 0, 0.05, -0.05))(rng.standard_normal(shape))


for _op, _axis, _coeff in (("SUM", None, None), ("SUM", 1, 2.5), ("ASUM", 1, None),
                           ("SUMSQ", -1, -0.5), ("MEAN", 2, 3.0), ("MEAN", 0, None)):
    _fields = [f"operation: {_op}"] + ([] if _axis is None else [f"axis: {_axis}"]) + \
        ([] if _coeff is None else [f"coeff: {_coeff}"])
    _shape = (2, 3, 4, 2)
    add_case(LayerCase(
        type="Reduction", id=f"{_op}_axis{_axis}_coeff{_coeff}",
        proto="reduction_param { " + " ".join(_fields) + " }",
        bottoms=[_away_from_zero(_shape) if _op == "ASUM" else _shape],
        reshape=[(3, 3, 4, 2)],
        reference=_reduction_ref(_op, 0 if _axis is None else _axis,
                                 1.0 if _coeff is None else _coeff)))
