"""A Euclidean loss as a pycaffe user would write it: loss = sum((a - b)^2) / (2 N)."""

import caffe
import numpy as np


class EuclideanLossLayer(caffe.Layer):
    """Two bottoms of equal count in, a scalar loss out."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("EuclideanLossLayer takes two bottoms")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("both bottoms must hold the same number of values")
        self.delta = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.delta[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = (self.delta ** 2).sum() / (2.0 * bottom[0].num)

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * self.delta / bottom[i].num
