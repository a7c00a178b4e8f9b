"""Layer cases for the normalization family: BatchNorm, MVN, Bias, Scale.

The references are plain float64 loops over channels / rows, written from Caffe's definitions.
BatchNorm's global-statistics cases here see the statistics as set up (all zero, so the layer
divides by sqrt(eps)); tests/unit/test_normalization_layers.py covers nonzero statistics.
"""

from __future__ import annotations

import math

import numpy as np

from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

SHAPE = (2, 3, 4, 5)


# -- BatchNorm ---------------------------------------------------------------------------------
def _bn_ref(eps: float, use_global: bool):
    def ref(bottoms, layer):
        x = bottoms[0]
        n = x.shape[0]
        c = 1 if x.ndim == 1 else x.shape[1]
        x3 = x.reshape(n, c, -1)
        out = np.empty_like(x3)
        for ch in range(c):
            if use_global:
                s = float(layer.blobs[2].data[0])
                f = 0.0 if s == 0 else 1.0 / s
                mean = float(layer.blobs[0].data[ch]) * f
                var = float(layer.blobs[1].data[ch]) * f
            else:
                vals = x3[:, ch, :].ravel()
                mean = sum(vals) / len(vals)
                var = sum((v - mean) ** 2 for v in vals) / len(vals)
            out[:, ch, :] = (x3[:, ch, :] - mean) / math.sqrt(var + eps)
        return [out.reshape(x.shape)]
    return ref


add_case(LayerCase(type="BatchNorm", id="train", bottoms=[SHAPE], reference=_bn_ref(1e-5, False),
                   in_place=True))
add_case(LayerCase(type="BatchNorm", id="train_2d", bottoms=[(6, 4)],
                   reference=_bn_ref(1e-5, False), in_place=True))
add_case(LayerCase(type="BatchNorm", id="train_1d", bottoms=[(7,)],
                   reference=_bn_ref(1e-5, False), in_place=True))
add_case(LayerCase(
    type="BatchNorm", id="train_eps_fraction",
    proto="batch_norm_param { eps: 0.01 moving_average_fraction: 0.9 }",
    bottoms=[lambda rng: 0.1 * rng.standard_normal((3, 2, 3))], reference=_bn_ref(0.01, False),
    reshape=[lambda rng: 0.1 * rng.standard_normal((5, 2, 3))], in_place=True))
add_case(LayerCase(type="BatchNorm", id="test_global_stats", bottoms=[SHAPE], phase=TEST,
                   reference=_bn_ref(1e-5, True), in_place=True))
add_case(LayerCase(type="BatchNorm", id="train_use_global_stats",
                   proto="batch_norm_param { use_global_stats: true eps: 0.5 }",
                   bottoms=[SHAPE], phase=TRAIN, reference=_bn_ref(0.5, True), in_place=True))
add_case(LayerCase(type="BatchNorm", id="test_batch_stats",
                   proto="batch_norm_param { use_global_stats: false }",
                   bottoms=[SHAPE], phase=TEST, reference=_bn_ref(1e-5, False), in_place=True))

# Host-kernel shapes (pycaffe_mpi/kernels/norm_cpu.py): several images of odd sizes, a spatial
# size of 1 (after global pooling), and global statistics that are not all zero.
add_case(LayerCase(type="BatchNorm", id="train_odd_sizes", bottoms=[(5, 3, 7, 3)],
                   reference=_bn_ref(1e-5, False), in_place=True))
add_case(LayerCase(type="BatchNorm", id="train_spatial_1", bottoms=[(6, 4, 1, 1)],
                   reference=_bn_ref(1e-5, False), in_place=True))


def _set_stats(layer):
    layer.blobs[0].data[...] = [0.6, -0.4, 1.0]
    layer.blobs[1].data[...] = [3.0, 0.8, 4.0]
    layer.blobs[2].data[...] = 2.0


# NOTE: no gradient check: the statistics get no gradient by definition, but nonzero ones do
# change the output (tests/unit/test_normalization_layers.py checks the bottom's gradient)
add_case(LayerCase(type="BatchNorm", id="global_stats_nonzero", bottoms=[(3, 3, 5, 2)],
                   phase=TEST, reference=_bn_ref(1e-5, True), prepare=_set_stats,
                   in_place=True, grad=False))


# -- MVN ---------------------------------------------------------------------------------------
def _mvn_ref(normalize_variance: bool, across_channels: bool, eps: float):
    def ref(bottoms, layer):
        x = bottoms[0]
        legacy = (*x.shape, 1, 1, 1, 1)[:4]
        x4 = x.reshape(legacy)
        out = np.empty_like(x4)
        for n in range(legacy[0]):
            groups = [slice(None)] if across_channels else range(legacy[1])
            for ch in groups:
                vals = x4[n, ch]
                mean = vals.sum() / vals.size
                y = vals - mean
                if normalize_variance:
                    std = math.sqrt(float((y * y).sum()) / vals.size)
                    y = y / (std + eps)
                out[n, ch] = y
        return [out]
    return ref


for _nv in (True, False):
    for _across in (False, True):
        add_case(LayerCase(
            type="MVN", id=f"{'mvn' if _nv else 'mean_only'}{'_across' if _across else ''}",
            proto=f"mvn_param {{ normalize_variance: {str(_nv).lower()} "
                  f"across_channels: {str(_across).lower()} }}",
            bottoms=[SHAPE], reference=_mvn_ref(_nv, _across, 1e-9), in_place=True))
add_case(LayerCase(type="MVN", id="defaults_3d", bottoms=[(2, 3, 5)],
                   reference=_mvn_ref(True, False, 1e-9)))
add_case(LayerCase(type="MVN", id="2d_across", proto="mvn_param { across_channels: true }",
                   bottoms=[(4, 6)], reference=_mvn_ref(True, True, 1e-9)))
# A large eps tells "eps added to the standard deviation" from "to the variance". Caffe's
# gradient leaves out a factor (σ + ε)/σ, so it is not the exact one here: no gradient check.
add_case(LayerCase(type="MVN", id="large_eps", proto="mvn_param { eps: 0.5 }",
                   bottoms=[SHAPE], reference=_mvn_ref(True, False, 0.5), grad=False))


# -- Bias and Scale ------------------------------------------------------------------------------
def _lined_up(x_shape, p_shape, axis):
    """The index map of Caffe's broadcast: for each x index, the operand index."""
    axis = 0 if len(p_shape) == 0 else (axis + len(x_shape) if axis < 0 else axis)

    def index(ix):
        return tuple(ix[axis:axis + len(p_shape)])
    return index


def _affine_ref(op: str, axis: int, two_bottoms: bool, bias_term: bool = False):
    def ref(bottoms, layer):
        x = bottoms[0]
        first = bottoms[1] if two_bottoms else np.asarray(layer.blobs[0].data, np.float64)
        index = _lined_up(x.shape, first.shape, axis)
        out = np.empty_like(x)
        for ix in np.ndindex(*x.shape):
            v = x[ix] + first[index(ix)] if op == "bias" else x[ix] * first[index(ix)]
            if bias_term:
                v += np.asarray(layer.blobs[-1].data, np.float64)[index(ix)]
            out[ix] = v
        return [out]
    return ref


_GAUSS = "filler { type: 'gaussian' std: 1 }"
_BIAS_CASES = (  # id, proto inside bias_param, axis, bottoms, reshape
    ("default_filler", "", 1, [SHAPE], None),
    ("axis1", _GAUSS, 1, [SHAPE], None),
    ("axis2_num_axes2", f"axis: 2 num_axes: 2 {_GAUSS}", 2, [SHAPE], None),
    ("to_the_end", f"num_axes: -1 {_GAUSS}", 1, [SHAPE], None),
    ("negative_axis", f"axis: -2 {_GAUSS}", -2, [SHAPE], None),
    ("scalar", f"num_axes: 0 {_GAUSS}", 1, [SHAPE], None),
    ("axis0_everything", f"axis: 0 num_axes: -1 {_GAUSS}", 0, [SHAPE], [SHAPE]),
    ("two_bottoms", "", 1, [SHAPE, (3, 4)], [(3, 3, 4, 5), (3, 4)]),
    ("two_bottoms_axis2", "axis: 2", 2, [SHAPE, (4, 5)], [(1, 2, 4, 5), (4, 5)]),
    ("two_bottoms_scalar", "axis: 3", 3, [SHAPE, ()], None),
    ("odd_sizes", _GAUSS, 1, [(5, 3, 7, 3)], None),
)
for _id, _p, _axis, _bottoms, _reshape in _BIAS_CASES:
    _two = len(_bottoms) == 2
    add_case(LayerCase(type="Bias", id=_id, proto=f"bias_param {{ {_p} }}", bottoms=_bottoms,
                       reference=_affine_ref("bias", _axis, _two), reshape=_reshape,
                       in_place=not _two))

_BG = "bias_term: true bias_filler { type: 'gaussian' std: 1 }"
_SCALE_CASES = (  # id, proto inside scale_param, axis, bottoms, reshape, bias_term
    ("default_filler", "", 1, [SHAPE], None, False),
    ("axis1", _GAUSS, 1, [SHAPE], None, False),
    ("axis1_bias", f"{_GAUSS} {_BG}", 1, [SHAPE], None, True),
    ("axis2_num_axes2_bias", f"axis: 2 num_axes: 2 {_GAUSS} {_BG}", 2, [SHAPE], None, True),
    ("to_the_end", f"num_axes: -1 {_GAUSS}", 1, [SHAPE], None, False),
    ("negative_axis_bias", f"axis: -1 {_GAUSS} {_BG}", -1, [SHAPE], None, True),
    ("scalar_bias", f"num_axes: 0 {_GAUSS} {_BG}", 1, [SHAPE], None, True),
    ("eltwise", f"axis: 0 num_axes: -1 {_GAUSS}", 0, [SHAPE], [SHAPE], False),
    ("default_bias_filler", f"{_GAUSS} bias_term: true", 1, [SHAPE], None, True),
    ("two_bottoms", "", 1, [SHAPE, (3, 4)], [(3, 3, 4, 5), (3, 4)], False),
    ("two_bottoms_bias", _BG, 1, [SHAPE, (3, 4)], [(3, 3, 4, 5), (3, 4)], True),
    ("two_bottoms_scalar", "axis: 3", 3, [SHAPE, ()], None, False),
    ("odd_sizes_bias", f"{_GAUSS} {_BG}", 1, [(5, 3, 7, 3)], None, True),
    ("spatial_1_bias", f"{_GAUSS} {_BG}", 1, [(6, 4, 1, 1)], None, True),
)
for _id, _p, _axis, _bottoms, _reshape, _bias in _SCALE_CASES:
    _two = len(_bottoms) == 2
    add_case(LayerCase(type="Scale", id=_id, proto=f"scale_param {{ {_p} }}", bottoms=_bottoms,
                       reference=_affine_ref("scale", _axis, _two, _bias), reshape=_reshape,
                       in_place=not _two))
