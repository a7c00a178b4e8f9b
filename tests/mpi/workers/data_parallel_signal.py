"""A pycaffe Python layer that signals its own process, for the data-parallel signal test.

Identity (y = x, dy = dx) on every rank; on world rank ``rank`` its ``n``-th forward (0-based)
sends this process the signals listed for ``n``::

    python_param { module: "data_parallel_signal" layer: "Signal"
                   param_str: '{"rank": 0, "at": {"2": "SIGHUP", "5": "SIGINT"}}' }
"""

import json
import os
import signal

import caffe

from pycaffe_mpi import comm as comm_mod


class Signal(caffe.Layer):
    def setup(self, bottom, top):
        p = json.loads(self.param_str)
        self.mine = comm_mod.world().rank == int(p["rank"])
        self.at = {int(k): v for k, v in p.get("at", {}).items()}
        self.forwards = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        if self.mine and self.forwards in self.at:
            os.kill(os.getpid(), getattr(signal, self.at[self.forwards]))
        self.forwards += 1
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
