"""User layers written against pycaffe's API (``import caffe``), as BVLC users write them."""

import json

import caffe
import numpy as np


class SimpleLayer(caffe.Layer):
    """y = 10 x, written the way pycaffe user layers are (the classic x10 check)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * 10

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff * 10


class ExceptionLayer(caffe.Layer):
    """Fails in setup, to check that user exceptions surface."""

    def setup(self, bottom, top):
        raise RuntimeError("setup refused on purpose")


class ParameterLayer(caffe.Layer):
    """Identity-shaped layer owning one learnable scalar whose gradient is always 1."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = 1


class PhaseLayer(caffe.Layer):
    """Outputs its own phase (0 TRAIN, 1 TEST) as a scalar."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class SimpleParamLayer(caffe.Layer):
    """y = v x with v parsed from param_str as a float."""

    def setup(self, bottom, top):
        try:
            self.value = float(self.param_str)
        except ValueError as e:
            raise ValueError("param_str must hold a number") from e

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.value

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff * self.value


class JsonScaleLayer(caffe.Layer):
    """y = scale·x + shift, both from a JSON param_str (the common user idiom)."""

    def setup(self, bottom, top):
        params = json.loads(self.param_str)
        self.scale = params["scale"]
        self.shift = params.get("shift", 0.0)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.scale * bottom[0].data + self.shift

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = self.scale * top[0].diff


class ConstantSource(caffe.Layer):
    """A data layer: one top of shape param_str "dims..." filled with 8 (no bottoms)."""

    def setup(self, bottom, top):
        self.shape = [int(d) for d in self.param_str.split()]

    def reshape(self, bottom, top):
        top[0].reshape(*self.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 8

    def backward(self, top, propagate_down, bottom):
        pass


class InitLayer(caffe.Layer):
    """A user __init__ chained to the base with the LayerParameter, as boost.python allowed."""

    def __init__(self, layer_param):
        super().__init__(layer_param)
        self.extra = 5

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.extra * bottom[0].data


class NotALayer:
    """Not a caffe.Layer subclass."""


helper_array = np.zeros(3)
