"""Shared blob gradients (pycaffe_mpi/diff_sharing.py): same gradients, less memory.

A net with in-place chains, an implicit Split, Eltwise, Concat, BatchNorm in training mode, a
branch that does not back-propagate into one of its bottoms and two losses runs forward and
backward with and without shared diffs: every parameter gradient and the input's gradient are
bit-identical, no two blobs in one buffer are alive at the same time, and the buffers hold far
less than one diff per blob. The solver shares by default and `--share_diffs=false` turns it off.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pycaffe_mpi import diff_sharing, prototxt, solvers
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

NET = """
name: "mini_res"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 3 dim: 3 dim: 8 dim: 8 } shape { dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn2a" type: "BatchNorm" bottom: "conv2a" top: "conv2a" }
layer { name: "scale2a" type: "Scale" bottom: "conv2a" top: "conv2a"
  scale_param { bias_term: true filler { type: "gaussian" std: 1 } } }
layer { name: "relu2a" type: "ReLU" bottom: "conv2a" top: "conv2a" }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
  convolution_param { num_output: 4 kernel_size: 1
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "relu3" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "pool_sum" type: "Pooling" bottom: "sum" top: "pool_sum"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "cat" type: "Concat" bottom: "pool" bottom: "pool_sum" top: "cat" }
layer { name: "ip" type: "InnerProduct" bottom: "cat" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "ip_side" type: "InnerProduct" bottom: "conv2b" top: "ip_side"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "loss_side" type: "SoftmaxWithLoss" bottom: "ip_side" bottom: "label"
  top: "loss_side" propagate_down: true propagate_down: false loss_weight: 0.5 }
layer { name: "ip_stop" type: "InnerProduct" bottom: "pool_sum" top: "ip_stop"
  propagate_down: false
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "loss_stop" type: "EuclideanLoss" bottom: "ip_stop" bottom: "ip" top: "loss_stop"
  propagate_down: true propagate_down: false loss_weight: 0.1 }
"""


def _net(share: bool) -> Net:
    param = prototxt.parse_text(NET, caffe_pb2.NetParameter())
    return Net(param, caffe_pb2.TRAIN, dtype=np.float64, seed=3, share_diffs=share)


def _pass(net: Net, rng: np.random.Generator) -> dict[str, np.ndarray]:
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 5, net.blobs["label"].shape)
    net.clear_param_diffs()
    net.forward_backward()
    out = {"data_diff": net.blobs["data"].diff.copy()}
    for name, layer in zip(net.layer_names, net.layers):
        for j, b in enumerate(layer.blobs):
            out[f"{name}/{j}"] = b.diff.copy()
    return out


def test_shared_diffs_give_the_same_gradients() -> None:
    plain, shared = _net(False), _net(True)
    assert shared.shares_diffs and not plain.shares_diffs
    for seed in range(3):  # several passes: stale contents of a shared buffer must not leak
        a, b = _pass(plain, np.random.default_rng(seed)), _pass(shared, np.random.default_rng(seed))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_buffers_never_hold_two_live_gradients_and_save_memory() -> None:
    net = _net(True)
    spans = diff_sharing.intervals(net)
    groups = diff_sharing.plan(net)
    for group in groups:
        ranges = sorted(spans[id(b)][:2] for b in group)
        for (_, end), (start, _) in itertools.pairwise(ranges):
            assert end < start
    sharable = sum(b.count for _, _, b in spans.values())
    held = sum(max(b.count for b in g) for g in groups)
    assert len(groups) < len(spans) and held < sharable
    # kept apart, with diffs of their own: input, outputs, loss tops, and blobs some consumer
    # does not back-propagate into (pool_sum's and ip's Split tops to ip_stop and loss_stop)
    names = {id(b): n for n, b in net.blobs.items()}
    shared_names = {names[k] for k in spans}
    for name in ("data", "label", "loss", "loss_side", "loss_stop"):
        assert name not in shared_names
    stopped = [b for i in range(len(net.layers)) for j, b in enumerate(net.bottom_vecs[i])
               if not net.bottom_need_backward[i][j]]
    assert len(stopped) >= 3 and all(id(b) not in spans for b in stopped)
    assert "conv2a" in shared_names and "cat" in shared_names


def test_reshape_keeps_gradients_right() -> None:
    plain, shared = _net(False), _net(True)
    for net in (plain, shared):
        net.blobs["data"].reshape(5, 3, 8, 8)
        net.blobs["label"].reshape(5)
        net.reshape()
    a, b = _pass(plain, np.random.default_rng(9)), _pass(shared, np.random.default_rng(9))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("flag", [None, "false"])
def test_solver_shares_by_default_and_the_flag_turns_it_off(tmp_path, flag) -> None:
    sp = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", max_iter=2, display=0,
                                   random_seed=1, solver_mode=0)
    sp.net_param.CopyFrom(prototxt.parse_text(NET, caffe_pb2.NetParameter()))
    kw = {} if flag is None else {"share_diffs": False}
    solver = solvers.Solver(sp, **kw)
    assert solver.net.shares_diffs is (flag is None)
    solver.step(1)
