"""GPU (CuPy) parity: every layer case, the solver update rules and a short CIFAR10-Quick training
give the CPU's results on a CUDA device.

Skipped cleanly, with the reason in the skip message and in pytest's header, where CuPy or a CUDA
device is missing (``pytest -rs tests/gpu`` lists it).

Tolerances: float64 must agree to rounding (summation order differs between BLAS and cuBLAS and
between NumPy's and CuPy's reductions); float32 within ``F32_TOL`` (rtol, and atol relative to
the largest reference value), looser for the cases listed, whose outputs come out of long sums or
of exp/pow of large arguments.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from gpu_support import gpu_skip_reason, run_case

from pycaffe_mpi import backend as backend_mod
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import make_bottoms

pytestmark = pytest.mark.skipif(gpu_skip_reason() is not None, reason=gpu_skip_reason() or "")

CASES = [c for c in layer_cases.all_cases() if c.type not in ("Python", "Data")]

F64_TOL = (1e-7, 1e-9)
F32_TOL = (2e-4, 2e-5)  # default (rtol, atol relative to max |reference|)
# Per layer type or case id: outputs of long accumulations or steep functions.
F32_LOOSE = {
    "Convolution": (1e-3, 1e-4), "Deconvolution": (1e-3, 1e-4), "InnerProduct": (1e-3, 1e-4),
    "LRN": (1e-3, 1e-4), "BatchNorm": (2e-3, 2e-4), "MVN": (2e-3, 2e-4),
    "Normalize": (1e-3, 1e-4), "Exp": (1e-3, 1e-4), "Power": (1e-3, 1e-4), "Log": (1e-3, 1e-4),
    "RNN": (1e-3, 1e-4), "LSTM": (1e-3, 1e-4), "Embed": (1e-3, 1e-4),
    "MultipleChoiceLoss": (1e-3, 1e-4), "ProbabilityAverageLoss": (1e-3, 1e-4),
}


def f32_tol(case) -> tuple[float, float]:
    return F32_LOOSE.get(case.test_id) or F32_LOOSE.get(case.type) or F32_TOL


def _gpu():
    return backend_mod.Backend("gpu", 0)


def _compare(want, got, rtol, atol_rel, what):
    for kind, ws, gs in zip(("top", "bottom diff", "param diff", "param"), want, got):
        for i, (w, g) in enumerate(zip(ws, gs)):
            scale = max(1.0, float(np.abs(w).max())) if np.size(w) else 1.0
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_rel * scale,
                                       err_msg=f"{what}: {kind} {i}")


@pytest.mark.parametrize("case", CASES, ids=[c.test_id for c in CASES])
def test_gpu_matches_cpu_float64(case):
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    want = run_case(case, bottoms, None)
    got = run_case(case, bottoms, _gpu())
    _compare(want, got, *F64_TOL, "float64")


@pytest.mark.parametrize("case", CASES, ids=[c.test_id for c in CASES])
def test_gpu_matches_cpu_float32(case):
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    want = run_case(case, bottoms, None, np.float32)
    got = run_case(case, bottoms, _gpu(), np.float32)
    _compare(want, got, *f32_tol(case), "float32")


SMALL_NET = """
layer { name: 'd' type: 'DummyData' top: 'x' top: 'y'
  dummy_data_param { shape { dim: 8 dim: 3 dim: 12 dim: 12 } shape { dim: 8 }
    data_filler { type: 'gaussian' } data_filler { type: 'uniform' min: 0 max: 3.9 } } }
layer { name: 'c' type: 'Convolution' bottom: 'x' top: 'c'
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: 'xavier' }
    bias_filler { type: 'constant' value: 0.1 } } }
layer { name: 'p' type: 'Pooling' bottom: 'c' top: 'p'
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: 'r' type: 'ReLU' bottom: 'p' top: 'p' }
layer { name: 'n' type: 'LRN' bottom: 'p' top: 'n' lrn_param { local_size: 3 alpha: 0.1 } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'n' top: 'ip'
  inner_product_param { num_output: 4 weight_filler { type: 'xavier' } } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'y' top: 'loss' }
"""


def _net_param(text):
    from google.protobuf import text_format

    from pycaffe_mpi.proto import caffe_pb2

    return text_format.Merge(text, caffe_pb2.NetParameter())


def test_gpu_net_trains_like_cpu():
    from pycaffe_mpi.net import Net

    param = _net_param(SMALL_NET)
    cpu = Net(param, 0, seed=5, dtype=np.float64)
    gpu = Net(param, 0, seed=5, dtype=np.float64, backend=_gpu())
    assert float(gpu.forward_backward()) == pytest.approx(float(cpu.forward_backward()),
                                                          rel=1e-9)
    for a, b in zip(cpu.learnable_params, gpu.learnable_params):
        np.testing.assert_allclose(backend_mod.to_host(b.diff), a.diff, rtol=1e-7, atol=1e-10)


RULES = ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]


@pytest.mark.parametrize("rule", RULES)
def test_solver_steps_match(rule):
    from pycaffe_mpi import solvers
    from pycaffe_mpi.proto import caffe_pb2

    def run(backend):
        sp = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=0.004,
                                       lr_policy="fixed", max_iter=100, display=0,
                                       random_seed=1, type=rule, delta=1e-6)
        if rule in ("AdaGrad", "RMSProp"):
            sp.momentum = 0  # Caffe refuses momentum with these
        if rule == "AdaDelta":
            sp.base_lr = 1.0
        sp.net_param.CopyFrom(_net_param(SMALL_NET))
        s = solvers.Solver(sp, backend=backend, dtype=np.float64)
        s.step(3)
        return [backend_mod.to_host(p.data) for p in s.net.learnable_params]

    for a, b in zip(run(None), run(_gpu())):
        np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-9)


def test_cifar10_quick_trains_like_cpu():
    """20 SGD iterations of CIFAR10-Quick (batch 100, synthetic CIFAR-shaped data drawn from
    the same seed on both): every iteration's loss within 1e-3."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import _nets

    from pycaffe_mpi import solvers
    from pycaffe_mpi.proto import caffe_pb2

    net = os.path.join(os.path.dirname(__file__), "..", "..", "models", "cifar10_quick",
                       "train_test.prototxt")

    def losses(backend):
        sp = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=0.004,
                                       lr_policy="fixed", max_iter=100, display=0,
                                       random_seed=1)
        sp.net_param.CopyFrom(_nets.with_dummy_data(net, 100))
        s = solvers.Solver(sp, backend=backend)
        out = []
        for _ in range(20):
            s.step(1)
            out.append(float(s.smoothed_loss))
        return np.array(out)

    want, got = losses(None), losses(_gpu())
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_late_flag_arrives_after_the_device_gets_there():
    gpu = _gpu()
    flag = backend_mod.LateFlag(gpu.xp, gpu.xp.asarray(True))
    gpu.synchronize()
    assert flag.value() is True
    assert backend_mod.LateFlag(np, np.asarray(False)).value() is False


def test_uploads_arrive_intact():
    gpu = _gpu()
    up = backend_mod.Uploader(slots=2)
    outs = [up(gpu.xp, np.full((64, 64), float(i), np.float32)) for i in range(6)]
    gpu.synchronize()
    assert [float(backend_mod.to_host(o)[7, 7]) for o in outs] == [float(i) for i in range(6)]
