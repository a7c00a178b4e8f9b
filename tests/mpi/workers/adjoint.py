"""Numerical adjoint across ranks: the analytic gradients of a net spread over every rank match
central finite differences of the global loss.

Rank 0 has x, broadcast to every rank; each rank applies its own InnerProduct and TanH; the
results are gathered on rank 0, concatenated and compared with fixed targets in a
EuclideanLoss (the only loss). Checked: d loss / d x (on rank 0, with force_backward) and
d loss / d (W, b) of every rank's InnerProduct ("adjoint_params": without force_backward, so the
Net's own flag analysis, agreed across ranks, decides what runs backward). Each
finite-difference step is a collective forward on all ranks: rank 0 broadcasts which element of
which rank moves, so all ranks step in lockstep.
Usage: mpiexec -n N python -m mpi4py adjoint.py adjoint [adjoint_params]
"""

from __future__ import annotations

import numpy as np
from _common import RANK, SIZE, WORLD, build, check, main, say, values

STEP, RTOL = 1e-5, 1e-6


def adjoint(force_backward: bool = True) -> None:
    tops = " ".join(f'top: "z_{i}"' for i in range(SIZE))
    bottoms = " ".join(f'bottom: "z_{i}"' for i in range(SIZE))
    net = build(f"""
    force_backward: {str(force_backward).lower()}
    layer {{ name: "in" type: "Input" top: "x" top: "t"
            input_param {{ shape {{ dim: 2 dim: 3 }} shape {{ dim: 2 dim: {2 * SIZE} }} }}
            include {{ mpi_rank: 0 }} }}
    layer {{ name: "bc" type: "MPIBroadcast" bottom: "x" top: "y" }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "y" top: "h"
            inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" }}
                                   bias_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "act" type: "TanH" bottom: "h" top: "z" }}
    layer {{ name: "g" type: "MPIGather" bottom: "z" {tops} }}
    layer {{ name: "cat" type: "Concat" {bottoms} top: "zz" include {{ mpi_rank: 0 }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "zz" bottom: "t" top: "loss"
            include {{ mpi_rank: 0 }} }}
    """)
    if RANK == 0:
        net.blobs["x"].data[...] = values("x", 0, (2, 3))
        net.blobs["t"].data[...] = values("t", 0, (2, 2 * SIZE))
    for p in net.learnable_params:
        p.diff[...] = 0
    net.forward_backward()
    # what each rank perturbs: rank 0's x (with force_backward), then its own W and b
    with_x = force_backward and RANK == 0
    mine = ([net.blobs["x"]] if with_x else []) + list(net.params["ip"])
    analytic = [np.array(b.diff, copy=True) for b in mine]
    counts = WORLD.allgather_obj([b.count for b in mine])
    worst = 0.0
    plan = [(r, j, k) for r in range(SIZE) for j, n in enumerate(counts[r]) for k in range(n)]
    for step in range(len(plan)):
        r, j, k = WORLD.bcast_obj(plan[step] if RANK == 0 else None, 0)
        losses = []
        for sign in (1, -1):
            if r == RANK:
                flat = mine[j].data.reshape(-1)
                x0 = float(flat[k])
                flat[k] = x0 + sign * STEP
            losses.append(net.forward_loss())
            if r == RANK:
                flat[k] = x0
        numeric = WORLD.bcast_obj((losses[0] - losses[1]) / (2 * STEP), 0)
        if r == RANK:
            a = float(analytic[j].reshape(-1)[k])
            err = abs(a - numeric) / max(abs(a), abs(numeric), 1e-3)
            worst = max(worst, err)
            check(err <= RTOL, f"blob {j} element {k}: analytic {a:.10g}, numeric {numeric:.10g}")
    check(len(plan) == 6 * force_backward + 8 * SIZE, f"checked {len(plan)} elements")
    say(f"rank {RANK}: {len(plan)} elements, worst relative error {worst:.2e}")


if __name__ == "__main__":
    main({"adjoint": adjoint, "adjoint_params": lambda: adjoint(force_backward=False)})
