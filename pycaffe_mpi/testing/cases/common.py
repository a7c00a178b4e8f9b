"""Layer cases for the common family: InnerProduct, Softmax, Concat, Slice, Split, Eltwise,
Flatten, Reshape. References are plain loops or direct NumPy, independent of the layers."""

from __future__ import annotations

import itertools

import numpy as np

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

# -- InnerProduct ------------------------------------------------------------------------------

_FILLERS = ('weight_filler { type: "gaussian" std: 1 } '
            'bias_filler { type: "gaussian" std: 1 }')


def _ip_ref(axis: int, transpose: bool, bias: bool):
    def ref(bottoms, layer):
        x = bottoms[0]
        lead = x.shape[:axis]
        rows = x.reshape(int(np.prod(lead)), -1)  # (M, K)
        w = np.asarray(layer.blobs[0].data, np.float64)
        if transpose:
            w = w.T  # stored (K, N)
        n = w.shape[0]
        out = np.zeros((rows.shape[0], n))
        for m in range(rows.shape[0]):
            for o in range(n):
                out[m, o] = sum(rows[m, k] * w[o, k] for k in range(rows.shape[1]))
                if bias:
                    out[m, o] += layer.blobs[1].data[o]
        return [out.reshape(*lead, n)]
    return ref


for _id, _extra, _axis, _tr, _bias in (
    ("plain", "", 1, False, True),
    ("no_bias", "bias_term: false", 1, False, False),
    ("axis2", "axis: 2", 2, False, True),
    ("axis_minus1", "axis: -1", 3, False, True),
    ("transpose", "transpose: true", 1, True, True),
):
    add_case(LayerCase(
        type="InnerProduct", id=_id,
        proto=f"inner_product_param {{ num_output: 4 {_extra} {_FILLERS} }}",
        bottoms=[(2, 3, 2, 2)], reference=_ip_ref(_axis, _tr, _bias)))

# -- Softmax -----------------------------------------------------------------------------------


def _softmax_ref(axis: int):
    def ref(bottoms, layer):
        x = np.moveaxis(bottoms[0], axis, -1)
        out = np.empty_like(x)
        for idx in np.ndindex(*x.shape[:-1]):
            e = np.exp(x[idx])
            out[idx] = e / e.sum()
        return [np.moveaxis(out, -1, axis)]
    return ref


add_case(LayerCase(type="Softmax", id="axis1_4d", bottoms=[(2, 4, 3, 2)],
                   reference=_softmax_ref(1), in_place=True))
add_case(LayerCase(type="Softmax", id="axis_minus1", proto="softmax_param { axis: -1 }",
                   bottoms=[(3, 5)], reference=_softmax_ref(-1), in_place=True))
add_case(LayerCase(type="Softmax", id="large_scores", proto="softmax_param { axis: 1 }",
                   bottoms=[lambda rng: 300 + 3 * rng.standard_normal((2, 6))],
                   reference=lambda b, layer: _softmax_ref(1)([b[0] - 300], layer)))

# -- Concat ------------------------------------------------------------------------------------


def _concat_ref(axis: int):
    return lambda bottoms, layer: [np.concatenate(bottoms, axis=axis)]


add_case(LayerCase(type="Concat", id="axis0", proto="concat_param { axis: 0 }",
                   bottoms=[(2, 3, 2), (3, 3, 2)], reference=_concat_ref(0)))
add_case(LayerCase(type="Concat", id="axis1_3bottoms",
                   bottoms=[(2, 1, 3), (2, 2, 3), (2, 3, 3)], reference=_concat_ref(1)))
add_case(LayerCase(type="Concat", id="axis_minus1", proto="concat_param { axis: -1 }",
                   bottoms=[(2, 3, 2), (2, 3, 1)], reference=_concat_ref(2)))
add_case(LayerCase(type="Concat", id="legacy_concat_dim", proto="concat_param { concat_dim: 2 }",
                   bottoms=[(2, 2, 1), (2, 2, 3)], reference=_concat_ref(2)))
add_case(LayerCase(type="Concat", id="one_bottom", bottoms=[(2, 3, 2)],
                   reference=_concat_ref(1)))

# -- Slice -------------------------------------------------------------------------------------


def _slice_ref(axis: int, points: list[int], ntop: int):
    def ref(bottoms, layer):
        x = np.moveaxis(bottoms[0], axis, 0)
        cuts = points or [x.shape[0] // ntop * j for j in range(1, ntop)]
        edges = [0, *cuts, x.shape[0]]
        return [np.moveaxis(x[a:b], 0, axis).copy() for a, b in itertools.pairwise(edges)]
    return ref


add_case(LayerCase(type="Slice", id="points_axis1",
                   proto="slice_param { slice_point: 1 slice_point: 4 }",
                   bottoms=[(2, 6, 2)], ntop=3, reference=_slice_ref(1, [1, 4], 3)))
add_case(LayerCase(type="Slice", id="equal_split", bottoms=[(2, 6, 2)], ntop=3,
                   reference=_slice_ref(1, [], 3)))
add_case(LayerCase(type="Slice", id="axis2", proto="slice_param { axis: 2 slice_point: 2 }",
                   bottoms=[(2, 2, 6)], ntop=2, reference=_slice_ref(2, [2], 2)))
add_case(LayerCase(type="Slice", id="axis0_equal", proto="slice_param { axis: 0 }",
                   bottoms=[(4, 3, 2)], ntop=2, reference=_slice_ref(0, [], 2),
                   reshape=[(6, 3, 2)]))
add_case(LayerCase(type="Slice", id="legacy_slice_dim",
                   proto="slice_param { slice_dim: 1 slice_point: 2 }",
                   bottoms=[(2, 5, 2)], ntop=2, reference=_slice_ref(1, [2], 2)))

# -- Split -------------------------------------------------------------------------------------

for _n in (2, 3):
    add_case(LayerCase(type="Split", id=f"{_n}tops", bottoms=[(2, 3, 4)], ntop=_n,
                       reference=lambda b, layer, n=_n: [b[0].copy() for _ in range(n)]))

# -- Eltwise -----------------------------------------------------------------------------------


def _eltwise_ref(op: str, coeff: list[float] | None = None):
    def ref(bottoms, layer):
        out = np.empty_like(bottoms[0])
        c = coeff or [1.0] * len(bottoms)
        for i in range(out.size):
            vals = [b.flat[i] for b in bottoms]
            if op == "SUM":
                out.flat[i] = sum(ci * v for ci, v in zip(c, vals))
            elif op == "PROD":
                out.flat[i] = np.prod(vals)
            else:
                out.flat[i] = max(vals)
        return [out]
    return ref


def _separated(k: int, shape: tuple[int, ...] = (2, 3, 4)):
    """Bottom k of a MAX case: every value of every bottom at least 0.1 from every other."""
    def draw(rng: np.random.Generator) -> np.ndarray:
        n = int(np.prod(shape))
        return (0.3 * rng.permutation(n) + 0.1 * k - 3.0).reshape(shape)
    return draw


add_case(LayerCase(type="Eltwise", id="sum", bottoms=[(2, 3, 4), (2, 3, 4)],
                   reference=_eltwise_ref("SUM")))
add_case(LayerCase(type="Eltwise", id="sum_coeff",
                   proto="eltwise_param { operation: SUM coeff: 1.5 coeff: -0.5 coeff: 2 }",
                   bottoms=[(2, 3, 4)] * 3, reference=_eltwise_ref("SUM", [1.5, -0.5, 2.0])))
add_case(LayerCase(type="Eltwise", id="prod3", proto="eltwise_param { operation: PROD }",
                   bottoms=[(2, 3, 4)] * 3, reference=_eltwise_ref("PROD")))
add_case(LayerCase(type="Eltwise", id="prod_unstable_flag",
                   proto="eltwise_param { operation: PROD stable_prod_grad: false }",
                   bottoms=[(2, 3, 4)] * 2, reference=_eltwise_ref("PROD")))
add_case(LayerCase(type="Eltwise", id="max3", proto="eltwise_param { operation: MAX }",
                   bottoms=[_separated(0), _separated(1), _separated(2)],
                   reference=_eltwise_ref("MAX"), reshape=()))
add_case(LayerCase(type="Eltwise", id="max2", proto="eltwise_param { operation: MAX }",
                   bottoms=[_separated(0, (3, 5)), _separated(2, (3, 5))],
                   reference=_eltwise_ref("MAX"),
                   reshape=[_separated(0, (4, 5)), _separated(2, (4, 5))]))

# -- Flatten / Reshape -------------------------------------------------------------------------


def _reshaped(fn):
    """Reference: the bottom's values in C order, shaped by ``fn(bottom shape)``."""
    return lambda bottoms, layer: [np.array(bottoms[0].ravel().tolist()).reshape(
        fn(bottoms[0].shape))]


add_case(LayerCase(type="Flatten", id="default", bottoms=[(2, 3, 2, 2)],
                   reference=_reshaped(lambda s: (s[0], s[1] * s[2] * s[3]))))
add_case(LayerCase(type="Flatten", id="axis1_end2", proto="flatten_param { axis: 1 end_axis: 2 }",
                   bottoms=[(2, 3, 2, 2)],
                   reference=_reshaped(lambda s: (s[0], s[1] * s[2], s[3]))))
add_case(LayerCase(type="Flatten", id="axis_minus2", proto="flatten_param { axis: -2 }",
                   bottoms=[(2, 3, 2, 2)],
                   reference=_reshaped(lambda s: (s[0], s[1], s[2] * s[3]))))
add_case(LayerCase(type="Flatten", id="axis0", proto="flatten_param { axis: 0 }",
                   bottoms=[(2, 3, 2)], reference=_reshaped(lambda s: (s[0] * s[1] * s[2],))))

add_case(LayerCase(type="Reshape", id="copy_and_infer",
                   proto="reshape_param { shape { dim: 0 dim: -1 } }", bottoms=[(2, 3, 2, 2)],
                   reference=_reshaped(lambda s: (s[0], s[1] * s[2] * s[3]))))
add_case(LayerCase(type="Reshape", id="infer_first",
                   proto="reshape_param { shape { dim: -1 dim: 6 } }", bottoms=[(2, 3, 2, 2)],
                   reference=_reshaped(lambda s: (-1, 6))))
add_case(LayerCase(type="Reshape", id="copy_inner",
                   proto="reshape_param { shape { dim: 0 dim: 0 dim: 2 dim: -1 } }",
                   bottoms=[(2, 3, 4, 2)], reference=_reshaped(lambda s: (s[0], s[1], 2, 4))))
add_case(LayerCase(type="Reshape", id="axis1_num_axes1",
                   proto="reshape_param { shape { dim: 2 dim: 3 } axis: 1 num_axes: 1 }",
                   bottoms=[(2, 6, 2)], reference=_reshaped(lambda s: (s[0], 2, 3, s[2]))))
add_case(LayerCase(type="Reshape", id="append_axis",
                   proto="reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 }",
                   bottoms=[(2, 6, 2)], reference=_reshaped(lambda s: (*s, 1))))
add_case(LayerCase(type="Reshape", id="prepend_axis",
                   proto="reshape_param { shape { dim: 1 } axis: 0 num_axes: 0 }",
                   bottoms=[(2, 6, 2)], reference=_reshaped(lambda s: (1, *s))))
add_case(LayerCase(type="Reshape", id="replace_middle_infer",
                   proto="reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 }",
                   bottoms=[(2, 3, 2, 2)],
                   reference=_reshaped(lambda s: (s[0], s[1] * s[2], s[3]))))
