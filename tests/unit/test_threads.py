"""Work split between the cores (pycaffe_mpi/kernels/threads.py) and the layers that use it.

Every split path gives what one lane gives (to float rounding, identical where no sum is split)
for lane counts that divide the work evenly and unevenly, on blobs large enough to be split.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pycaffe_mpi.kernels import threads
from pycaffe_mpi.kernels.conv_plan import ConvPlan
from pycaffe_mpi.layer_types import common  # noqa: F401 - registers the layers used below
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer


@pytest.fixture(autouse=True)
def _restore_count():
    yield
    threads.set_count(None)


def test_split_covers_the_range_in_near_equal_parts() -> None:
    assert threads.split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert threads.split(5, 8) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert threads.split(100, 4, grain=40) == [(0, 50), (50, 100)]
    assert threads.split(0, 2) == [(0, 0)]


def test_run_runs_parts_side_by_side_and_in_order() -> None:
    threads.set_count(3)
    seen: list[str] = []
    out = threads.run(lambda lane, lo, hi: (seen.append(threading.current_thread().name),
                                            (lane, lo, hi))[1], 9)
    assert out == [(0, 0, 3), (1, 3, 6), (2, 6, 9)]
    # lane 0 on the caller, the others on the pool's threads
    assert seen.count(threading.current_thread().name) == 1 and len(seen) == 3
    assert all(name.startswith("pycaffe-lane") for name in seen
               if name != threading.current_thread().name)
    # nested calls run inline on the calling lane
    inner = threads.run(lambda lane, lo, hi: threads.run(lambda a, b, c: (a, b, c), 4), 2)
    assert inner == [[(0, 0, 2), (1, 2, 3), (2, 3, 4)]] * 2


def test_the_first_error_of_any_part_is_raised_after_all_end() -> None:
    threads.set_count(2)
    ended = []

    def part(lane: int, lo: int, hi: int) -> None:
        if lane == 1:
            raise ValueError("lane 1 failed")
        ended.append(lane)

    with pytest.raises(ValueError, match="lane 1 failed"):
        threads.run(part, 4)
    assert ended == [0]
    assert threads.run(lambda lane, lo, hi: lane, 4) == [0, 1]  # the pool still works


def test_blas_is_held_at_one_thread_while_split_and_given_back() -> None:
    controllers = threads._blas_controllers()
    if not controllers:
        pytest.skip("no BLAS library seen by threadpoolctl")
    threads.set_count(2)
    threads.run(lambda lane, lo, hi: None, 4)
    assert all(c.num_threads == 1 for c in controllers)
    threads.set_count(1)
    assert [c.num_threads for c in controllers] == threads._blas_own


GEOMETRIES = [  # channels, num_output, group, kernel, stride, pad, dilation, size
    (3, 8, 1, (5, 5), (1, 1), (2, 2), (1, 1), (11, 9)),  # channels-first, image by image
    (8, 6, 1, (3, 3), (1, 1), (1, 1), (1, 1), (7, 6)),  # channels-last, full conv backward
    (8, 6, 2, (3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),  # groups, stride: col2im backward
    (6, 12, 3, (1, 1), (1, 1), (0, 0), (1, 1), (5, 5)),  # 1x1
    (4, 4, 1, (3, 3), (1, 1), (2, 2), (2, 2), (8, 7)),  # dilation
]


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_conv_plan_is_the_same_for_any_lane_count(geom) -> None:
    c, o, g, k, s, p, d, size = geom
    rng = np.random.default_rng(0)
    n = 7
    x = rng.standard_normal((n, c, *size))
    w = rng.standard_normal((o, c // g, *k))
    b = rng.standard_normal(o)
    results = []
    for lanes in (1, 2, 3):
        threads.set_count(lanes)
        plan = ConvPlan(np, np.float64, c, o, g, k, s, p, d)
        plan.reshape(n, size)
        y = np.empty((n, o, *plan.out))
        plan.forward(x, w, y, b)
        dy = np.random.default_rng(1).standard_normal(y.shape)
        dw, dx = np.zeros_like(w), np.empty_like(x)
        plan.backward(dy, x, w, dw, dx)
        results.append((y, dw, dx))
    for other in results[1:]:
        for a, bb in zip(results[0], other):
            np.testing.assert_allclose(bb, a, rtol=1e-12, atol=1e-12)


def _layer_pass(case: LayerCase, x: list[np.ndarray], lanes: int) -> tuple:
    threads.set_count(lanes)
    layer, bottom, top = build_layer(case, x)
    layer.forward(bottom, top)
    rng = np.random.default_rng(4)
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape)
    layer.backward(top, [True] * len(bottom), bottom)
    return [t.data.copy() for t in top], [b.diff.copy() for b in bottom]


@pytest.mark.parametrize("case", [
    LayerCase("ReLU", "big", "", bottoms=[(3, 5, 70, 80)]),
    LayerCase("Pooling", "max_big", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }",
              bottoms=[(3, 7, 61, 33)]),
    LayerCase("Pooling", "ave_big", "pooling_param { pool: AVE kernel_size: 3 stride: 2 "
              "pad: 1 }", bottoms=[(3, 7, 61, 33)]),
    LayerCase("Eltwise", "sum_big", "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 }",
              bottoms=[(3, 5, 70, 80), (3, 5, 70, 80)]),
    LayerCase("Split", "big", "", bottoms=[(3, 5, 70, 80)], ntop=3),
], ids=lambda c: c.test_id)
def test_split_layers_are_the_same_for_any_lane_count(case: LayerCase) -> None:
    rng = np.random.default_rng(2)
    x = [rng.standard_normal(shape) for shape in case.bottoms]
    one = _layer_pass(case, x, 1)
    for lanes in (2, 3):
        other = _layer_pass(case, x, lanes)
        for a, b in zip(one[0] + one[1], other[0] + other[1]):
            np.testing.assert_array_equal(b, a)


def test_plans_sharing_the_workspace_do_not_disturb_each_other() -> None:
    """Pads and scratch are shared by every plan on a lane: plans of other geometries (other
    borders) run in between must not change a plan's result."""
    rng = np.random.default_rng(3)
    plans = []
    for c, o, g, k, s, p, d, size in GEOMETRIES:
        plan = ConvPlan(np, np.float64, c, o, g, k, s, p, d)
        plan.reshape(5, size)
        x, w = rng.standard_normal((5, c, *size)), rng.standard_normal((o, c // g, *k))
        plans.append((plan, x, w))

    def run(plan, x, w):
        y = np.empty((x.shape[0], plan.num_output, *plan.out))
        plan.forward(x, w, y)
        dw, dx = np.zeros_like(w), np.empty_like(x)
        plan.backward(np.ones_like(y), x, w, dw, dx)
        return y, dw, dx

    alone = [run(*p) for p in plans]
    for _ in range(2):  # interleaved, twice
        for p, want in zip(plans, alone):
            for a, b in zip(run(*p), want):
                np.testing.assert_array_equal(a, b)
