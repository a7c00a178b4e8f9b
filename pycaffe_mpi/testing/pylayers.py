"""Python layers written exactly as BVLC pycaffe user code, for tests and as examples.

Use them from a prototxt as ``type: "Python"`` with
``python_param { module: "pycaffe_mpi.testing.pylayers" layer: "TimesTenLayer" }``. Importing
this module directly needs ``import caffe`` to resolve: call
``pycaffe_mpi.layer_types.python.install_caffe_alias()`` first (the Python layer type does that
itself before importing a user module).
"""

import json

import caffe


class TimesTenLayer(caffe.Layer):
    """y = m·x with m = 10 (BVLC's test layer); param_str may be JSON ``{"multiplier": m}``."""

    def setup(self, bottom, top):
        self.multiplier = 10.0
        if self.param_str:
            self.multiplier = float(json.loads(self.param_str)["multiplier"])

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.multiplier * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.multiplier * top[0].diff


class ParamLayer(caffe.Layer):
    """y = w·x with one learnable scalar w (param_str JSON ``{"w": value}``, default 1.5)."""

    def setup(self, bottom, top):
        params = json.loads(self.param_str) if self.param_str else {}
        self.blobs.add_blob(1)
        self.blobs[0].data[...] = params.get("w", 1.5)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.blobs[0].data[0] * top[0].diff
        # parameter diffs accumulate (the solver clears them), as in Caffe's own layers
        self.blobs[0].diff[0] += (top[0].diff * bottom[0].data).sum()
