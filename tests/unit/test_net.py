"""Net construction: rule filtering, split insertion, in-place, sharing, loss weights, backward
analysis, pycaffe's forward/backward, weight copy and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_mpi
from pycaffe_mpi import errors
from pycaffe_mpi.net import Net, filter_net, insert_splits, state_meets_rule
from pycaffe_mpi.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def netparam(text: str) -> caffe_pb2.NetParameter:
    return text_format.Merge(text, caffe_pb2.NetParameter())


def state(phase=caffe_pb2.TRAIN, level=0, stages=()):
    return caffe_pb2.NetState(phase=phase, level=level, stage=list(stages))


def rule(text):
    return text_format.Merge(text, caffe_pb2.NetStateRule())


# -- rule matching (Caffe's FilterNetTest cases) ------------------------------------------------
@pytest.mark.parametrize(("text", "st", "want"), [
    ("phase: TRAIN", state(TRAIN), True),
    ("phase: TRAIN", state(TEST), False),
    ("min_level: 2", state(level=1), False),
    ("min_level: 2", state(level=2), True),
    ("max_level: 2", state(level=3), False),
    ("stage: 'a' stage: 'b'", state(stages=["a"]), False),
    ("stage: 'a' stage: 'b'", state(stages=["b", "a", "c"]), True),
    ("not_stage: 'a'", state(stages=["a"]), False),
    ("not_stage: 'a'", state(stages=["b"]), True),
    ("phase: TEST min_level: 1 stage: 'x'", state(TEST, 1, ["x"]), True),
])
def test_state_meets_rule(text, st, want):
    assert state_meets_rule(st, rule(text), "l") is want


def test_mpi_rank_rules_and_with_phase():
    r = rule("phase: TRAIN mpi_rank: 0 mpi_rank: 2")
    assert state_meets_rule(state(TRAIN), r, "l", rank=2)
    assert not state_meets_rule(state(TRAIN), r, "l", rank=1)
    assert not state_meets_rule(state(TEST), r, "l", rank=0)
    assert state_meets_rule(state(TRAIN), rule("phase: TRAIN"), "l", rank=5)


def test_filter_include_exclude():
    p = netparam("""
      layer { name: 'a' type: 'Input' }
      layer { name: 'b' type: 'Input' include { phase: TRAIN } }
      layer { name: 'c' type: 'Input' exclude { phase: TRAIN } }
      layer { name: 'd' type: 'Input' include { stage: 's' } include { phase: TEST } }
      layer { name: 'e' type: 'Input' exclude { mpi_rank: 1 } }
    """)
    names = lambda out: [lp.name for lp in out[0].layer]  # noqa: E731
    assert names(filter_net(p, state(TRAIN), 0)) == ["a", "b", "e"]
    assert names(filter_net(p, state(TEST), 0)) == ["a", "c", "d", "e"]
    assert names(filter_net(p, state(TRAIN, stages=["s"]), 1)) == ["a", "b", "d"]


def test_include_and_exclude_together_is_an_error():
    p = netparam("layer { name: 'x' type: 'Input' include { phase: TRAIN } "
                 "exclude { min_level: 1 } }")
    with pytest.raises(errors.NetError, match="not both"):
        filter_net(p, state(TRAIN))


# -- split insertion ----------------------------------------------------------------------------
def test_insert_splits_names_and_counts():
    p = netparam("""
      layer { name: 'data' type: 'Input' top: 'x' }
      layer { name: 'r' type: 'ReLU' bottom: 'x' top: 'x' }
      layer { name: 'a' type: 'Sigmoid' bottom: 'x' top: 'a' }
      layer { name: 'b' type: 'TanH' bottom: 'x' top: 'b' }
    """)
    out, _ = insert_splits(p)
    layers = {lp.name: lp for lp in out.layer}
    assert [lp.name for lp in out.layer] == ["data", "r", "x_r_0_split", "a", "b"]
    assert list(layers["x_r_0_split"].top) == ["x_r_0_split_0", "x_r_0_split_1"]
    assert list(layers["a"].bottom) == ["x_r_0_split_0"]
    assert list(layers["b"].bottom) == ["x_r_0_split_1"]
    assert list(layers["r"].bottom) == ["x"]  # single consumer of data's x: no split


def test_loss_weight_counts_as_consumer_and_moves_to_split():
    p = netparam("""
      layer { name: 'data' type: 'Input' top: 'x' }
      layer { name: 's' type: 'Sigmoid' bottom: 'x' top: 'y' loss_weight: 2 }
      layer { name: 't' type: 'TanH' bottom: 'y' top: 'z' }
    """)
    out, _ = insert_splits(p)
    split = next(lp for lp in out.layer if lp.type == "Split")
    assert list(split.loss_weight) == [2.0, 0.0]
    assert not len(next(lp for lp in out.layer if lp.name == "s").loss_weight)


def test_unknown_bottom_names_layer_and_suggests():
    p = netparam("""
      layer { name: 'data' type: 'Input' top: 'data' input_param { shape { dim: 1 dim: 2 } } }
      layer { name: 'act' type: 'ReLU' bottom: 'dta' top: 'out' }
    """)
    with pytest.raises(errors.NetError, match=r'layer "act".*"dta".*did you mean "data"'):
        Net(p, pycaffe_mpi.TRAIN)


# -- building and running -----------------------------------------------------------------------
TINY = """
name: 'tiny'
layer { name: 'in' type: 'Input' top: 'x' top: 'y'
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'h'
        inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 0.5 }
                              bias_filler { type: 'constant' value: 0.1 } } }
layer { name: 'relu' type: 'ReLU' bottom: 'h' top: 'h' }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'h' bottom: 'y' top: 'loss' }
"""


def test_tiny_net_forward_backward_matches_numpy():
    net = Net(netparam(TINY), pycaffe_mpi.TRAIN, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    out = net.forward(x=x, y=y)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    h = np.maximum(x @ w.T + b, 0)
    want = ((h - y) ** 2).sum() / 2 / 4
    assert float(out["loss"]) == pytest.approx(want)
    assert net.blob_loss_weights["loss"] == 1.0
    net.clear_param_diffs()
    net.backward()
    dh = (h - y) / 4 * (h > 0)
    np.testing.assert_allclose(net.params["ip"][0].diff, dh.T @ x, rtol=1e-10)
    assert net.inputs == ["x", "y"] and net.outputs == ["loss"]
    assert net.bottom_need_backward[1] == [False]  # the input needs no gradient
    assert not net.layer_need_backward[0]


def test_force_backward_gives_input_gradients():
    p = netparam(TINY.replace("name: 'tiny'", "name: 'tiny' force_backward: true"))
    net = Net(p, pycaffe_mpi.TRAIN, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    net.forward(x=rng.standard_normal((4, 3)), y=rng.standard_normal((4, 2)))
    diffs = net.backward()
    assert np.abs(diffs["x"]).sum() > 0


def test_propagate_down_false_stops_gradient():
    p = netparam(TINY.replace("top: 'loss' }", "top: 'loss' propagate_down: false "
                              "propagate_down: false }"))
    net = Net(p, pycaffe_mpi.TRAIN, dtype=np.float64, seed=3)
    assert not net.layer_need_backward[net.layer_names.index("ip")]


def test_loss_weight_scales_loss_and_gradient():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    base = Net(netparam(TINY), pycaffe_mpi.TRAIN, dtype=np.float64, seed=3)
    heavy = Net(netparam(TINY.replace("top: 'loss' }", "top: 'loss' loss_weight: 3 }")),
                pycaffe_mpi.TRAIN, dtype=np.float64, seed=3)
    l1 = float(base.forward(x=x, y=y)["loss"])
    heavy.forward(x=x, y=y)
    assert heavy.forward_loss() == pytest.approx(3 * l1)
    base.clear_param_diffs()
    heavy.clear_param_diffs()
    base.backward()
    heavy.backward()
    np.testing.assert_allclose(heavy.params["ip"][0].diff, 3 * base.params["ip"][0].diff)


SHARED = """
layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 2 dim: 3 } } }
layer { name: 'a' type: 'InnerProduct' bottom: 'x' top: 'a' param { name: 'w' } param { name: 'b' }
        inner_product_param { num_output: 3 weight_filler { type: 'gaussian' } } }
layer { name: 'b' type: 'InnerProduct' bottom: 'a' top: 'b' param { name: 'w' } param { name: 'b' }
        inner_product_param { num_output: 3 weight_filler { type: 'gaussian' } } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'b' bottom: 'x' top: 'loss' }
"""


def test_weight_sharing_shares_data_and_accumulates_diff():
    net = Net(netparam(SHARED), pycaffe_mpi.TRAIN, dtype=np.float64, seed=1)
    wa, wb = net.params["a"][0], net.params["b"][0]
    np.testing.assert_array_equal(wa.data, wb.data)
    assert len(net.learnable_params) == 2
    wa.data[0, 0] = 42.0
    assert wb.data[0, 0] == 42.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3))
    net.forward(x=x)
    net.clear_param_diffs()
    net.backward()
    # the one diff is the sum of both layers' contributions
    w = wa.data
    a = x @ w.T + net.params["a"][1].data
    b = a @ w.T + net.params["b"][1].data
    db = (b - x) / 2
    da = db @ w
    np.testing.assert_allclose(wa.diff, db.T @ a + da.T @ x, rtol=1e-10)


def test_shared_param_shape_mismatch_names_both_layers():
    tail = " weight_filler { type: 'gaussian' } } }\nlayer { name: 'loss'"
    bad = SHARED.replace("num_output: 3" + tail, "num_output: 4" + tail)
    with pytest.raises(errors.ShapeError, match=r'layer "b".*"w".*owner layer "a"'):
        Net(netparam(bad), pycaffe_mpi.TRAIN)


def test_legacy_input_fields_become_input_layer():
    p = netparam("""
      input: 'data' input_shape { dim: 2 dim: 3 }
      layer { name: 'r' type: 'ReLU' bottom: 'data' top: 'out' }
    """)
    net = Net(p, pycaffe_mpi.TEST)
    assert net.inputs == ["data"] and net.blobs["data"].shape == (2, 3)
    p2 = netparam("input: 'data' input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 5 "
                  "layer { name: 'r' type: 'ReLU' bottom: 'data' top: 'out' }")
    assert Net(p2, pycaffe_mpi.TEST).blobs["out"].shape == (1, 3, 4, 5)


def test_top_produced_twice_is_an_error():
    p = netparam("""
      layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 2 } } }
      layer { name: 'a' type: 'ReLU' bottom: 'x' top: 'y' }
      layer { name: 'b' type: 'ReLU' bottom: 'x' top: 'y' }
    """)
    with pytest.raises(errors.NetError, match='already produced by layer "a"'):
        Net(p, pycaffe_mpi.TRAIN)


def test_unknown_type_suggests_nearest():
    p = netparam("layer { name: 'c' type: 'Convolutoin' }")
    with pytest.raises(errors.NetError, match=r'layer "c".*unknown layer type "Convolutoin".*'
                                              r'did you mean "Convolution"'):
        Net(p, pycaffe_mpi.TRAIN)


def test_prototxt_typo_names_file_line_layer_and_suggests(tmp_path):
    f = tmp_path / "bad.prototxt"
    f.write_text("name: 'n'\nlayer {\n  name: 'conv'\n  type: 'Convolution'\n"
                 "  convolution_param { num_outptu: 3 }\n}\n")
    with pytest.raises(errors.PrototxtError) as e:
        Net(str(f), pycaffe_mpi.TRAIN)
    msg = str(e.value)
    assert f"{f}:5:" in msg and "'conv'" in msg and 'did you mean "num_output"' in msg


def test_layer_error_carries_file_and_line(tmp_path):
    f = tmp_path / "n.prototxt"
    f.write_text("layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 2 } } }\n"
                 "\n"
                 "layer { name: 'c' type: 'Concat' bottom: 'x' bottom: 'x' top: 'y' "
                 "concat_param { axis: 5 } }\n")
    with pytest.raises(errors.PycaffeError, match=rf"{f}:3"):
        Net(str(f), pycaffe_mpi.TRAIN)


def test_pycaffe_forward_start_end_and_blobs():
    net = Net(netparam(TINY), pycaffe_mpi.TRAIN, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal((4, 3))
    out = net.forward(end="ip")
    assert set(out) == {"h"}
    out = net.forward(start="relu", blobs=["h"])
    assert set(out) == {"loss", "h"} and (out["h"] >= 0).all()


# -- weights ------------------------------------------------------------------------------------
def test_save_and_copy_weights_roundtrip(tmp_path):
    a = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=1)
    path = str(tmp_path / "w.caffemodel")
    a.save(path)
    b = Net(netparam(TINY), pycaffe_mpi.TEST, seed=2, weights=path)
    np.testing.assert_array_equal(a.params["ip"][0].data, b.params["ip"][0].data)
    # the file is a binary NetParameter with one layer entry per layer, blobs on 'ip'
    proto = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    ip = next(lp for lp in proto.layer if lp.name == "ip")
    assert [list(bp.shape.dim) for bp in ip.blobs] == [[2, 3], [2]]
    c = Net(netparam(TINY), pycaffe_mpi.TEST, seed=2)
    c.copy_from(path)
    np.testing.assert_array_equal(a.params["ip"][1].data, c.params["ip"][1].data)


def test_copy_weights_shape_mismatch_says_rename(tmp_path):
    a = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=1)
    path = str(tmp_path / "w.caffemodel")
    a.save(path)
    other = TINY.replace("num_output: 2", "num_output: 5").replace("dim: 4 dim: 2", "dim: 4 dim: 5")
    with pytest.raises(errors.ShapeError, match="rename the layer"):
        Net(netparam(other), pycaffe_mpi.TRAIN, weights=path)


def test_copy_ignores_unknown_source_layers(tmp_path, caplog):
    a = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=1)
    proto = a.to_proto()
    proto.layer[1].name = "renamed"
    b = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=2)
    before = np.array(b.params["ip"][0].data)
    b.copy_trained_layers_from(proto)
    np.testing.assert_array_equal(b.params["ip"][0].data, before)


def test_legacy_pycaffe_constructor(tmp_path):
    a = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=1)
    proto_path = tmp_path / "net.prototxt"
    proto_path.write_text(TINY)
    w = str(tmp_path / "w.caffemodel")
    a.save(w)
    b = Net(str(proto_path), w, pycaffe_mpi.TEST)
    assert b.phase == pycaffe_mpi.TEST
    np.testing.assert_array_equal(a.params["ip"][0].data, b.params["ip"][0].data)


def test_params_and_blobs_are_writable_in_place():
    net = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=1)
    net.params["ip"][0].data[...] = 0
    net.params["ip"][1].data[...] = 1
    out = net.forward(x=np.ones((4, 3)), y=np.ones((4, 2)))
    np.testing.assert_allclose(net.blobs["h"].data, 1.0)
    assert float(out["loss"]) == pytest.approx(0.0)


def test_debug_info_logs_each_layer(caplog):
    p = netparam(TINY.replace("name: 'tiny'", "name: 'tiny' debug_info: true"))
    net = Net(p, pycaffe_mpi.TRAIN, seed=3)
    with caplog.at_level("INFO", logger="pycaffe_mpi"):
        net.forward(x=np.ones((4, 3)), y=np.ones((4, 2)))
        net.backward()
    text = caplog.text
    assert "[Forward] Layer ip, top blob h data:" in text
    assert "[Backward] Layer ip, bottom blob x diff" not in text  # ip takes no input gradient
    assert "[Backward] Layer ip, param blob 0 diff:" in text


def test_float64_net_saves_double_data_exactly(tmp_path):
    a = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=1, dtype=np.float64)
    a.params["ip"][0].data[0, 0] = 1 / 3  # not representable in float32
    path = str(tmp_path / "w.caffemodel")
    a.save(path)
    proto = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    ip = next(lp for lp in proto.layer if lp.name == "ip")
    assert len(ip.blobs[0].double_data) == 6 and not len(ip.blobs[0].data)
    b = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=2, dtype=np.float64, weights=path)
    assert b.params["ip"][0].data[0, 0] == 1 / 3
    c = Net(netparam(TINY), pycaffe_mpi.TRAIN, seed=2, weights=path)  # float32 reads it too
    assert c.params["ip"][0].data[0, 0] == np.float32(1 / 3)


# -- NetParameter preparation (pycaffe_mpi.netparam) --------------------------------------------
def test_parsed_net_keeps_locations_through_input_filter_and_splits(tmp_path):
    from pycaffe_mpi import netparam as prep

    path = tmp_path / "net.prototxt"
    path.write_text("name: 'n'\ninput: 'x' input_shape { dim: 2 dim: 3 }\n"
                    "layer { name: 'a' type: 'ReLU' bottom: 'x' top: 'y' }\n"
                    "layer { name: 'b' type: 'ReLU' bottom: 'y' top: 'z'\n"
                    "        include { phase: TEST } }\n"
                    "layer { name: 'c' type: 'ReLU' bottom: 'y' top: 'w' }\n")
    parsed = prep.read_net(path)
    assert [lp.name for lp in parsed.param.layer] == ["input", "a", "b", "c"]
    assert parsed.locations == ["", f"{path}:3", f"{path}:4", f"{path}:6"]
    test = prep.prepare(parsed, prep.net_state(parsed.param, pycaffe_mpi.TEST), rank=0)
    names = [lp.name for lp in test.param.layer]
    assert names == ["input", "a", "y_a_0_split", "b", "c"]
    assert test.locations == ["", f"{path}:3", f"{path}:3", f"{path}:4", f"{path}:6"]
    train = prep.prepare(parsed, prep.net_state(parsed.param, pycaffe_mpi.TRAIN), rank=0)
    assert [lp.name for lp in train.param.layer] == ["input", "a", "c"]
    assert train.location(2) == f"{path}:6" and train.location(9) == ""
    # preparation never changes its input
    assert len(parsed.param.layer) == 4 and not len(parsed.param.input)


def test_solver_reads_its_net_file_once(tmp_path, monkeypatch):
    from pycaffe_mpi import prototxt
    from pycaffe_mpi.solvers import Solver

    net = tmp_path / "net.prototxt"
    net.write_text("layer { name: 'd' type: 'DummyData' top: 'x' "
                   "dummy_data_param { shape { dim: 2 dim: 3 } } }\n"
                   "layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'y' "
                   "inner_product_param { num_output: 2 } }\n")
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 '
                      "test_iter: 1 test_iter: 1 test_interval: 10\n")
    parsed: list[str] = []
    real = prototxt.parse_text

    def counting(text, message, path="<string>"):
        parsed.append(path)
        return real(text, message, path)

    monkeypatch.setattr(prototxt, "parse_text", counting)
    s = Solver(str(solver))
    assert len(s.test_nets) == 2
    assert parsed.count(str(net)) == 1  # one train net and two test nets, one parse


def test_comm_plan_needs_no_mpi4py():
    import subprocess
    import sys

    code = ("import sys; import pycaffe_mpi.comm.plan, pycaffe_mpi.netparam, pycaffe_mpi.net; "
            "print('mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("type_name", ["Upsample", "Normalize", "PriorBox", "Interp",
                                       "ROIPooling", "PSROIPooling", "Permute",
                                       "DetectionOutput", "ShuffleChannel",
                                       "DepthwiseConvolution", "Axpy", "Mish"])
def test_fork_layer_type_says_not_bvlc_and_python_layer(tmp_path, type_name):
    from pycaffe_mpi import registry

    if type_name in registry.layer_type_list():
        pytest.skip(f"{type_name} is registered in this build")
    f = tmp_path / "fork.prototxt"
    f.write_text("layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 2 } } }\n"
                 f"layer {{ name: 'odd' type: '{type_name}' bottom: 'x' top: 'y' }}\n")
    with pytest.raises(errors.NetError) as e:
        Net(str(f), pycaffe_mpi.TEST)
    msg = str(e.value)
    assert f'{f}:2: layer "odd"' in msg
    assert f'layer type "{type_name}" is not a BVLC Caffe layer type' in msg
    assert 'type: "Python"' in msg and "did you mean" not in msg


def test_unknown_type_without_a_near_name_points_at_python_layers():
    p = netparam("layer { name: 'q' type: 'Qzxwv' }")
    with pytest.raises(errors.NetError, match=r'unknown layer type "Qzxwv"; to add it, write it '
                                              r'as a Python layer \(type: "Python"'):
        Net(p, pycaffe_mpi.TRAIN)


def test_layers_get_their_context_at_construction(tmp_path):
    from pycaffe_mpi import registry
    from pycaffe_mpi.layer import LayerContext

    f = tmp_path / "ctx.prototxt"
    f.write_text("name: 'netname'\n"
                 "layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 2 } } }\n"
                 "layer { name: 'r' type: 'ReLU' bottom: 'x' top: 'y' }\n")
    marker = object()
    net = Net(str(f), pycaffe_mpi.TEST, ctx=marker)
    ctx = net.layer_dict["r"].ctx
    assert ctx == LayerContext(location=f"{f}:3", rank=0, world_size=1, net_name="netname",
                               user=marker)
    assert net.layer_dict["r"].location == f"{f}:3"
    # a layer built alone (tests, scripts) takes the same context, or none
    cls = registry.layer_class("ReLU")
    lp = caffe_pb2.LayerParameter(name="alone", type="ReLU")
    assert cls(lp, ctx=LayerContext(location="x.prototxt:7")).location == "x.prototxt:7"
    assert cls(lp).location == ""


SPLIT_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "Power" bottom: "data" top: "a" power_param { scale: 2 } }
layer { name: "b" type: "Power" bottom: "data" top: "b" power_param { scale: 2 } }
"""


def test_split_tops_share_the_bottom_data() -> None:
    """As in Caffe (no copy); a net cannot write a split blob in place (it is refused), which
    is what keeps the shared tops equal to the bottom."""
    from pycaffe_mpi import prototxt

    shared = Net(prototxt.parse_text(SPLIT_NET, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    split = shared.layer_dict["data_data_0_split"]
    assert split.share_data
    tops = [shared.blobs[n] for n in shared.top_names["data_data_0_split"]]
    assert all(np.shares_memory(t.data, shared.blobs["data"].data) for t in tops)
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]])
    out = shared.forward(data=x)
    np.testing.assert_allclose(out["a"], 2 * x, rtol=1e-6)
    np.testing.assert_allclose(out["b"], 2 * x, rtol=1e-6)
