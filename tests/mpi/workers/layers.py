"""MPIBroadcast / MPIGather forward and backward across ranks (run at 2 and 3 ranks unless a
case says otherwise). Usage: mpiexec -n N python -m mpi4py layers.py CASE [CASE ...]"""

from __future__ import annotations

import numpy as np
from _common import RANK, SIZE, WORLD, build, check, close, main, values

SHAPES = [(), (4,), (2, 3), (2, 3, 2, 2), (1, 2, 3, 2, 2)]  # 0-D to 5-D


def shape_txt(shape) -> str:
    return "shape { " + " ".join(f"dim: {d}" for d in shape) + " }"


def tops(prefix: str, n: int) -> str:
    return " ".join(f'top: "{prefix}_{i}"' for i in range(n))


def ranks(rs) -> str:
    return " ".join(f"mpi_rank: {r}" for r in rs)


def roundtrip() -> None:
    """Every shape through a Broadcast and a Gather, the root varying with the shape."""
    text = ["force_backward: true"]
    for k, shape in enumerate(SHAPES):
        root = k % SIZE
        text.append(f"""
        layer {{ name: "inb{k}" type: "Input" top: "xb{k}" input_param {{ {shape_txt(shape)} }}
                include {{ mpi_rank: {root} }} }}
        layer {{ name: "bc{k}" type: "MPIBroadcast" bottom: "xb{k}" top: "yb{k}"
                mpi_param {{ root: {root} }} }}
        layer {{ name: "ing{k}" type: "Input" top: "xg{k}" input_param {{ {shape_txt(shape)} }} }}
        layer {{ name: "ga{k}" type: "MPIGather" bottom: "xg{k}" {tops(f"g{k}", SIZE)}
                mpi_param {{ root: {root} }} }}""")
    net = build("\n".join(text))
    for k, shape in enumerate(SHAPES):
        root = k % SIZE
        if root == RANK:
            net.blobs[f"xb{k}"].data[...] = values(f"xb{k}", root, shape)
        net.blobs[f"xg{k}"].data[...] = values(f"xg{k}", RANK, shape)
    net.forward_loss()
    for k, shape in enumerate(SHAPES):
        root = k % SIZE
        close(net.blobs[f"yb{k}"].data, values(f"xb{k}", root, shape), f"broadcast {shape}")
        net.blobs[f"yb{k}"].diff[...] = values(f"dyb{k}", RANK, shape)
        if root == RANK:
            for i in range(SIZE):
                close(net.blobs[f"g{k}_{i}"].data, values(f"xg{k}", i, shape),
                      f"gather {shape} top {i}")
                net.blobs[f"g{k}_{i}"].diff[...] = values(f"dg{k}", i, shape)
        else:
            check(f"g{k}_0" not in net.blobs, "a non-root has gather tops")
    net.backward_all()
    for k, shape in enumerate(SHAPES):
        root = k % SIZE
        if root == RANK:
            want = sum(values(f"dyb{k}", r, shape) for r in range(SIZE))
            close(net.blobs[f"xb{k}"].diff, want, f"broadcast backward {shape}")
        close(net.blobs[f"xg{k}"].diff, values(f"dg{k}", RANK, shape),
              f"gather backward {shape}")


def subgroup() -> None:
    """3 ranks: layers on world ranks [2, 0] (include order = group order), an exclude group,
    and a world broadcast rooted at rank 1, which is in neither sub-group."""
    check(SIZE == 3, "subgroup needs 3 ranks")
    net = build(f"""
    force_backward: true
    layer {{ name: "in" type: "Input" top: "x" input_param {{ {shape_txt((2, 2))} }} }}
    layer {{ name: "g" type: "MPIGather" bottom: "x" top: "a" top: "b"
            include {{ {ranks([2, 0])} }} mpi_param {{ root: 0 }} }}
    layer {{ name: "bc" type: "MPIBroadcast" bottom: "x" top: "y"
            include {{ mpi_rank: 2 }} include {{ mpi_rank: 0 }} mpi_param {{ root: 2 }} }}
    layer {{ name: "ge" type: "MPIGather" bottom: "x" top: "c" top: "d"
            exclude {{ mpi_rank: 1 }} mpi_param {{ root: 2 }} }}
    layer {{ name: "bcw" type: "MPIBroadcast" bottom: "x" top: "w" mpi_param {{ root: 1 }} }}
    """)
    x = {r: values("x", r, (2, 2)) for r in range(SIZE)}
    net.blobs["x"].data[...] = x[RANK]
    net.forward_loss()
    close(net.blobs["w"].data, x[1], "world broadcast from rank 1")
    if RANK == 1:
        check(not {"g", "bc", "ge"} & set(net.layer_dict), "rank 1 has sub-group layers")
    else:
        g, bc = net.layer_dict["g"], net.layer_dict["bc"]
        check(g.comm.size == 2 and g.comm.rank == {2: 0, 0: 1}[RANK] and g.comm_root == 1,
              f"gather group: size {g.comm.size}, rank {g.comm.rank}, root {g.comm_root}")
        check(bc.comm_root == 0, f"broadcast root index {bc.comm_root}")
        close(net.blobs["y"].data, x[2], "sub-group broadcast from rank 2")
    if RANK == 0:
        close(net.blobs["a"].data, x[2], "top 0 comes from world rank 2 (listed first)")
        close(net.blobs["b"].data, x[0], "top 1 comes from world rank 0")
    if RANK == 2:
        close(net.blobs["c"].data, x[0], "exclude group: top 0 = world rank 0")
        close(net.blobs["d"].data, x[2], "exclude group: top 1 = world rank 2")
    d = {name: {r: values(name, r, (2, 2)) for r in range(SIZE)} for name in "abcdyw"}
    for name in "abcdyw":
        if name in net.blobs:
            net.blobs[name].diff[...] = d[name][RANK]
    net.backward_all()
    want = {0: d["b"][0] + d["c"][2],
            1: sum(d["w"].values()),
            2: d["a"][0] + d["y"][0] + d["y"][2] + d["d"][2]}[RANK]
    close(net.blobs["x"].diff, want, "bottom diff through the sub-groups")


def reshape() -> None:
    """The root's bottom changes shape (and number of axes) between forwards: every member's
    broadcast top follows; gathered tops follow the members' new shapes."""
    root_g = SIZE - 1
    net = build(f"""
    force_backward: true
    layer {{ name: "in" type: "Input" top: "x" input_param {{ {shape_txt((2, 3))} }}
            include {{ mpi_rank: 0 }} }}
    layer {{ name: "bc" type: "MPIBroadcast" bottom: "x" top: "y" }}
    layer {{ name: "inz" type: "Input" top: "z" input_param {{ {shape_txt((2, 3))} }} }}
    layer {{ name: "g" type: "MPIGather" bottom: "z" {tops("t", SIZE)}
            mpi_param {{ root: {root_g} }} }}
    """)
    for step, shape in enumerate([(2, 3), (4, 1, 3), (5,), (3, 2)]):
        if RANK == 0:
            net.blobs["x"].reshape(shape)
            net.blobs["x"].data[...] = values(f"x{step}", 0, shape)
        net.blobs["z"].reshape(shape)
        net.blobs["z"].data[...] = values(f"z{step}", RANK, shape)
        net.forward_loss()
        close(net.blobs["y"].data, values(f"x{step}", 0, shape), f"broadcast after {shape}")
        net.blobs["y"].diff[...] = values(f"dy{step}", RANK, shape)
        if root_g == RANK:
            for i in range(SIZE):
                close(net.blobs[f"t_{i}"].data, values(f"z{step}", i, shape),
                      f"gather top {i} after {shape}")
                net.blobs[f"t_{i}"].diff[...] = values(f"dt{step}", i, shape)
        net.backward_all()
        if RANK == 0:
            close(net.blobs["x"].diff, sum(values(f"dy{step}", r, shape) for r in range(SIZE)),
                  f"broadcast backward after {shape}")
        close(net.blobs["z"].diff, values(f"dt{step}", RANK, shape),
              f"gather backward after {shape}")


def _chain(extra: str = "", bc_extra: str = "") -> str:
    """rank 0: x -> ip0 -> h; Broadcast h -> y on all; each rank: y -> ip -> z; Gather to
    rank 0, whose Eltwise sum s meets a target t in a EuclideanLoss (no loss elsewhere)."""
    return f"""
    {extra}
    layer {{ name: "in" type: "Input" top: "x" top: "t"
            input_param {{ {shape_txt((2, 3))} {shape_txt((2, 2))} }} include {{ mpi_rank: 0 }} }}
    layer {{ name: "ip0" type: "InnerProduct" bottom: "x" top: "h" include {{ mpi_rank: 0 }}
            inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "bc" type: "MPIBroadcast" bottom: "h" top: "y" {bc_extra} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "y" top: "z"
            inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" }}
                                   bias_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "g" type: "MPIGather" bottom: "z" {tops("z", SIZE)} }}
    layer {{ name: "sum" type: "Eltwise" {" ".join(f'bottom: "z_{i}"' for i in range(SIZE))}
            top: "s" include {{ mpi_rank: 0 }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "t" top: "loss"
            include {{ mpi_rank: 0 }} }}
    """


def _fill_chain(net) -> None:
    if RANK == 0:
        net.blobs["x"].data[...] = values("x", 0, (2, 3))
        net.blobs["t"].data[...] = values("t", 0, (2, 2))
    for p in net.learnable_params:
        p.diff[...] = 0


def flags() -> None:
    """Ranks other than 0 have no loss of their own, yet their branch runs backward: the
    Gather's flags are agreed with the root's, and their InnerProduct gets gradients."""
    net = build(_chain())
    for name in ("bc", "ip", "g"):
        check(net.layer_need_backward[net.layer_names.index(name)],
              f"layer {name} does not need backward on rank {RANK}")
    _fill_chain(net)
    net.forward_backward()
    w, b = net.params["ip"]
    check(np.abs(w.diff).sum() > 0 and np.abs(b.diff).sum() > 0,
          f"ip got no gradient on rank {RANK}")
    if RANK == 0:
        check(np.abs(net.params["ip0"][0].diff).sum() > 0, "ip0 got no gradient")


def gather_or() -> None:
    """The root's Gather bottom is plain data (needs no gradient) while the other members'
    come from an InnerProduct: those members still get their gradient (exactly)."""
    others = list(range(1, SIZE))
    net = build(f"""
    layer {{ name: "in0" type: "Input" top: "z" top: "t"
            input_param {{ {shape_txt((2, 3))} {shape_txt((2, 3))} }}
            include {{ mpi_rank: 0 }} }}
    layer {{ name: "in" type: "Input" top: "x" input_param {{ {shape_txt((2, 4))} }}
            include {{ {ranks(others)} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "z" include {{ {ranks(others)} }}
            inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "g" type: "MPIGather" bottom: "z" {tops("z", SIZE)} }}
    layer {{ name: "sum" type: "Eltwise" {" ".join(f'bottom: "z_{i}"' for i in range(SIZE))}
            top: "s" include {{ mpi_rank: 0 }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "t" top: "loss"
            include {{ mpi_rank: 0 }} }}
    """)
    check(net.layer_need_backward[net.layer_names.index("g")], "gather skips backward")
    if RANK == 0:
        net.blobs["z"].data[...] = values("z", 0, (2, 3))
        net.blobs["t"].data[...] = values("t", 0, (2, 3))
        net.blobs["z"].diff[...] = 7.0  # the root's bottom takes no gradient: left alone
    else:
        net.blobs["x"].data[...] = values("x", RANK, (2, 4))
        net.params["ip"][0].diff[...] = 0
    net.forward_backward()
    ds = None
    if RANK == 0:
        check(np.all(net.blobs["z"].diff == 7.0), "root's data bottom diff was written")
        ds = (net.blobs["s"].data - net.blobs["t"].data) / 2  # Euclidean: (s - t) / N
    ds = WORLD.bcast_obj(ds, 0)
    if RANK:
        close(net.params["ip"][0].diff, ds.T @ values("x", RANK, (2, 4)), "ip weight diff")


def pdown_false() -> None:
    """propagate_down: false on the root's Broadcast bottom. Without force_backward the
    flags make every member skip the layer's backward; with it, every member runs it and the
    root's bottom diff is left alone (no deadlock either way)."""
    net = build(_chain(bc_extra="propagate_down: false"))
    check(not net.layer_need_backward[net.layer_names.index("bc")], "bc runs backward")
    _fill_chain(net)
    net.forward_backward()
    if RANK == 0:
        check(np.all(net.params["ip0"][0].diff == 0), "ip0 got a gradient through bc")
    check(np.abs(net.params["ip"][0].diff).sum() > 0, "ip got no gradient")
    net = build(_chain(extra="force_backward: true", bc_extra="propagate_down: false"))
    i = net.layer_names.index("bc")
    check(net.layer_need_backward[i], "bc skips backward under force_backward")
    _fill_chain(net)
    net.forward_loss()
    if RANK == 0:
        check(net.bottom_need_backward[i] == [False], "root's bc bottom needs backward")
        net.blobs["h"].diff[...] = 7.0
    net.backward_from_to(len(net.layers) - 1, i)
    if RANK == 0:
        check(np.all(net.blobs["h"].diff == 7.0), "root's bc bottom diff was written")


def root_runs_ahead() -> None:
    """The root's broadcast returns before the members take the data: the root writes its
    bottom and top at once (as later in-place layers would) while the members are still
    asleep, three forwards in a row with no backward, then one with a backward; the members
    still get each forward's values. The broadcast is in place (bottom = top) and rooted at
    the last rank, and its backward sums in group-rank order, bit for bit. 1 MB: large
    messages are the ones MPI reads out of the sender's memory late."""
    import time

    root, shape = SIZE - 1, (64, 2048)
    net = build(f"""
    force_backward: true
    layer {{ name: "in" type: "Input" top: "x" input_param {{ {shape_txt(shape)} }}
            include {{ mpi_rank: {root} }} }}
    layer {{ name: "bc" type: "MPIBroadcast" bottom: "x" top: "x" mpi_param {{ root: {root} }} }}
    """)
    for step in range(4):
        want = values(f"x{step}", root, shape)
        if root == RANK:
            net.blobs["x"].data[...] = want
        else:
            time.sleep(0.2)  # the root is far ahead when the members get there
        net.forward_loss()
        if root == RANK:
            net.blobs["x"].data[...] = -1.0  # written before the members have read
        else:
            check(np.array_equal(net.blobs["x"].data, want), f"forward {step}: members got "
                  "the root's later writes")
    dys = [values("dy", r, shape) for r in range(SIZE)]
    net.blobs["x"].diff[...] = dys[RANK]
    net.backward_all()
    if root == RANK:
        want = dys[0].copy()
        for dy in dys[1:]:
            want += dy
        check(np.array_equal(net.blobs["x"].diff, want), "backward: not the sum in group-rank "
              "order")


def gather_drains() -> None:
    """Comm.gather_checked: a member whose data has another size than the root expects is
    received and dropped (its row left as it was), every rank gets every header, and the
    communicator is clean after it (a Gather follows). The generic two-round default (the
    base class's, run on the same communicator) gives the same."""
    from pycaffe_mpi import comm as comm_mod

    odd = 1
    for how in ("one round", "default"):
        gather = (WORLD.gather_checked if how == "one round"
                  else lambda *a: comm_mod.Comm.gather_checked(WORLD, *a))
        n = 7 if odd == RANK else 5
        send = values("send", RANK, (n,))
        header = np.array([n, RANK], np.int64)
        headers = np.zeros((SIZE, 2), np.int64)
        stack = np.full((SIZE, 5), 9.0) if RANK == 0 else None
        gather(send, header, stack, headers, 0)
        check(np.array_equal(headers, [[7 if r == odd else 5, r] for r in range(SIZE)]),
              f"{how}: headers {headers.tolist()}")
        if RANK == 0:
            for r in range(SIZE):
                if r == odd or how == "default":  # the default gathers nothing on a mismatch
                    check(np.all(stack[r] == 9.0), f"{how}: row {r} was written")
                else:
                    check(np.array_equal(stack[r], values("send", r, (5,))), f"{how}: row {r}")
        after = np.zeros((SIZE, 2)) if RANK == 0 else None
        WORLD.gather(np.full(2, float(RANK)), after, 0)
        if RANK == 0:
            check(np.array_equal(after[:, 0], np.arange(SIZE)), f"{how}: gather after it")


def bcast_order() -> None:
    """Comm.bcast_nowait: two broadcasts from one root outstanding at once reach the members
    in call order; waiting twice is harmless."""
    a, b = np.zeros(1000), np.zeros(3)
    if RANK == 0:
        a[:], b[:] = values("a", 0, (1000,)), values("b", 0, (3,))
    pa = WORLD.bcast_nowait(a, 0)
    pb = WORLD.bcast_nowait(b, 0)
    pb.wait()
    pa.wait()
    pa.wait()
    check(np.array_equal(a, values("a", 0, (1000,))) and np.array_equal(b, values("b", 0, (3,))),
          "broadcasts crossed")


if __name__ == "__main__":
    main({f.__name__: f for f in (roundtrip, subgroup, reshape, flags, gather_or, pdown_false,
                                  root_runs_ahead, gather_drains, bcast_order)})
