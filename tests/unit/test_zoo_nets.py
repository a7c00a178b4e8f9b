"""Well-known Caffe nets build with the blob shapes Caffe's rules give, and train.

The nets come from :mod:`pycaffe_mpi.testing.zoo` (NetSpec builders in the shapes of the public
deploy files). Each is built at its deploy input size and its characteristic blobs are checked
against the sizes Caffe computes (convolution floor, pooling ceil with its padding rule, Crop
offsets, Deconvolution growth); then a training variant (label input and SoftmaxWithLoss) runs
forward and backward, at a smaller input where the net allows it.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.net import Net
from pycaffe_mpi.testing import zoo

DEPLOY_SHAPES = {
    "resnet50": ({}, {
        "conv1": (1, 64, 112, 112), "pool1": (1, 64, 56, 56), "res2c": (1, 256, 56, 56),
        "res3d": (1, 512, 28, 28), "res4f": (1, 1024, 14, 14), "res5c": (1, 2048, 7, 7),
        "pool5": (1, 2048, 1, 1), "fc1000": (1, 1000), "prob": (1, 1000)}),
    "squeezenet_v11": ({}, {
        "conv1": (1, 64, 113, 113), "pool1": (1, 64, 56, 56), "fire3/concat": (1, 128, 56, 56),
        "pool3": (1, 128, 28, 28), "fire5/concat": (1, 256, 28, 28), "pool5": (1, 256, 14, 14),
        "fire9/concat": (1, 512, 14, 14), "conv10": (1, 1000, 14, 14),
        "pool10": (1, 1000, 1, 1)}),
    "mobilenet_v1": ({}, {
        "conv1": (1, 32, 112, 112), "conv2_2/sep": (1, 128, 56, 56),
        "conv3_2/sep": (1, 256, 28, 28), "conv4_2/sep": (1, 512, 14, 14),
        "conv5_6/dw": (1, 512, 7, 7), "conv6/sep": (1, 1024, 7, 7), "pool6": (1, 1024, 1, 1),
        "fc7": (1, 1000, 1, 1)}),
    # pool1 is 3x3/2 with pad 1 on 112: ceil(111 / 2) + 1 = 57 (Caffe's rounding up)
    "densenet121": ({}, {
        "conv1": (1, 64, 112, 112), "pool1": (1, 64, 57, 57), "concat_2_6": (1, 256, 57, 57),
        "pool2": (1, 128, 29, 29), "concat_3_12": (1, 512, 29, 29), "pool3": (1, 256, 15, 15),
        "concat_4_24": (1, 1024, 15, 15), "pool4": (1, 512, 8, 8),
        "concat_5_16": (1, 1024, 8, 8), "pool5": (1, 1024, 1, 1), "fc6": (1, 1000, 1, 1)}),
    # FCN at the deploy size 500 with conv1_1 padded by 100; channels divided by 8 for memory
    "fcn32s": ({"width": 8}, {
        "conv1_1": (1, 8, 698, 698), "pool5": (1, 64, 22, 22), "fc6": (1, 512, 16, 16),
        "score_fr": (1, 21, 16, 16), "upscore": (1, 21, 544, 544), "score": (1, 21, 500, 500)}),
    "fcn8s": ({"width": 8}, {
        "upscore2": (1, 21, 34, 34), "score_pool4c": (1, 21, 34, 34),
        "upscore_pool4": (1, 21, 70, 70), "score_pool3c": (1, 21, 70, 70),
        "upscore8": (1, 21, 568, 568), "score": (1, 21, 500, 500)}),
    "googlenet": ({}, {
        "conv1/7x7_s2": (1, 64, 112, 112), "pool2/3x3_s2": (1, 192, 28, 28),
        "inception_3b/output": (1, 480, 28, 28), "inception_4e/output": (1, 832, 14, 14),
        "inception_5b/output": (1, 1024, 7, 7), "pool5/7x7_s1": (1, 1024, 1, 1),
        "loss3/classifier": (1, 1000)}),
    "caffenet": ({"width": 4}, {
        "conv1": (1, 24, 55, 55), "pool1": (1, 24, 27, 27), "pool2": (1, 64, 13, 13),
        "conv5": (1, 64, 13, 13), "pool5": (1, 64, 6, 6), "fc6": (1, 1024), "fc8": (1, 1000)}),
    "siamese_lenet": ({}, {
        "data": (4, 1, 28, 28), "data_p": (4, 1, 28, 28), "pool2": (4, 50, 4, 4),
        "feat": (4, 2), "feat_p": (4, 2), "loss": ()}),
    "lstm_language_model": ({}, {
        "embedded_input_sentence": (5, 3, 16), "lstm1": (5, 3, 16), "predict": (5, 3, 20),
        "cross_entropy_loss": ()}),
}


@pytest.mark.parametrize("name", sorted(DEPLOY_SHAPES))
def test_deploy_shapes(name):
    kwargs, want = DEPLOY_SHAPES[name]
    net = Net(zoo.NETS[name](**kwargs), TEST, seed=1)
    got = {b: tuple(net.blobs[b].shape) for b in want}
    assert got == want


# Training variants: builder arguments for a quick forward and backward
TRAINING = {
    "resnet50": {"batch": 1, "size": 224},
    "squeezenet_v11": {"batch": 2, "size": 63},
    "mobilenet_v1": {"batch": 2, "size": 64},
    "densenet121": {"batch": 1, "size": 64},
    "fcn32s": {"batch": 1, "size": 32, "width": 16, "num_classes": 5},
    "fcn8s": {"batch": 1, "size": 32, "width": 16, "num_classes": 5},
    "googlenet": {"batch": 1, "size": 224},
    "caffenet": {"batch": 2, "size": 227, "width": 8},
}


def _fill_inputs(net, rng, num_classes):
    for name in net.inputs:
        blob = net.blobs[name]
        if name in ("label", "sim"):
            blob.data[...] = rng.integers(0, num_classes, blob.shape)
        elif name in ("input_sentence", "target_sentence"):
            blob.data[...] = rng.integers(0, 20, blob.shape)
        elif name == "cont_sentence":
            blob.data[...] = 1
            blob.data[0] = 0
        else:
            blob.data[...] = rng.standard_normal(blob.shape)


def _train_step(net, num_classes):
    rng = np.random.default_rng(0)
    for layer in net.layers:  # FCN's deploy file has no fillers: its users start from VGG
        if layer.type == "Convolution" and not np.any(layer.blobs[0].data):
            layer.blobs[0].data[...] = 0.05 * rng.standard_normal(layer.blobs[0].shape)
    _fill_inputs(net, rng, num_classes)
    loss = net.forward_loss()
    net.backward_all()
    assert np.isfinite(loss) and loss > 0
    learnable = [p for layer in net.layers for p in layer.blobs]
    assert learnable
    first = next(layer for layer in net.layers if layer.blobs and layer.type != "BatchNorm")
    assert np.abs(first.blobs[0].diff).sum() > 0, f"no gradient reached {first.name}"
    return loss


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_image_net_trains(name):
    kwargs = {"num_classes": 1000, **TRAINING[name]}
    net = Net(zoo.NETS[name](loss=True, **kwargs), TRAIN, seed=1)
    _train_step(net, kwargs["num_classes"])


def test_siamese_shares_weights_and_trains():
    net = Net(zoo.siamese_lenet(), TRAIN, seed=1)
    conv1, conv1_p = net.layer_dict["conv1"], net.layer_dict["conv1_p"]
    assert conv1.blobs[0].data is conv1_p.blobs[0].data or np.shares_memory(
        conv1.blobs[0].data, conv1_p.blobs[0].data)
    _train_step(net, 2)


def test_lstm_language_model_trains():
    net = Net(zoo.lstm_language_model(), TRAIN, seed=1)
    loss = _train_step(net, 20)
    assert loss == pytest.approx(np.log(20), rel=0.2)  # near uniform at the start
