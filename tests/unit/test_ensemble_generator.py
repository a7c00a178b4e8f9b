"""The ensemble / TreeNet generator (``pycaffe_mpi.ensemble``, ``pycaffe-mpi ensemble``).

References are independent of the generator: M separately built base nets (split at the data),
the base net itself (split at the score), parameter counts worked out by hand, and the written
prototxt read back by the parser and built in both phases (each MPI rank's part through
single-process stand-ins for the comm layers; tests/mpi/test_ensemble_placement.py runs it).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from pycaffe_mpi import cli, cli_tools, datasets, ensemble, prototxt, solvers
from pycaffe_mpi import net as net_mod
from pycaffe_mpi.layer import TEST, TRAIN
from pycaffe_mpi.net import Net
from pycaffe_mpi.proto import caffe_pb2

FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 }'
BODY = f"""
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 {FILL} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param {{ num_output: 5 {FILL} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param {{ name: "ip2_w" }}
  inner_product_param {{ num_output: 3 {FILL} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
# conv1 3·2·3·3 + 3 = 57; ip1 5·(3·2·2) + 5 = 65; ip2 3·5 + 3 = 18
PARAMS = {"conv1": 57, "ip1": 65, "ip2": 18}
INPUT_NET = ('name: "tiny"\nlayer { name: "input" type: "Input" top: "data" top: "label" '
             "input_param { shape { dim: 6 dim: 2 dim: 4 dim: 4 } shape { dim: 6 } } }" + BODY)
LMDB_DATA = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.01 }} data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.01 }} data_param {{ source: "{db}" batch_size: 3 backend: LMDB }} }}
"""
SOLVER = """net: "{net}"
base_lr: 0.05 momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed" max_iter: 2 display: 0
test_iter: 1 test_interval: 100 snapshot_prefix: "{prefix}" random_seed: 3 solver_mode: CPU
"""


def parse(text: str) -> caffe_pb2.NetParameter:
    return prototxt.parse_text(text, caffe_pb2.NetParameter())


def make(base: caffe_pb2.NetParameter, **kw) -> caffe_pb2.NetParameter:
    return ensemble.make_ensemble_net(base, ensemble.EnsembleSpec(**kw))


def reparsed(param: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """What the written file reads back as."""
    return parse(text_format.MessageToString(param))


@pytest.fixture(scope="module")
def lmdb_base(tmp_path_factory: pytest.TempPathFactory) -> caffe_pb2.NetParameter:
    d = tmp_path_factory.mktemp("ens_db")
    rng = np.random.default_rng(0)
    datasets.write_datum_lmdb(d / "db", rng.integers(0, 256, (20, 2, 4, 4), dtype=np.uint8),
                              rng.integers(0, 3, 20))
    return parse(LMDB_DATA.format(db=d / "db") + BODY)


@pytest.fixture(scope="module")
def input_base() -> caffe_pb2.NetParameter:
    return parse(INPUT_NET)


def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.standard_normal((6, 2, 4, 4)), rng.integers(0, 3, 6).astype(np.float64)


def run(net: Net) -> float:
    """Forward and backward on the fixed batch; the loss."""
    x, y = batch()
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = y
    net.clear_param_diffs()
    loss = net.forward_backward()
    return loss


def f64(param: caffe_pb2.NetParameter, phase: int = TRAIN, seed: int = 5) -> Net:
    return Net(param, phase, dtype=np.float64, seed=seed)


# -- every output parses and builds ---------------------------------------------------------------
def _configs() -> list[dict]:
    out = []
    for loss, split in itertools.product(ensemble.LOSSES, (None, "conv1", "pool1", "ip2")):
        for fused in ((True, False) if loss in ensemble.AVERAGED_LOSSES else (True,)):
            for same_init, ranks in itertools.product((False, True), (1, 3)):
                if split == "ip2" and ranks > 1:  # nothing to place: an error, tested below
                    continue
                out.append(dict(members=3, loss=loss, split=split, fused=fused,
                                same_init=same_init, ranks=ranks))
    for same_init, ranks in itertools.product((False, True), (1, 3)):
        out.append(dict(members=3, bagging=True, same_init=same_init, ranks=ranks))
    out.append(dict(members=4, loss="mcl", k=2, split="pool1", ranks=3))
    out.append(dict(members=5, loss="score-avg", ranks=2, fused=False))
    return out


def _stand_ins(view: caffe_pb2.NetParameter, rank: int, shapes: dict) -> caffe_pb2.NetParameter:
    """One rank's pruned net with its comm layers replaced for a single process: on rank 0 a
    Broadcast or Gather becomes a Split (same bottom and tops); elsewhere a Broadcast becomes
    an Input of the root's blob shape and a Gather (a sink there) is dropped."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(view)
    del out.layer[:]
    for lp in view.layer:
        if lp.type not in net_mod.COMM_TYPES:
            out.layer.add().CopyFrom(lp)
        elif rank == 0:
            out.layer.add(name=lp.name, type="Split", bottom=lp.bottom, top=lp.top)
        elif lp.type == "MPIBroadcast":
            new = out.layer.add(name=lp.name, type="Input", top=lp.top)
            new.input_param.shape.add(dim=shapes[lp.top[0]])
    return out


def build_rank_views(param: caffe_pb2.NetParameter, phase: int, ranks: int) -> list[Net]:
    """Every rank's part of ``param`` for ``phase``, built in this process (rank 0 first: its
    broadcast blobs give the other ranks' input shapes)."""
    state = caffe_pb2.NetState(phase=phase)
    nets: list[Net] = []
    shapes: dict[str, tuple] = {}
    for r in range(ranks):
        view, _ = net_mod.filter_net(param, state, r)
        net_mod.strip_for_rank(view, r)
        net = Net(_stand_ins(view, r, shapes), phase, seed=1, rank=r)
        if r == 0:
            shapes = {name: tuple(b.shape) for name, b in net.blobs.items()}
        nets.append(net)
    return nets


# with bagging, a member's Data copy (data_m<i>) lives with it
MEMBER_LAYERS = ("data", "conv1", "relu1", "pool1", "ip1", "relu2", "ip2")


def member_of(layer_name: str) -> int | None:
    """The member whose copy of a base layer ``layer_name`` is, or None."""
    base, _, m = layer_name.rpartition("_m")
    return int(m) if base in MEMBER_LAYERS and m.isdigit() else None


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items() if k != "members"))
def test_every_output_parses_and_builds(lmdb_base, cfg):
    param = reparsed(make(lmdb_base, **cfg))
    m, ranks = cfg["members"], cfg["ranks"]
    for phase in (TRAIN, TEST):
        if ranks == 1:
            nets = [Net(param, phase, seed=1)]
            if phase == TRAIN:
                nets[0].forward_backward()
            else:
                nets[0].forward_loss()
        else:
            nets = build_rank_views(param, phase, ranks)
        try:
            if phase == TEST:
                acc = nets[0].layer_dict[ensemble.ACCURACY_LAYER]
                assert acc.layer_param.type == "EnsembleAccuracy"
                assert nets[0].top_names[ensemble.ACCURACY_LAYER] == list(ensemble.ACCURACY_TOPS)
            assert "loss" in nets[0].blobs or {f"loss_m{i}" for i in range(m)} <= set(
                nets[0].blobs)
            hosted = [{member_of(n) for n in net.layer_names} - {None} for net in nets]
            assert set().union(*hosted) == (set() if cfg.get("split") == "ip2" else set(range(m)))
            for r, net in enumerate(nets):
                assert all(i % ranks == r for i in hosted[r])
                if r:  # members and the broadcasts that feed them, nothing else
                    assert hosted[r]
                    assert all(member_of(n) is not None or n.endswith(
                        ("_broadcast", "_split", f"_to_members_rank{r}"))
                               for n in net.layer_names), net.layer_names
        finally:
            for net in nets:
                net.close()


def test_placement_of_four_members_on_three_ranks(input_base):
    param = make(input_base, members=4, split="pool1", loss="mcl", ranks=3)
    groups = net_mod.comm_groups(param, caffe_pb2.NetState(phase=TRAIN), 3)
    by_name = {lp.name: (lp, members, root) for lp, members, root, _ in groups}
    assert set(by_name) == {"pool1_broadcast", "ip2_gather_slot0"}
    bc, members, root = by_name["pool1_broadcast"]
    assert (list(bc.bottom), list(bc.top), members, root) == (["pool1"], ["pool1_b"],
                                                              [0, 1, 2], 0)
    ga, members, root = by_name["ip2_gather_slot0"]
    assert list(ga.bottom) == ["ip2_slot0"] and members == [0, 1, 2] and root == 0
    assert list(ga.top) == ["ip2_m0", "ip2_m1", "ip2_m2"]  # member order on rank 0
    layers = {lp.name: lp for lp in param.layer}
    # member 3 is alone in slot 1 on rank 0: no comm, its score keeps its name
    assert list(layers["ip2_m3"].top) == ["ip2_m3"]
    assert [list(r.mpi_rank) for r in layers["ip2_m3"].include] == [[0]]
    assert [list(r.mpi_rank) for r in layers["conv1"].include] == [[0]]
    for m in range(3):
        assert list(layers[f"ip2_m{m}"].top) == ["ip2_slot0"]
        assert [list(r.mpi_rank) for r in layers[f"ip2_m{m}"].include] == [[m]]
    assert list(layers["ip1_m1"].bottom) == ["pool1_b"]
    assert list(layers["loss"].bottom) == [f"ip2_m{m}" for m in range(4)] + ["label"]
    # phase rules are kept, mpi_rank added
    acc = layers[ensemble.ACCURACY_LAYER]
    assert [(r.phase, list(r.mpi_rank)) for r in acc.include] == [(TEST, [0])]
    data_test = [lp for lp in param.layer if lp.name == "input"]
    assert [list(r.mpi_rank) for r in data_test[0].include] == [[0]]


# -- split at the data = independent models; split at the score = one model -----------------------
@pytest.mark.parametrize("split", [None, "input"])
def test_split_at_data_equals_independent_models(input_base, split):
    param = make(input_base, members=3, split=split)
    assert param == make(input_base, members=3)  # split at the data layer = no split
    ens = f64(param)
    run(ens)
    for m in range(3):
        single = f64(input_base, seed=100 + m)
        for name in PARAMS:
            for dst, src in zip(single.params[name], ens.params[f"{name}_m{m}"]):
                dst.data[...] = src.data
        loss = run(single)
        np.testing.assert_array_equal(ens.blobs[f"ip2_m{m}"].data, single.blobs["ip2"].data)
        assert float(ens.blobs[f"loss_m{m}"].data) == pytest.approx(loss, rel=1e-12)
        for name in PARAMS:
            for j, (a, b) in enumerate(zip(ens.params[f"{name}_m{m}"], single.params[name])):
                np.testing.assert_allclose(a.diff, b.diff, rtol=1e-12, atol=1e-14,
                                           err_msg=f"{name} param {j}, member {m}")
    # members start apart (names differ), and the ip2_w share name does not tie them
    assert not np.allclose(ens.params["ip2_m0"][0].data, ens.params["ip2_m1"][0].data)
    assert len(ens.learnable_params) == 3 * 6


@pytest.mark.parametrize("loss, factor", [("independent", 3), ("score-avg", 1),
                                          ("prob-avg", 1), ("mcl", 1)])
def test_split_at_score_equals_single_model(input_base, loss, factor):
    """With one score read by M members: independent losses give M times the single model's
    loss and gradients; averaged losses and MCL (each example to one member) give exactly the
    single model's."""
    base = f64(input_base)
    want_loss = run(base)
    ens = f64(make(input_base, members=3, split="ip2", loss=loss))
    for name in PARAMS:  # same layer names and seed: same initial weights
        np.testing.assert_array_equal(ens.params[name][0].data, base.params[name][0].data)
    got_loss = run(ens)
    assert got_loss == pytest.approx(factor * want_loss, rel=1e-12)
    np.testing.assert_array_equal(ens.blobs["ip2"].data, base.blobs["ip2"].data)
    for name in PARAMS:
        for a, b in zip(ens.params[name], base.params[name]):
            np.testing.assert_allclose(a.diff, factor * b.diff, rtol=1e-10, atol=1e-13)


def test_mcl_with_k_equal_to_m_is_the_independent_ensemble(input_base):
    indep = f64(make(input_base, members=3, split="pool1"))
    mcl = f64(make(input_base, members=3, split="pool1", loss="mcl", k=3))
    assert run(mcl) == pytest.approx(run(indep), rel=1e-12)
    for name in ("conv1", "ip1_m0", "ip2_m2"):
        np.testing.assert_allclose(mcl.params[name][0].diff, indep.params[name][0].diff,
                                   rtol=1e-10, atol=1e-13)


def test_fused_and_composed_averaged_losses_agree(input_base):
    for loss in ensemble.AVERAGED_LOSSES:
        fused = f64(make(input_base, members=3, split="conv1", loss=loss))
        composed = f64(make(input_base, members=3, split="conv1", loss=loss, fused=False))
        # NOTE: Eltwise's coeff is a float field: 1/3 is stored rounded to float32
        assert run(fused) == pytest.approx(run(composed), rel=1e-6)
        for name in ("conv1", "ip1_m1"):
            np.testing.assert_allclose(fused.params[name][0].diff,
                                       composed.params[name][0].diff, rtol=1e-6, atol=1e-9)


# -- initialisation and bagging -------------------------------------------------------------------
def test_same_init_gives_identical_members(input_base):
    base = f64(input_base)
    same = f64(make(input_base, members=3, split="pool1", same_init=True))
    apart = f64(make(input_base, members=3, split="pool1"))
    for name in ("ip1", "ip2"):
        for m in range(3):
            for a, b in zip(same.params[f"{name}_m{m}"], base.params[name]):
                np.testing.assert_array_equal(a.data, b.data)
        for m1, m2 in itertools.combinations(range(3), 2):
            assert not np.allclose(apart.params[f"{name}_m{m1}"][0].data,
                                   apart.params[f"{name}_m{m2}"][0].data)
    np.testing.assert_array_equal(same.params["conv1"][0].data, base.params["conv1"][0].data)


def test_same_init_leaves_dropout_its_own_masks():
    param = parse(INPUT_NET.replace(
        'layer { name: "relu2"',
        'layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" }\nlayer { name: "relu2"'))
    out = {lp.name: lp for lp in make(param, members=2, split="pool1", same_init=True).layer}
    assert out["ip1_m1"].seed_key == "ip1" and not out["drop_m1"].HasField("seed_key")


def test_bagging_members_draw_their_own_samples(lmdb_base):
    param = reparsed(make(lmdb_base, members=3, bagging=True, same_init=True))
    data = [lp for lp in param.layer if lp.type == "Data"]
    train = [lp for lp in data if lp.include[0].phase == TRAIN]
    assert [lp.name for lp in train] == ["data_m0", "data_m1", "data_m2"]
    for m, lp in enumerate(train):
        assert list(lp.top) == [f"data_m{m}", f"label_m{m}"]
        assert lp.bootstrap_param.enable and lp.bootstrap_param.member == m
        assert lp.bootstrap_param.seed == -1  # the solver's random_seed decides
    assert [lp.name for lp in data if lp.include[0].phase == TEST] == ["data"]
    net = Net(param, TRAIN, seed=2)
    try:
        idx = [net.layer_dict[f"data_m{m}"].bootstrap_indices for m in range(3)]
        for a, b in itertools.combinations(idx, 2):
            assert not np.array_equal(a, b)
        net.forward_backward()
        assert not np.array_equal(net.blobs["data_m0"].data, net.blobs["data_m1"].data)
        np.testing.assert_array_equal(net.params["ip1_m0"][0].data, net.params["ip1_m2"][0].data)
    finally:
        net.close()
    test = Net(param, TEST, seed=2)
    try:
        test.forward_loss()
        np.testing.assert_array_equal(test.blobs["data_m1"].data, test.blobs["data"].data)
        acc = next(lp for lp in param.layer if lp.type == "EnsembleAccuracy")
        assert list(acc.bottom) == ["ip2_m0", "ip2_m1", "ip2_m2", "label"]
    finally:
        test.close()


# -- parameter counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("split, want", [
    (None, 3 * 140), ("conv1", 57 + 3 * (65 + 18)), ("pool1", 57 + 3 * (65 + 18)),
    ("ip1", 57 + 65 + 3 * 18), ("ip2", 140)])
def test_param_counts_exact(input_base, split, want):
    assert sum(PARAMS.values()) == 140
    for ranks in (1, 3) if split != "ip2" else (1,):
        param = make(input_base, members=3, split=split, ranks=ranks, loss="mcl")
        assert ensemble.param_counts(input_base, param) == (want, 3 * 140)
    built = Net(make(input_base, members=3, split=split), TRAIN)
    assert sum(b.count for b in built.learnable_params) == want


def test_parameters_line(input_base):
    line = ensemble.parameters_line(input_base, make(input_base, members=3, split="ip1"))
    assert line == "parameters: 176 (3 independent models: 420, 0.42x)"


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    (dict(split="pol1"), ['--split "pol1"', 'did you mean "pool1"']),
    (dict(split="loss"), ['--split "loss"', "replaces"]),
    (dict(loss="mlc"), ['--loss "mlc"', 'did you mean "mcl"']),
    (dict(loss="mcl", k=4), ["--k 4", "--members (3)"]),
    (dict(ranks=4), ["--ranks 4"]),
    (dict(members=0), ["--members 0"]),
    (dict(normalization="BACH"), ["--normalization", 'did you mean "BATCH"']),
    (dict(split="ip2", ranks=2), ["--ranks 2", "nothing"]),
    (dict(bagging=True, split="pool1"), ["--bagging"]),
    (dict(bagging=True, loss="mcl"), ["--bagging"]),
])
def test_option_errors_name_the_option(input_base, kw, words):
    kw.setdefault("members", 3)
    with pytest.raises(ensemble.EnsembleError) as e:
        make(input_base, **kw)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_base_without_softmax_loss_and_bagging_without_data(input_base):
    no_loss = parse(INPUT_NET.replace('"SoftmaxWithLoss"', '"EuclideanLoss"'))
    with pytest.raises(ensemble.EnsembleError, match="no SoftmaxWithLoss"):
        make(no_loss)
    with pytest.raises(ensemble.EnsembleError, match="no TRAIN-phase Data layer"):
        make(input_base, bagging=True)
    placed = parse(INPUT_NET)
    placed.layer[1].include.add(mpi_rank=[0])
    with pytest.raises(ensemble.EnsembleError, match="already places"):
        make(placed, members=2, ranks=2)


def test_solver_lr_scale():
    base = caffe_pb2.SolverParameter(net="a.prototxt", base_lr=0.01, test_net=["t"])
    for loss, scale in [("independent", 1), ("mcl", 1), ("score-avg", 4), ("prob-avg", 4)]:
        sp = ensemble.make_ensemble_solver(base, "out/net.prototxt",
                                           ensemble.EnsembleSpec(loss=loss))
        assert sp.base_lr == pytest.approx(0.01 * scale) and sp.net == "out/net.prototxt"
        assert not len(sp.test_net)
    sp = ensemble.make_ensemble_solver(base, "n", ensemble.EnsembleSpec(loss="prob-avg"), 2.5)
    assert sp.base_lr == pytest.approx(0.025)


# -- the model zoo's CIFAR10-Quick and the command line --------------------------------------------
def cifar_with_dummy_data(batch: int) -> caffe_pb2.NetParameter:
    """models/cifar10_quick with both Data layers (LMDBs are not in the repository) swapped for
    DummyData of CIFAR-10's shape, keeping names, tops and phase rules."""
    param, _ = prototxt.read_net(str(Path(__file__).parents[2] / "models" / "cifar10_quick"
                                     / "train_test.prototxt"))
    for lp in param.layer:
        if lp.type == "Data":
            rules = list(lp.include)
            lp.Clear()
            text_format.Merge(f"""name: "cifar" type: "DummyData" top: "data" top: "label"
                dummy_data_param {{ shape {{ dim: {batch} dim: 3 dim: 32 dim: 32 }}
                  shape {{ dim: {batch} }} data_filler {{ type: "gaussian" std: 50 }}
                  data_filler {{ type: "uniform" min: 0 max: 9.99 }} }}""", lp)
            lp.include.extend(rules)
    return param


@pytest.mark.parametrize("loss", ensemble.LOSSES)
def test_cifar10_quick_round_trip(loss):
    base = cifar_with_dummy_data(2)
    for split in (None, "pool2"):
        param = reparsed(make(base, members=2, split=split, loss=loss))
        for phase in (TRAIN, TEST):
            net = Net(param, phase, seed=1)
            loss_value = net.forward_backward() if phase == TRAIN else net.forward_loss()
            assert np.isfinite(loss_value)


def test_cli_writes_net_and_solver(tmp_path, lmdb_base, capsys):
    (tmp_path / "base.prototxt").write_text(text_format.MessageToString(lmdb_base))
    (tmp_path / "base_solver.prototxt").write_text(SOLVER.format(
        net=tmp_path / "base.prototxt", prefix=tmp_path / "snaps" / "tiny"))
    out = tmp_path / "ens"
    rc = cli.main(["ensemble", "--model", str(tmp_path / "base.prototxt"), "--solver",
                   str(tmp_path / "base_solver.prototxt"), "--members", "3", "--split",
                   "pool1", "--loss", "score-avg", "--output_dir", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"wrote {out / 'train_test.prototxt'}", f"wrote {out / 'solver.prototxt'}",
                     "parameters: 306 (3 independent models: 420, 0.73x)",
                     f"train with: {cli_tools.train_command(str(out / 'solver.prototxt'))}"]
    sp = prototxt.read_solver(str(out / "solver.prototxt"))
    assert sp.net == str(out / "train_test.prototxt")
    assert sp.base_lr == pytest.approx(0.15)  # x M for an averaged loss
    assert sp.snapshot_prefix == str(out / out.name)
    solver = solvers.Solver(str(out / "solver.prototxt"))
    try:
        solver.step(2)
        assert "ip1_m2" in solver.net.layer_dict and len(solver.test_nets) == 1
    finally:
        solver.close()


def test_cli_error_is_one_line(tmp_path, input_base, capsys):
    (tmp_path / "base.prototxt").write_text(text_format.MessageToString(input_base))
    rc = cli.main(["ensemble", "--model", str(tmp_path / "base.prototxt"), "--split", "ipp2",
                   "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("error: --split") and 'did you mean "ip2"' in err[0]
    assert not (tmp_path / "x").exists()


def test_cli_names_the_model_file_and_hints_mpiexec(tmp_path, input_base, capsys):
    no_loss = tmp_path / "no_loss.prototxt"
    no_loss.write_text(INPUT_NET.replace('"SoftmaxWithLoss"', '"EuclideanLoss"'))
    assert cli.main(["ensemble", "--model", str(no_loss), "--output_dir", str(tmp_path)]) == 1
    assert f"error: --model {no_loss}: the base net has no SoftmaxWithLoss" in \
        capsys.readouterr().err
    (tmp_path / "base.prototxt").write_text(INPUT_NET)
    (tmp_path / "s.prototxt").write_text(SOLVER.format(net="x", prefix=""))
    out = tmp_path / "placed"
    assert cli.main(["ensemble", "--model", str(tmp_path / "base.prototxt"), "--solver",
                     str(tmp_path / "s.prototxt"), "--ranks", "2", "--same_init",
                     "--output_dir", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("train with: " + cli_tools.train_command(
        str(out / "solver.prototxt"), ranks=2, same_seed=True))  # tests/unit/test_cli_commands.py
    assert lines[-2] == "parameters: 560 (4 independent models: 560, 1.00x)"
    assert prototxt.read_solver(str(out / "solver.prototxt")).snapshot_prefix == \
        str(out / "placed")
