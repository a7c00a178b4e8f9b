"""The generic layer suite: every case in the layer-case registry, every check."""

from __future__ import annotations

import numpy as np
import pytest

from pycaffe_mpi import registry
from pycaffe_mpi.testing import gradient_check, layer_cases
from pycaffe_mpi.testing.layer_cases import build_layer, make_bottoms

CASES = layer_cases.all_cases()
IDS = [c.test_id for c in CASES]
GRAD_CASES = [c for c in CASES if c.grad]


def _reseeder(case, layer, seed=7):
    if not case.stochastic:
        return None

    def reseed():
        layer.rng = np.random.default_rng(seed)

    return reseed


def _run(case, bottoms, dtype=np.float64):
    layer, bb, tb = build_layer(case, bottoms, dtype)
    if case.stochastic:
        layer.rng = np.random.default_rng(7)
    layer.forward(bb, tb)
    return layer, bb, tb


def _check_reference(case, layer, bottoms, tb):
    want = case.reference(bottoms, layer)
    assert len(want) == len(tb), f"reference gives {len(want)} tops, layer {len(tb)}"
    for i, (w, t) in enumerate(zip(want, tb)):
        assert tuple(t.shape) == tuple(np.shape(w)), f"top {i} shape {t.shape} != {np.shape(w)}"
        np.testing.assert_allclose(t.data, w, rtol=case.rtol, atol=case.atol,
                                   err_msg=f"top {i}")


def test_every_registered_type_has_a_case():
    covered = {c.type for c in CASES}
    missing = sorted(set(registry.layer_type_list()) - covered)
    assert not missing, f"layer types without a case in the registry: {missing}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(case):
    assert case.reference is not None, "every case needs a NumPy reference"
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    layer, _, tb = _run(case, bottoms)
    _check_reference(case, layer, bottoms, tb)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_float32_close_to_float64(case):
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    _, _, t64 = _run(case, bottoms, np.float64)
    _, _, t32 = _run(case, bottoms, np.float32)
    for a, b in zip(t32, t64):
        assert a.data.dtype == np.float32
        np.testing.assert_allclose(a.data, b.data, rtol=2e-3, atol=2e-4)


def _grad_bottoms(case, layer, n):
    if case.grad_bottoms is not None:
        return list(case.grad_bottoms)
    return [i for i in range(n) if layer.allow_force_backward(i)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.test_id for c in GRAD_CASES])
def test_gradient(case):
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    layer, bb, tb = build_layer(case, bottoms)
    fails = gradient_check.check_gradient(
        layer, bb, tb, _grad_bottoms(case, layer, len(bb)), case.stepsize, case.threshold,
        case.kink, case.kink_range, reseed=_reseeder(case, layer))
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.test_id for c in GRAD_CASES])
def test_propagate_down_and_param_accumulation(case):
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    layer, bb, tb = _run(case, bottoms)
    rng = np.random.default_rng(3)
    for t in tb:
        t.diff[...] = rng.standard_normal(t.shape)
    checked = _grad_bottoms(case, layer, len(bb))
    for p in layer.blobs:
        p.diff[...] = 0
    # all on: reference diffs
    for b in bb:
        b.diff[...] = 0
    layer.backward(tb, [i in checked for i in range(len(bb))], bb)
    ref = [np.array(b.diff, copy=True) for b in bb]
    once = [np.array(p.diff, copy=True) for p in layer.blobs]
    # a second backward adds into parameter diffs
    layer.backward(tb, [i in checked for i in range(len(bb))], bb)
    for j, (p, d) in enumerate(zip(layer.blobs, once)):
        np.testing.assert_allclose(p.diff, 2 * d, rtol=1e-10, atol=1e-12,
                                   err_msg=f"param {j} diff does not accumulate")
    # each bottom switched off in turn keeps its diff untouched, the others are unchanged
    for off in checked:
        for b in bb:
            b.diff[...] = np.nan
        layer.backward(tb, [i in checked and i != off for i in range(len(bb))], bb)
        assert np.isnan(bb[off].diff).all(), f"bottom {off} diff written with propagate_down false"
        for i in checked:
            if i != off:
                np.testing.assert_allclose(bb[i].diff, ref[i], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reshape(case):
    specs = case.reshape if case.reshape is not None else layer_cases.grown(case.bottoms)
    if not specs:
        pytest.skip("case has no reshape spec")
    rng = np.random.default_rng(0)
    layer, bb, tb = _run(case, make_bottoms(case.bottoms, rng))
    new = make_bottoms(specs, rng)
    for b, a in zip(bb, new):
        b.reshape(a.shape)
        b.data[...] = a
    if case.stochastic:
        layer.rng = np.random.default_rng(7)
    layer.reshape(bb, tb)
    layer.forward(bb, tb)
    _check_reference(case, layer, new, tb)


@pytest.mark.parametrize("case", [c for c in CASES if c.in_place],
                         ids=[c.test_id for c in CASES if c.in_place])
def test_in_place(case):
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    layer, bb, tb = _run(case, bottoms)
    rng = np.random.default_rng(3)
    tb[0].diff[...] = rng.standard_normal(tb[0].shape)
    layer.backward(tb, [True], bb)
    want_top, want_diff = np.array(tb[0].data), np.array(bb[0].diff)
    layer2, bb2, _ = build_layer(case, bottoms)
    if case.stochastic:
        layer2.rng = np.random.default_rng(7)
    layer2.reshape(bb2, bb2)
    layer2.forward(bb2, bb2)
    np.testing.assert_allclose(bb2[0].data, want_top, rtol=1e-12)
    bb2[0].diff[...] = tb[0].diff
    layer2.backward(bb2, [True], bb2)
    np.testing.assert_allclose(bb2[0].diff, want_diff, rtol=1e-10, atol=1e-12)
