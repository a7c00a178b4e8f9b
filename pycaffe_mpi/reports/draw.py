"""A net drawn as Caffe's ``draw_net.py`` draws it, for one MPI rank or for all ranks at once.

``pycaffe-mpi draw --model M [--rank r | --all-ranks] [--phase TRAIN|TEST] -o net.png`` (or
``.svg``, ``.pdf``, ``.dot``). Layers are boxes coloured by type as in ``caffe/draw.py``
(convolution red, pooling orange, inner product purple, in-place neurons green, others blue; our
MPI layers gold), blobs grey octagons, and the edges from a layer to its tops carry Caffe's labels
(batch size, num_output). ``--rank r`` draws the net rank r builds (its layers filtered by phase
and rank as the Net filters them; off the root, MPIBroadcast has no bottom and MPIGather no top).
``--all-ranks`` draws one cluster per rank and joins each comm layer's copies across clusters by
dashed edges (root to members for MPIBroadcast, members to root for MPIGather, labelled with the
blob that travels), as in Fig. 10 of "Why M Heads are Better than One".

Drawing needs Graphviz's ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``); without
it the DOT text is written beside the requested file and :class:`DotNotFound` says how to go on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors
from pycaffe_mpi import snapshot as io_mod
from pycaffe_mpi.proto import caffe_pb2

COMM_TYPES = ("MPIBroadcast", "MPIGather")
LAYER_STYLE = {"shape": "record", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "style": "filled", "fillcolor": "#E0E0E0"}
CLUSTER_STYLE = {"style": "rounded,filled", "fillcolor": "#F7F7F7", "color": "#999999"}
COLOURS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
           "InnerProduct": "#CC33FF", "MPIBroadcast": "#FFD700", "MPIGather": "#FFD700"}
DEFAULT_COLOUR = "#6495ED"
NEURON_COLOUR = "#90EE90"
INSTALL_HINT = "install Graphviz's dot program (Debian/Ubuntu: apt-get install graphviz)"


class DotNotFound(errors.PycaffeError):
    """Graphviz's ``dot`` program is missing; the DOT text was written to ``dot_path``."""

    def __init__(self, message: str, dot_path: str) -> None:
        super().__init__(message)
        self.dot_path = dot_path


def _phase(phase: Any) -> int | None:
    if phase is None or isinstance(phase, int):
        return phase
    name = str(phase).upper()
    if name == "ALL":
        return None
    if name not in ("TRAIN", "TEST"):
        raise errors.PycaffeError(f'phase must be TRAIN, TEST or ALL, got "{phase}"')
    return caffe_pb2.Phase.Value(name)


def _filtered(param: Any, locations: Sequence[str], phase: int | None,
              rank: int | None) -> list[Any]:
    """The layers a rank builds for ``phase`` (every phase when None), filtered as the Net
    filters them, comm layers stripped off their root; ``rank=None`` ignores ranks."""
    # the Net's own preparation steps, imported here only (their home may move)
    from pycaffe_mpi import netparam

    if phase is None and rank is None:  # Caffe's draw_net: every layer
        layers = list(param.layer)
    else:
        phases = [phase] if phase is not None else [caffe_pb2.TRAIN, caffe_pb2.TEST]
        layers = []
        for i, lp in enumerate(param.layer):
            loc = locations[i] if i < len(locations) else ""
            if any(netparam.layer_kept(lp, netparam.net_state(param, ph), rank, loc)
                   for ph in phases):
                layers.append(lp)
    out = caffe_pb2.NetParameter()
    out.layer.extend(layers)
    if rank is not None:
        netparam.strip_for_rank(out, rank)
    return list(out.layer)


def _comm_groups(param: Any, locations: Sequence[str], phase: int | None,
                 world_size: int) -> dict[tuple[str, str], tuple[list[int], int]]:
    """(layer name, type) -> (member world ranks in group order, root), over the phases drawn."""
    from pycaffe_mpi import netparam
    from pycaffe_mpi.comm import plan

    groups: dict[tuple[str, str], tuple[list[int], int]] = {}
    for ph in [phase] if phase is not None else [caffe_pb2.TRAIN, caffe_pb2.TEST]:
        state = netparam.net_state(param, ph)
        for lp, members, root, _ in plan.comm_groups(param, state, world_size, locations):
            groups.setdefault((lp.name, lp.type), (members, root))
    return groups


def world_size_of(param: Any) -> int:
    """The ranks a net names: one more than the largest rank in its rules and comm roots, or
    the top count of an MPIGather over the whole world (one top per rank), as the Net asks."""
    from pycaffe_mpi.comm import plan

    return plan.ranks_needed(param)[0]


def _record(text: str) -> str:
    """Text safe inside a record-shaped node's label."""
    for ch in "\\{}|<>":
        text = text.replace(ch, "\\" + ch)
    return text


def layer_label(lp: Any, rankdir: str = "LR") -> str:
    """Caffe's node label: name, (type), and kernel size / stride / pad where they apply."""
    sep = " " if rankdir in ("TB", "BT") else r"\n"
    kind = lp.type
    if kind == "Pooling":
        kind = f"Pooling {caffe_pb2.PoolingParameter.PoolMethod.Name(lp.pooling_param.pool)}"
    parts = [_record(lp.name), _record(f"({kind})")]
    if lp.type in ("Convolution", "Deconvolution"):
        c = lp.convolution_param
        k, s, p = (c.kernel_size[0] if c.kernel_size else 1, c.stride[0] if c.stride else 1,
                   c.pad[0] if c.pad else 0)
        parts += [f"kernel size: {k}", f"stride: {s}", f"pad: {p}"]
    elif lp.type == "Pooling":
        c = lp.pooling_param
        parts += [f"kernel size: {c.kernel_size}", f"stride: {c.stride}", f"pad: {c.pad}"]
    elif lp.type in COMM_TYPES:
        parts.append(f"root: {lp.mpi_param.root}")
    return sep.join(parts)


def edge_label(lp: Any) -> str:
    """Caffe's label of the edges from a layer to its tops."""
    if lp.type == "Data":
        return f"Batch {lp.data_param.batch_size}"
    if lp.type in ("Convolution", "Deconvolution"):
        return str(lp.convolution_param.num_output)
    if lp.type == "InnerProduct":
        return str(lp.inner_product_param.num_output)
    return ""


class _Ids:
    """Short node ids for (scope, kind, name) keys, so no name can break DOT's syntax."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, ...], str] = {}

    def __call__(self, *key: str) -> str:
        return self.ids.setdefault(key, f"n{len(self.ids)}")


def _add_net(g: Any, layers: Sequence[Any], ids: _Ids, scope: str, rankdir: str) -> None:
    """Layer boxes, blob octagons and the edges between them, into ``g``."""
    drawn: set[str] = set()

    def blob(name: str) -> str:
        node = ids(scope, "blob", name)
        if node not in drawn:
            g.node(node, name, **BLOB_STYLE)
            drawn.add(node)
        return node

    for lp in layers:
        node = ids(scope, "layer", lp.name, lp.type)
        in_place = len(lp.bottom) == 1 and len(lp.top) == 1 and lp.bottom[0] == lp.top[0]
        colour = NEURON_COLOUR if in_place else COLOURS.get(lp.type, DEFAULT_COLOUR)
        if node not in drawn:
            g.node(node, layer_label(lp, rankdir), fillcolor=colour, **LAYER_STYLE)
            drawn.add(node)
        for b in lp.bottom:
            g.edge(blob(b), node)
        label = edge_label(lp)
        for t in lp.top:
            g.edge(node, blob(t), **({"label": label} if label else {}))


def net_graph(net_param: Any, rank: int | None = None, all_ranks: bool = False,
              phase: Any = None, rankdir: str = "LR", world_size: int | None = None) -> Any:
    """The net as a ``graphviz.Digraph`` (see the module docstring).

    Args:
        net_param: a NetParameter, a prototxt path, or a :class:`pycaffe_mpi.netparam.ParsedNet`.
        rank: draw the net this rank builds (None: ignore ``mpi_rank`` rules, as Caffe does).
        all_ranks: one cluster per rank, comm layers joined across clusters by dashed edges.
        phase: TRAIN, TEST (a ``caffe_pb2.Phase`` or its name), or None / "ALL" for all layers.
        rankdir: Graphviz's layout direction (LR, RL, TB, BT).
        world_size: ranks drawn with ``all_ranks`` (default: :func:`world_size_of`).
    """
    import graphviz

    from pycaffe_mpi import netparam

    if rank is not None and all_ranks:
        raise errors.PycaffeError("draw one rank (rank) or all ranks (all_ranks), not both")
    if rankdir not in ("LR", "RL", "TB", "BT"):
        raise errors.PycaffeError(f'rankdir must be LR, RL, TB or BT, got "{rankdir}"')
    parsed = netparam.as_parsed(net_param)
    param, locs, ph = parsed.param, parsed.locations, _phase(phase)
    g = graphviz.Digraph(param.name or "Net", graph_attr={"rankdir": rankdir})
    ids = _Ids()
    if rank is not None:
        # a net without rank rules runs the same on any rank; one that names ranks does not
        size = world_size or world_size_of(param)
        if rank < 0 or (rank >= size and (world_size or size > 1)):
            raise errors.PycaffeError(
                f"rank {rank} is outside the {size} ranks (0..{size - 1}) this net runs on"
                + ("" if world_size else "; give --world-size for a larger job"))
    if not all_ranks:
        _add_net(g, _filtered(param, locs, ph, rank), ids, "", rankdir)
        return g
    size = world_size or world_size_of(param)
    for r in range(size):
        with g.subgraph(name=f"cluster_rank{r}") as sub:
            sub.attr(label=f"rank {r}", **CLUSTER_STYLE)
            _add_net(sub, _filtered(param, locs, ph, r), ids, f"rank{r}", rankdir)
    by_name = {(lp.name, lp.type): lp for lp in param.layer}
    for (name, kind), (members, root) in _comm_groups(param, locs, ph, size).items():
        lp = by_name[(name, kind)]
        root_node = ids(f"rank{root}", "layer", name, kind)
        for i, r in enumerate(members):
            if r == root:
                continue
            node = ids(f"rank{r}", "layer", name, kind)
            if kind == "MPIBroadcast":
                g.edge(root_node, node, label=", ".join(lp.bottom), style="dashed")
            else:
                g.edge(node, root_node, label=lp.top[i] if i < len(lp.top) else "",
                       style="dashed")
    return g


def render(graph: Any, out_path: str | os.PathLike) -> str:
    """Write ``graph`` in the format its suffix names (.dot/.gv: the DOT text).

    Raises:
        DotNotFound: ``dot`` is missing; the DOT text went to ``<out_path minus suffix>.dot``.
    """
    import graphviz

    out_path = os.fspath(out_path)
    base, ext = os.path.splitext(out_path)
    fmt = ext[1:].lower()
    if os.path.dirname(out_path):
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    if fmt in ("dot", "gv"):
        io_mod.atomic_write(out_path, graph.source.encode("utf-8"))
        return out_path
    if fmt not in graphviz.FORMATS:
        raise errors.PycaffeError(f'cannot draw to "{out_path}": give a suffix such as .png, '
                                  ".svg, .pdf or .dot")
    try:
        data = graph.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        dot_path = base + ".dot"
        io_mod.atomic_write(dot_path, graph.source.encode("utf-8"))
        raise DotNotFound(
            f"Graphviz's dot program was not found, so {out_path} was not drawn; the graph is in "
            f"{dot_path}. To draw it, {INSTALL_HINT}, then run this again or "
            f"`dot -T{fmt} {dot_path} -o {out_path}`", dot_path) from None
    io_mod.atomic_write(out_path, data)
    return out_path


def draw_net(net_param: Any, out_path: str | os.PathLike, rank: int | None = None,
             all_ranks: bool = False, phase: Any = None, rankdir: str = "LR",
             world_size: int | None = None) -> str:
    """Draw a net to ``out_path`` (format from its suffix) and return the path written.

    Arguments as :func:`net_graph`; raises :class:`DotNotFound` without Graphviz's ``dot`` (after
    writing the DOT text beside ``out_path``).
    """
    return render(net_graph(net_param, rank, all_ranks, phase, rankdir, world_size), out_path)


# -- command line ------------------------------------------------------------------------------
DESCRIPTION = ("Draw a net as Caffe's draw_net.py does: for every rank (default: mpi_rank rules "
               "ignored), one rank (--rank), or all ranks as clusters joined by their MPI layers "
               "(--all-ranks). The format follows the output's suffix (.png, .svg, .pdf, .dot).")


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add draw's arguments to ``parser``."""
    parser.add_argument("--model", "-model", required=True, help="net prototxt")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="image or DOT file to write (.png, .svg, .pdf, .dot)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, help="draw the net this MPI rank builds")
    which.add_argument("--all-ranks", action="store_true",
                       help="one cluster per rank, MPI layers joined by dashed edges")
    parser.add_argument("--phase", "-phase", type=str.upper, default="ALL",
                        choices=("TRAIN", "TEST", "ALL"),
                        help="layers of this phase only (default: %(default)s)")
    parser.add_argument("--rankdir", default="LR", choices=("LR", "RL", "TB", "BT"),
                        help="layout direction (default: %(default)s)")
    parser.add_argument("--world-size", type=int,
                        help="ranks drawn by --all-ranks (default: the ranks the net names)")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``draw`` on an ``argparse`` subparsers object; ``run`` is its handler."""
    p = subparsers.add_parser("draw", help="draw a net (per MPI rank) with Graphviz",
                              description=DESCRIPTION)
    configure(p)
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle parsed ``draw`` arguments; 0 on success (DotNotFound propagates, exit 1)."""
    path = draw_net(args.model, args.output, rank=args.rank, all_ranks=args.all_ranks,
                    phase=args.phase, rankdir=args.rankdir, world_size=args.world_size)
    print(f"Wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``draw`` as a program of its own (``python -m pycaffe_mpi.reports.draw``)."""
    parser = configure(argparse.ArgumentParser(prog="draw", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except errors.PycaffeError as e:
        print(f"draw: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
