"""Python layers in a device (GPU) net see host arrays, as in BVLC, through HostLayerAdapter.

The device is stood in for by a backend that reports itself as a GPU but keeps NumPy arrays,
so the copying logic runs here; tests/gpu covers a real device where there is one.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.layer_types.python import HostLayerAdapter
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2


class FakeDevice(backend_mod.Backend):
    """Reports a GPU, stores NumPy arrays."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.kind = "gpu"


NET = """
force_backward: true
layer { name: 'in' type: 'Input' top: 'x' top: 'y'
        input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 4 } } }
layer { name: 'scale' type: 'Python' bottom: 'x' top: 'z'
        python_param { module: 'pycaffe_mpi.testing.pylayers' layer: 'ParamLayer' } }
layer { name: 'loss' type: 'Python' bottom: 'z' bottom: 'y' top: 'loss' loss_weight: 1
        python_param { module: 'pyloss' layer: 'EuclideanLossLayer' } }
"""


def test_python_layers_in_a_device_net_match_the_cpu(monkeypatch):
    monkeypatch.syspath_prepend("tests/data/pylayers")
    param = text_format.Merge(NET, caffe_pb2.NetParameter())
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    results = []
    for backend in (None, FakeDevice()):
        net = Net(param, 0, backend=backend, seed=4, dtype=np.float64)
        kinds = {type(layer).__name__ for layer in net.layers}
        assert ("HostLayerAdapter" in kinds) == (backend is not None)
        net.params["scale"][0].data[...] = 1.5
        out = net.forward(x=x, y=y)
        net.clear_param_diffs()
        diffs = net.backward()
        results.append((float(out["loss"].sum()), np.array(diffs["x"]),
                        np.array(net.params["scale"][0].diff)))
        if backend is not None:
            adapter = next(la for la in net.layers if isinstance(la, HostLayerAdapter))
            assert all(isinstance(b.data, np.ndarray) for b in adapter._bh)
            assert adapter.inner.backend is backend_mod.CPU  # user code got host blobs
    (l0, dx0, dw0), (l1, dx1, dw1) = results
    assert l0 == l1
    np.testing.assert_allclose(dx1, dx0)
    np.testing.assert_allclose(dw1, dw0)
