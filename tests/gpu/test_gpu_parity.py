"""GPU (CuPy) parity: every layer case gives the CPU's results on a CUDA device.

Skipped cleanly where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import build_layer, make_bottoms

pytestmark = pytest.mark.skipif(not backend_mod.gpu_available(),
                                reason="needs CuPy and a CUDA device")

CASES = [c for c in layer_cases.all_cases() if c.type not in ("Python", "Data")]


def _run(case, bottoms, backend):
    layer, bb, tb = build_layer(case, bottoms, np.float64, backend=backend)
    if case.stochastic:
        layer.rng = np.random.default_rng(7)
    layer.forward(bb, tb)
    rng = np.random.default_rng(3)
    for t in tb:
        t.diff[...] = backend_mod.CPU.asarray(rng.standard_normal(t.shape)) \
            if backend is None else backend.asarray(rng.standard_normal(t.shape))
    for p in layer.blobs:
        p.diff[...] = 0
    if case.grad:
        checked = [i for i in range(len(bb)) if layer.allow_force_backward(i)]
        if case.grad_bottoms is not None:
            checked = list(case.grad_bottoms)
        layer.backward(tb, [i in checked for i in range(len(bb))], bb)
    else:
        checked = []
    host = backend_mod.to_host
    return ([host(t.data) for t in tb], [host(bb[i].diff) for i in checked],
            [host(p.diff) for p in layer.blobs], [host(p.data) for p in layer.blobs])


@pytest.mark.parametrize("case", CASES, ids=[c.test_id for c in CASES])
def test_gpu_matches_cpu(case):
    gpu = backend_mod.Backend("gpu", 0)
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    want = _run(case, bottoms, None)
    got = _run(case, bottoms, gpu)
    for kind, ws, gs in zip(("top", "bottom diff", "param diff", "param"), want, got):
        for i, (w, g) in enumerate(zip(ws, gs)):
            np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9, err_msg=f"{kind} {i}")


def test_gpu_net_trains_like_cpu():
    from google.protobuf import text_format

    from pycaffe_mpi.net import Net
    from pycaffe_mpi.proto import caffe_pb2

    text = """
    layer { name: 'd' type: 'DummyData' top: 'x' top: 'y'
      dummy_data_param { shape { dim: 8 dim: 3 dim: 12 dim: 12 } shape { dim: 8 }
        data_filler { type: 'gaussian' } data_filler { type: 'uniform' min: 0 max: 3.9 } } }
    layer { name: 'c' type: 'Convolution' bottom: 'x' top: 'c'
      convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: 'xavier' } } }
    layer { name: 'p' type: 'Pooling' bottom: 'c' top: 'p'
      pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: 'r' type: 'ReLU' bottom: 'p' top: 'p' }
    layer { name: 'ip' type: 'InnerProduct' bottom: 'p' top: 'ip'
      inner_product_param { num_output: 4 weight_filler { type: 'xavier' } } }
    layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'y' top: 'loss' }
    """
    param = text_format.Merge(text, caffe_pb2.NetParameter())
    cpu = Net(param, 0, seed=5, dtype=np.float64)
    gpu = Net(param, 0, seed=5, dtype=np.float64, backend=backend_mod.Backend("gpu", 0))
    assert cpu.forward_backward() == pytest.approx(gpu.forward_backward(), rel=1e-9)
    for a, b in zip(cpu.learnable_params, gpu.learnable_params):
        np.testing.assert_allclose(backend_mod.to_host(b.diff), a.diff, rtol=1e-7, atol=1e-10)
