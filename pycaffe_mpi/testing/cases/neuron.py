"""Layer cases for the neuron family: ReLU, Sigmoid, TanH, Dropout (all run in place too)."""

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
