"""Net drawings: one rank, all ranks as clusters with dashed comm edges, with and without dot."""

from __future__ import annotations

import glob
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pycaffe_mpi import errors, netparam
from pycaffe_mpi.reports import draw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MCL_NETS = sorted(p for p in glob.glob(os.path.join(ROOT, "models", "cifar10_mcl", "*.prototxt"))
                  if "solver" not in os.path.basename(p))
# Two ranks: rank 0 broadcasts its data, each rank scores it, rank 0 gathers both scores.
TINY_MPI = """\
name: "tiny_mpi"
layer { name: "data" type: "Input" top: "data" top: "label" include { mpi_rank: 0 }
  input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "bcast" type: "MPIBroadcast" bottom: "data" top: "data_b"
  include { mpi_rank: 0 } include { mpi_rank: 1 } mpi_param { root: 0 } }
layer { name: "ip_m0" type: "InnerProduct" bottom: "data_b" top: "score" include { mpi_rank: 0 }
  inner_product_param { num_output: 4 } }
layer { name: "ip_m1" type: "InnerProduct" bottom: "data_b" top: "score" include { mpi_rank: 1 }
  inner_product_param { num_output: 4 } }
layer { name: "gather" type: "MPIGather" bottom: "score" top: "score_m0" top: "score_m1"
  include { mpi_rank: 0 } include { mpi_rank: 1 } mpi_param { root: 0 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "score_m0" bottom: "score_m1" top: "loss"
  include { mpi_rank: 0 } }
"""
NODE = re.compile(r'^\s*(n\d+) \[label=(?:"((?:[^"\\]|\\.)*)"|([^\s\]]+))')
EDGE = re.compile(r"^\s*(n\d+) -> (n\d+)(?: \[(.*)\])?")


def _parse_dot(source: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, str]]]:
    """Nodes (id -> (cluster, label)) and edges (src, dst, attributes) of our DOT text."""
    nodes, edges, cluster = {}, [], ""
    for line in source.splitlines():
        if m := re.match(r"\s*subgraph (cluster_rank\d+)", line):
            cluster = m.group(1)
        elif line.strip() == "}":
            cluster = ""
        elif m := EDGE.match(line):
            edges.append((m.group(1), m.group(2), m.group(3) or ""))
        elif m := NODE.match(line):
            nodes[m.group(1)] = (cluster, m.group(2) or m.group(3))
    return nodes, edges


def test_mcl_nets_are_found():
    assert MCL_NETS, "models/cifar10_mcl has no net prototxt"


@pytest.mark.parametrize("path", MCL_NETS, ids=os.path.basename)
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_all_ranks_clusters_and_dashed_comm_edges(path, phase, tmp_path):
    param = netparam.read_net(path).param
    size = draw.world_size_of(param)
    out = draw.draw_net(path, tmp_path / "net.dot", all_ranks=True, phase=phase)
    with open(out) as f:
        source = f.read()
    nodes, edges = _parse_dot(source)
    clusters = sorted({c for c, _ in nodes.values() if c})
    assert clusters == sorted(f"cluster_rank{r}" for r in range(size)) and size > 1
    assert 'label="rank 0"' in source
    comm = [lp for lp in param.layer if lp.type in draw.COMM_TYPES]
    dashed = [e for e in edges if "dashed" in e[2]]
    # each comm layer joins its root to every other member of its group, across clusters
    expected = 0
    groups = draw._comm_groups(param, [], draw._phase(phase), size)
    for members, _ in groups.values():
        expected += len(members) - 1
    assert comm and len(dashed) == expected > 0
    for src, dst, attrs in dashed:
        (c_src, l_src), (c_dst, l_dst) = nodes[src], nodes[dst]
        assert c_src != c_dst and c_src and c_dst
        assert ("MPIBroadcast" in l_src and "MPIBroadcast" in l_dst) or (
            "MPIGather" in l_src and "MPIGather" in l_dst)
        assert "label=" in attrs
    # edges inside the clusters are solid
    assert all("dashed" not in a for s, d, a in edges if nodes[s][0] == nodes[d][0])


def test_one_rank_is_the_net_that_rank_builds(tmp_path):
    path = MCL_NETS[0]
    g = draw.net_graph(path, rank=1, phase="TRAIN")
    nodes, edges = _parse_dot(g.source)
    labels = [lab for _, lab in nodes.values()]
    assert any(lab.startswith("conv1_m1") for lab in labels)
    assert not any(lab.startswith("conv1_m0") for lab in labels)
    assert "cluster" not in g.source
    # off the root, MPIBroadcast is a source and MPIGather a sink
    ids = {lab.split("\\n")[0]: n for n, (_, lab) in nodes.items()}
    bcast = next(n for lab, n in ids.items() if lab == "data_broadcast")
    assert not any(d == bcast for _, d, _ in edges)
    gather = next(n for n, (_, lab) in nodes.items() if "MPIGather" in lab)
    assert not any(s == gather for s, _, _ in edges)


def test_caffe_look(tmp_path):
    g = draw.net_graph(os.path.join(ROOT, "models", "cifar10_quick", "train_test.prototxt"),
                       phase="TRAIN")
    src = g.source
    assert "shape=octagon" in src and "shape=record" in src
    assert "#FF5050" in src and "#FF9900" in src and "#CC33FF" in src  # conv, pool, ip
    assert 'label="Batch 100"' in src and 'label=64' in src  # data batch, ip num_output
    assert r"(Pooling MAX)\nkernel size: 3\nstride: 2\npad: 0" in src
    # TEST-only layers are dropped for TRAIN, kept without a phase (Caffe's draw_net)
    assert "(Accuracy)" not in src
    assert "(Accuracy)" in draw.net_graph(os.path.join(
        ROOT, "models", "cifar10_quick", "train_test.prototxt")).source
    with pytest.raises(errors.PycaffeError, match="not both"):
        draw.net_graph(MCL_NETS[0], rank=0, all_ranks=True)


def test_comm_edges_carry_the_blobs(tmp_path):
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_MPI)
    nodes, edges = _parse_dot(draw.net_graph(str(model), all_ranks=True).source)
    dashed = {(nodes[s][0], nodes[d][0], a) for s, d, a in edges if "dashed" in a}
    assert dashed == {("cluster_rank0", "cluster_rank1", "label=data style=dashed"),
                      ("cluster_rank1", "cluster_rank0", "label=score_m1 style=dashed")}


def test_without_dot_writes_dot_and_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no dot program to be found
    out = tmp_path / "net.png"
    with pytest.raises(draw.DotNotFound, match="apt-get install graphviz") as info:
        draw.draw_net(MCL_NETS[0], out, all_ranks=True)
    assert info.value.dot_path == str(tmp_path / "net.dot")
    assert not out.exists()
    with open(info.value.dot_path) as f:
        assert "cluster_rank2" in f.read()
    assert draw.main(["--model", MCL_NETS[0], "-o", str(out)]) == 1


def test_renders_png_and_svg_with_dot(tmp_path, capsys):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot program is not installed (apt-get install graphviz); the "
                    "DOT output is tested without it")
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_MPI)
    out = tmp_path / "tiny.png"
    assert draw.main(["--model", str(model), "--all-ranks", "-o", str(out)]) == 0
    assert "Wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        img = np.asarray(im.convert("RGB"))
    assert img.shape[1] > 800 and img.shape[0] > 200
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    assert (np.abs(img.astype(int) - (0xFF, 0xD7, 0x00)).max(axis=2) == 0).sum() > 100  # comm
    svg = draw.draw_net(str(model), tmp_path / "one.svg", rank=1)
    with open(svg) as f:
        text = f.read()
    assert text.lstrip().startswith("<?xml") and "ip_m1" in text and "ip_m0" not in text
