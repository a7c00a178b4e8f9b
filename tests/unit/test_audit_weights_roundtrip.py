"""Audit of issue 8: parameter blobs load both ways.

For every registered layer type whose layer-case builds parameter blobs, a Net holding that
layer saves its weights (binary ``.caffemodel`` and HDF5 ``.caffemodel.h5``) and a fresh Net,
built with another seed, loads them (``weights=``) with identical blobs. Blob order and shapes
follow BVLC Caffe for the types where users most often port weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pycaffe_mpi import registry
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2
from pycaffe_mpi.testing import layer_cases
from pycaffe_mpi.testing.layer_cases import LayerCase, build_layer, make_bottoms

SKIP_TYPES = {"Python"}  # user classes: their blobs are whatever the user's code makes


def _first_case_with_params() -> dict[str, LayerCase]:
    found: dict[str, LayerCase] = {}
    for case in layer_cases.all_cases():
        if case.type in found or case.type in SKIP_TYPES:
            continue
        if registry.layer_class(case.type).is_data:
            continue
        try:
            layer, _, _ = build_layer(case, make_bottoms(case.bottoms, np.random.default_rng(0)))
        except Exception:  # a case needing a Net context (comm layers) is judged elsewhere
            continue
        if len(layer.blobs):
            found[case.type] = case
    return found


PARAM_CASES = _first_case_with_params()


def _net_param(case: LayerCase, name: str = "under_test") -> Any:
    """Input layers for the case's bottoms, then the case's layer."""
    bottoms = make_bottoms(case.bottoms, np.random.default_rng(0))
    net = caffe_pb2.NetParameter(name="audit")
    inp = net.layer.add(name="input", type="Input") if bottoms else None
    for i, b in enumerate(bottoms):
        inp.top.append(f"b{i}")
        inp.input_param.shape.add(dim=list(b.shape))
    lp = layer_cases.layer_param(case, len(bottoms), case.ntop)
    lp.name = name
    net.layer.add().CopyFrom(lp)
    return net


def _build(case: LayerCase, seed: int, weights: str | None = None) -> Net:
    return Net(_net_param(case), case.phase, weights=weights, seed=seed, dtype=np.float64)


def test_types_with_parameter_blobs_are_found() -> None:
    # the audit is only meaningful if it sees the parameterised zoo
    for t in ("Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale", "Bias",
              "PReLU", "Embed", "LSTM", "RNN", "Parameter"):
        assert t in PARAM_CASES, f"no case of {t} builds parameter blobs"


@pytest.mark.parametrize("form", ["binary", "hdf5"])
@pytest.mark.parametrize("type_", sorted(PARAM_CASES))
def test_weights_round_trip(tmp_path: Path, type_: str, form: str) -> None:
    case = PARAM_CASES[type_]
    src = _build(case, seed=1)
    rng = np.random.default_rng(5)
    layer = src.layer_dict["under_test"]
    for b in layer.blobs:  # values no filler would give, so a skipped copy shows
        b.data[...] = rng.standard_normal(b.shape)
    if form == "binary":
        path = str(tmp_path / "w.caffemodel")
        src.save(path)
    else:
        path = str(tmp_path / "w.caffemodel.h5")
        src.save_hdf5(path)
    dst = _build(case, seed=2, weights=path)
    got = dst.layer_dict["under_test"].blobs
    assert len(got) == len(layer.blobs)
    for j, (a, b) in enumerate(zip(layer.blobs, got)):
        assert tuple(a.shape) == tuple(b.shape), f"param {j}"
        np.testing.assert_array_equal(a.data, b.data, err_msg=f"param {j}")
    if form == "hdf5":  # the method form too
        fresh = _build(case, seed=3)
        fresh.load_hdf5(path)
        for a, b in zip(layer.blobs, fresh.layer_dict["under_test"].blobs):
            np.testing.assert_array_equal(a.data, b.data)


def _shapes(proto: str, type_: str, bottoms: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    case = LayerCase(type=type_, id="audit", proto=proto, bottoms=bottoms)
    layer, _, _ = build_layer(case, make_bottoms(bottoms, np.random.default_rng(0)))
    return [tuple(b.shape) for b in layer.blobs]


# BVLC Caffe's blob order and shapes (from each layer's LayerSetUp)
BVLC_SHAPES = [
    ("Scale", "scale_param { bias_term: true }", [(2, 3, 4, 5)], [(3,), (3,)]),
    ("Scale", "scale_param { axis: 1 num_axes: 2 }", [(2, 3, 4, 5)], [(3, 4)]),
    ("Bias", "", [(2, 3, 4, 5)], [(3,)]),
    ("BatchNorm", "", [(2, 3, 4, 5)], [(3,), (3,), (1,)]),
    ("PReLU", "", [(2, 3, 4, 5)], [(3,)]),
    ("PReLU", "prelu_param { channel_shared: true }", [(2, 3, 4, 5)], [()]),
    ("Deconvolution", "convolution_param { num_output: 6 kernel_size: 3 group: 3 }",
     [(2, 3, 4, 5)], [(3, 2, 3, 3), (6,)]),
    ("Convolution", "convolution_param { num_output: 6 kernel_size: 3 group: 3 }",
     [(2, 3, 4, 5)], [(6, 1, 3, 3), (6,)]),
    ("Embed", "embed_param { input_dim: 7 num_output: 4 }", [lambda r: r.integers(0, 7, (3,))],
     [(7, 4), (4,)]),
    ("InnerProduct", "inner_product_param { num_output: 4 }", [(2, 3, 2)], [(4, 6), (4,)]),
    ("InnerProduct", "inner_product_param { num_output: 4 transpose: true }", [(2, 3, 2)],
     [(6, 4), (4,)]),
    ("LSTM", "recurrent_param { num_output: 4 }", [(3, 2, 5), lambda r: np.ones((3, 2))],
     [(16, 5), (16,), (16, 4)]),
    ("LSTM", "recurrent_param { num_output: 4 }",
     [(3, 2, 5), lambda r: np.ones((3, 2)), (2, 6)], [(16, 5), (16,), (16, 6), (16, 4)]),
    ("RNN", "recurrent_param { num_output: 4 }", [(3, 2, 5), lambda r: np.ones((3, 2))],
     [(4, 5), (4,), (4, 4), (4, 4), (4,)]),
    ("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", [], [(2, 3)]),
]


@pytest.mark.parametrize(("type_", "proto", "bottoms", "want"), BVLC_SHAPES,
                         ids=[f"{t}-{i}" for i, (t, *_) in enumerate(BVLC_SHAPES)])
def test_blob_order_and_shapes_are_bvlc(type_: str, proto: str, bottoms: list,
                                        want: list[tuple[int, ...]]) -> None:
    assert _shapes(proto, type_, bottoms) == want


def test_prelu_channel_shared_blob_is_caffes_zero_axis_shape_in_the_file(tmp_path: Path) -> None:
    case = LayerCase(type="PReLU", id="audit", proto="prelu_param { channel_shared: true }",
                     bottoms=[(2, 3, 4, 5)])
    net = _build(case, seed=1)
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(path.read_bytes())
    blob = next(lp for lp in saved.layer if lp.name == "under_test").blobs[0]
    assert list(blob.shape.dim) == []
    assert len(blob.double_data) + len(blob.data) == 1


def test_batchnorm_blobs_in_the_file_are_mean_variance_scale_factor(tmp_path: Path) -> None:
    case = LayerCase(type="BatchNorm", id="audit", proto="", bottoms=[(2, 3, 4, 5)])
    net = _build(case, seed=1)
    net.forward()
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(path.read_bytes())
    blobs = next(lp for lp in saved.layer if lp.name == "under_test").blobs
    assert [list(b.shape.dim) for b in blobs] == [[3], [3], [1]]
    # a TRAIN forward sets Caffe's running scale factor: s = λ·s + 1 = 1 after one batch
    assert list(blobs[2].double_data or blobs[2].data) == [1.0]


# -- files as BVLC Caffe writes them ---------------------------------------------------------
def _legacy(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * (4 - len(shape)) + tuple(shape)


@pytest.mark.parametrize("type_", sorted(PARAM_CASES))
def test_legacy_four_axis_blobs_load(tmp_path: Path, type_: str) -> None:
    # older Caffe releases wrote num/channels/height/width and float ``data``; a blob of
    # fewer axes is padded with leading 1s (Caffe's LegacyShape)
    case = PARAM_CASES[type_]
    net = _build(case, seed=1)
    layer = net.layer_dict["under_test"]
    if any(len(b.shape) > 4 for b in layer.blobs):
        pytest.skip("blobs of more than 4 axes have no legacy form")
    rng = np.random.default_rng(9)
    model = caffe_pb2.NetParameter(name="audit")
    src = model.layer.add(name="under_test", type=type_)
    want = []
    for b in layer.blobs:
        arr = rng.standard_normal(b.shape).astype(np.float32)
        n, c, h, w = _legacy(tuple(b.shape))
        src.blobs.add(num=n, channels=c, height=h, width=w, data=arr.ravel().tolist())
        want.append(arr)
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(model.SerializeToString())
    dst = _build(case, seed=2, weights=str(path))
    for a, b in zip(want, dst.layer_dict["under_test"].blobs):
        np.testing.assert_array_equal(a, b.data.astype(np.float32))


@pytest.mark.parametrize("type_", sorted(PARAM_CASES))
def test_caffe_hdf5_layout_loads(tmp_path: Path, type_: str) -> None:
    # Caffe's Net::ToHDF5: group "data", a group per layer, a dataset per blob named by index
    h5py = pytest.importorskip("h5py")
    case = PARAM_CASES[type_]
    net = _build(case, seed=1)
    layer = net.layer_dict["under_test"]
    rng = np.random.default_rng(9)
    want = [rng.standard_normal(b.shape).astype(np.float32) for b in layer.blobs]
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("data").create_group("under_test")
        f["data"].create_group("a_layer_this_net_lacks")
        for j, arr in enumerate(want):
            g.create_dataset(str(j), data=arr)
    dst = _build(case, seed=2, weights=str(path))
    for a, b in zip(want, dst.layer_dict["under_test"].blobs):
        np.testing.assert_array_equal(a, b.data.astype(np.float32))


SHARED = """
layer { name: "d" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "a" top: "x" param { name: "w" }
        param { name: "bias" } inner_product_param { num_output: 2
        weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "b" top: "y" param { name: "w" }
        param { name: "bias" } inner_product_param { num_output: 2
        weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


@pytest.mark.parametrize("form", ["binary", "hdf5"])
def test_shared_parameters_round_trip_and_stay_shared(tmp_path: Path, form: str) -> None:
    net_file = tmp_path / "shared.prototxt"
    net_file.write_text(SHARED)
    src = Net(str(net_file), 1, seed=1)
    src.params["ip1"][0].data[...] = 3
    path = str(tmp_path / ("w.caffemodel" if form == "binary" else "w.caffemodel.h5"))
    if form == "binary":
        src.save(path)
    else:
        src.save_hdf5(path)
    if form == "hdf5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(path) as f:  # Caffe writes a shared blob once, under its owner
            assert sorted(f["data/ip1"]) == ["0", "1"] and len(f["data/ip2"]) == 0
    dst = Net(str(net_file), 1, seed=2, weights=path)
    assert (dst.params["ip1"][0].data == 3).all() and (dst.params["ip2"][0].data == 3).all()
    dst.params["ip1"][0].data[...] = 5
    assert (dst.params["ip2"][0].data == 5).all()
