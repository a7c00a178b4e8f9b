"""Layer cases for the neuron family: ReLU, Sigmoid, TanH, Dropout, AbsVal, BNLL, Clip, ELU,
Exp, Log, Power, PReLU, Swish, Threshold (all but AbsVal and Threshold also run in place)."""

from __future__ import annotations

import math

import numpy as np

from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

SHAPE = (2, 3, 4, 5)  # Caffe's test_neuron_layer input


def _away_from_zero(rng: np.random.Generator) -> np.ndarray:
    """N(0, 1) values pushed at least 0.05 away from the kink at 0."""
    x = rng.standard_normal(SHAPE)
    return x + np.where(x >= 0, 0.05, -0.05)


def _relu_ref(slope: float):
    def ref(bottoms, layer):
        x = bottoms[0]
        out = np.empty_like(x)
        for i, v in enumerate(x.flat):
            out.flat[i] = v if v > 0 else slope * v
        return [out]
    return ref


for _id, _slope in (("plain", None), ("leaky", 0.01), ("negative_slope", -0.5)):
    _proto = "" if _slope is None else f"relu_param {{ negative_slope: {_slope} }}"
    add_case(LayerCase(
        type="ReLU", id=_id, proto=_proto, bottoms=[SHAPE],
        reference=_relu_ref(_slope or 0.0), kink=0.0, kink_range=0.01, in_place=True))

add_case(LayerCase(
    type="ReLU", id="away_from_kink", proto="relu_param { negative_slope: 0.25 }",
    bottoms=[_away_from_zero], reference=_relu_ref(0.25), in_place=True))


def _sigmoid_ref(bottoms, layer):
    return [np.vectorize(lambda v: 1.0 / (1.0 + math.exp(-v)))(bottoms[0])]


def _tanh_ref(bottoms, layer):
    return [np.vectorize(math.tanh)(bottoms[0])]


add_case(LayerCase(type="Sigmoid", id="plain", bottoms=[SHAPE], reference=_sigmoid_ref,
                   in_place=True))
add_case(LayerCase(type="Sigmoid", id="large",
                   bottoms=[lambda rng: 8 * rng.standard_normal((3, 7))],
                   reference=_sigmoid_ref, in_place=True))
add_case(LayerCase(type="TanH", id="plain", bottoms=[SHAPE], reference=_tanh_ref, in_place=True))


def _dropout_ref(ratio: float, phase: int):
    def ref(bottoms, layer):
        x = bottoms[0]
        if phase == TEST:
            return [x.copy()]
        # The suite reseeds layer.rng with default_rng(7) before the forward; redraw the mask.
        u = np.random.default_rng(7).random(x.shape)
        out = np.zeros_like(x)
        for i in range(x.size):
            if u.flat[i] >= ratio:
                out.flat[i] = x.flat[i] / (1.0 - ratio)
        return [out]
    return ref


for _ratio in (0.5, 0.75):
    add_case(LayerCase(
        type="Dropout", id=f"train_{_ratio}",
        proto=f"dropout_param {{ dropout_ratio: {_ratio} }}", bottoms=[SHAPE],
        reference=_dropout_ref(_ratio, TRAIN), stochastic=True, in_place=True))
add_case(LayerCase(
    type="Dropout", id="test_phase", proto="dropout_param { dropout_ratio: 0.5 }",
    bottoms=[SHAPE], reference=_dropout_ref(0.5, TEST), phase=TEST, in_place=True))
add_case(LayerCase(
    type="Dropout", id="train_default_ratio", bottoms=[(3, 10)],
    reference=_dropout_ref(0.5, TRAIN), stochastic=True, in_place=True))


# -- the remaining BVLC neurons: references are scalar formulas applied element by element ------


def _elementwise(f):
    """A reference applying the scalar function ``f(v)`` to every element of bottom 0."""
    def ref(bottoms, layer):
        x = bottoms[0]
        out = np.empty_like(x)
        for i, v in enumerate(x.flat):
            out.flat[i] = f(float(v))
        return [out]
    return ref


def _uniform(lo: float, hi: float, shape=SHAPE):
    return lambda rng: rng.uniform(lo, hi, shape)


def _avoiding(points, shape=SHAPE, gap: float = 0.02):
    """N(0, 1) values with every element at least ``gap`` away from each of ``points``."""
    def draw(rng):
        x = rng.standard_normal(shape)
        for p in points:
            near = np.abs(x - p) < gap
            x[near] = p + np.where(x[near] >= p, gap, -gap)
        return x
    return draw


add_case(LayerCase(type="AbsVal", id="plain", bottoms=[_away_from_zero],
                   reference=_elementwise(abs), reshape=[(3, 3, 4, 5)]))
add_case(LayerCase(type="AbsVal", id="kinked", bottoms=[SHAPE], reference=_elementwise(abs),
                   kink=0.0, kink_range=0.01))

add_case(LayerCase(type="BNLL", id="plain", bottoms=[SHAPE],
                   reference=_elementwise(lambda v: math.log(1.0 + math.exp(v))), in_place=True))
add_case(LayerCase(type="BNLL", id="large", bottoms=[lambda rng: 20 * rng.standard_normal((4, 6))],
                   reference=_elementwise(lambda v: v + math.log1p(math.exp(-v)) if v > 0
                                          else math.log1p(math.exp(v))),
                   in_place=True, reshape=[(5, 6)]))

add_case(LayerCase(type="Clip", id="plain", proto="clip_param { min: -0.5 max: 0.6 }",
                   bottoms=[_avoiding((-0.5, 0.6))],
                   reference=_elementwise(lambda v: min(max(v, -0.5), 0.6)), in_place=True,
                   reshape=[(3, 3, 4, 5)]))

for _alpha in (None, 0.5, -0.3):
    _a = 1.0 if _alpha is None else _alpha
    add_case(LayerCase(
        type="ELU", id=f"alpha_{_a}",
        proto="" if _alpha is None else f"elu_param {{ alpha: {_a} }}",
        bottoms=[_away_from_zero], in_place=True, reshape=[(3, 3, 4, 5)],
        reference=_elementwise(lambda v, a=_a: v if v > 0 else a * (math.exp(v) - 1.0))))

for _id, _base, _scale, _shift in (("default", None, 1.0, 0.0), ("base2", 2.0, 0.5, 1.0),
                                   ("base_e_scaled", -1.0, -0.7, 0.3)):
    _b = "" if _base is None else f"base: {_base} "
    add_case(LayerCase(
        type="Exp", id=_id, proto=f"exp_param {{ {_b}scale: {_scale} shift: {_shift} }}",
        bottoms=[SHAPE], in_place=True,
        reference=_elementwise(lambda v, b=_base or -1.0, s=_scale, t=_shift:
                               (math.e if b == -1.0 else b) ** (t + s * v))))

for _id, _base, _scale, _shift in (("default", None, 1.0, 0.0), ("base10", 10.0, 2.0, 0.5),
                                   ("base_e_shifted", -1.0, 0.8, 1.5)):
    _b = "" if _base is None else f"base: {_base} "
    add_case(LayerCase(
        type="Log", id=_id, proto=f"log_param {{ {_b}scale: {_scale} shift: {_shift} }}",
        bottoms=[_uniform(0.5, 2.0)], in_place=True, reshape=[_uniform(0.5, 2.0, (3, 3, 4, 5))],
        reference=_elementwise(lambda v, b=_base or -1.0, s=_scale, t=_shift:
                               math.log(t + s * v) / (1.0 if b == -1.0 else math.log(b)))))

# (id, power, scale, shift, bottom): Caffe's test_power_layer settings and the special cases
for _id, _p, _s, _t, _bot in (
        ("square", 2.0, 0.5, 1.0, SHAPE),
        ("fractional", 0.37, 0.83, -2.4, _uniform(3.5, 5.0)),
        ("linear", 1.0, 2.0, 3.0, SHAPE),
        ("power0", 0.0, 0.83, -2.4, SHAPE),
        ("scale0", 2.0, 0.0, 3.0, SHAPE),
        ("cube_noshift", 3.0, -1.5, 0.0, SHAPE)):
    add_case(LayerCase(
        type="Power", id=_id, proto=f"power_param {{ power: {_p} scale: {_s} shift: {_t} }}",
        bottoms=[_bot], in_place=True, threshold=1e-4,
        reshape=None if isinstance(_bot, tuple) else [_uniform(3.5, 5.0, (3, 3, 4, 5))],
        reference=_elementwise(lambda v, p=_p, s=_s, t=_t: 1.0 if p == 0 else (t + s * v) ** p)))


def _prelu_ref(bottoms, layer):
    x = bottoms[0]
    a = np.asarray(layer.blobs[0].data, np.float64).reshape(-1)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        slope = a[0] if a.size == 1 else a[idx[1]]
        out[idx] = x[idx] if x[idx] > 0 else slope * x[idx]
    return [out]


for _id, _proto, _bot in (
        ("default_filler", "", _away_from_zero),
        ("channelwise", "prelu_param { filler { type: 'gaussian' std: 0.5 } }", _away_from_zero),
        ("shared", "prelu_param { channel_shared: true filler { type: 'gaussian' } }",
         _away_from_zero),
        ("two_axes", "prelu_param { filler { type: 'uniform' min: -1 max: 1 } }",
         lambda rng: (lambda x: x + np.where(x >= 0, 0.05, -0.05))(rng.standard_normal((4, 3))))):
    add_case(LayerCase(type="PReLU", id=_id, proto=_proto, bottoms=[_bot], in_place=True,
                       reference=_prelu_ref,
                       reshape=[(3, *SHAPE[1:])] if _id != "two_axes" else [(5, 3)]))

for _id, _beta in (("default", None), ("beta1.5", 1.5), ("large", 0.5)):
    _bb = 1.0 if _beta is None else _beta
    add_case(LayerCase(
        type="Swish", id=_id, proto="" if _beta is None else f"swish_param {{ beta: {_bb} }}",
        bottoms=[SHAPE if _id != "large" else (lambda rng: 6 * rng.standard_normal((3, 7)))],
        in_place=True, reshape=None if _id != "large" else [(4, 7)],
        reference=_elementwise(lambda v, b=_bb: v / (1.0 + math.exp(-b * v)))))

for _id, _thr in (("default", None), ("positive", 0.3)):
    _t = 0.0 if _thr is None else _thr
    add_case(LayerCase(
        type="Threshold", id=_id,
        proto="" if _thr is None else f"threshold_param {{ threshold: {_t} }}",
        bottoms=[_avoiding((_t,))], grad=False, reshape=[(3, 3, 4, 5)],
        reference=_elementwise(lambda v, t=_t: 1.0 if v > t else 0.0)))
