"""The MPI comm layers: ``MPIBroadcast`` and ``MPIGather`` (MPI-Caffe's model-parallel plumbing).

A comm layer connects the nets that several MPI processes build from one prototxt. Its group
(the ranks that share it) and root are worked out by the Net (``pycaffe_mpi.net.comm_groups``:
the ranks of the layer's ``include`` rules in listing order, else all ranks not excluded; the
root is ``mpi_param.root``, a world rank). The Net passes them at construction
(``LayerContext.comm_group``), which gives

- ``layer.comm``: the group's :class:`pycaffe_mpi.comm.Comm` (group rank i = i-th member);
- ``layer.comm_root``: the root's rank inside the group;
- ``layer.comm_ranks`` (optional): the members' world ranks, used only in error messages.

A layer built without a Net (the generic layer tests, a user's script) falls back to the size-1
:class:`pycaffe_mpi.comm.SelfComm` with root 0: Broadcast is then a copy, Gather has one top.

Collectives: ``setup``, ``reshape``, ``forward``, ``backward`` and ``sync_flag`` are collective
on the group, so every member must run them in the same order; the Net does (layers in spec order
on every rank; backward flags agreed by ``sync_flag``). Shapes and flags are small objects;
activations and gradients move with the buffer methods on preallocated arrays.

Waiting: the root is the busiest rank of a TreeNet (it runs the shared trunk), so neither layer
makes it wait for members that are not there yet more than once a pass. Broadcast's root
posts its sends (from a copy of its bottom: later in-place layers may write the blob) and
computes on; the members read when they arrive, and the root finishes the sends in its
backward or before it refills the copy (``Comm.bcast_nowait``). Gather's members send their
shape with their data, and the root answers with the table of shapes that every member checks
(``Comm.gather_checked``), in place of a shape exchange at every reshape.

Improvements over MPI-Caffe: any number of axes (MPI-Caffe forced 4-D legacy shapes), shape
changes are followed at every pass (its Gather kept its setup shapes), cross-rank checks of
blob counts, dtypes and shapes raise the same error on every member (never one rank failing
while the others wait), and backward honours ``propagate_down``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import comm as comm_mod
from pycaffe_mpi import errors
from pycaffe_mpi.blob import Blob
from pycaffe_mpi.layer import Layer
from pycaffe_mpi.registry import register_layer

MAX_AXES = 32  # Caffe's kMaxBlobAxes: the size of the shape message


class _CommLayer(Layer):
    """What both comm layers share: the group, the root test, flag agreement, joint errors."""

    comm: Any = None  # the group communicator, set by the Net before setup
    comm_root: int = 0  # the root's rank inside the group
    comm_ranks: Sequence[int] | None = None  # members' world ranks (messages only)
    _scratch_blob: Blob | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        group = getattr(self.ctx, "comm_group", None)
        if group is not None:
            self.comm, self.comm_root, self.comm_ranks = group

    def _group(self) -> Any:
        if self.comm is None:  # built without a Net: a one-member group
            self.comm, self.comm_root = comm_mod.SelfComm(), 0
        return self.comm

    @property
    def is_root(self) -> bool:
        return self._group().rank == self.comm_root

    def _who(self, i: int) -> str:
        ranks = self.comm_ranks
        if ranks is not None and i < len(ranks):
            return f"group rank {i} (world rank {ranks[i]})"
        return f"group rank {i}"

    def _fail_together(self, problems: list[str], field: str) -> None:
        """Raise one NetError listing ``problems``; every member calls this with the same list
        (built from allgathered facts), so all raise the same message or none does."""
        if problems:
            raise errors.NetError(f"{errors.layer_where(self.layer_param, self.location)}, "
                                  f"field {field}: " + "; ".join(problems))

    def _check_members(self, n_blobs: int, what: str, want: Any, rule: str) -> None:
        """Allgather (blob count, dtype) and check them: ``want(i)`` = the count member i
        needs, ``rule`` says why (added to the message)."""
        facts = self._group().allgather_obj((n_blobs, self.dtype.name))
        problems = [f"{self._who(i)} has {n} {what} blob(s), expected {want(i)}"
                    for i, (n, _) in enumerate(facts) if n != want(i)]
        self._fail_together([*problems, rule] if problems else [], what)
        if len({dt for _, dt in facts}) > 1:
            self._fail_together(["members build their nets in different dtypes (" + ", ".join(
                f"{self._who(i)} {dt}" for i, (_, dt) in enumerate(facts)) + "); use one "
                "dtype on every rank"], "dtype")

    def sync_flag(self, flag: bool) -> bool:
        """OR of the members' flags (one allgather on the group).

        Broadcast: only the root has a bottom and every member has a top, so OR is the group's
        answer at all three places the Net asks. Gather: every member has a bottom and only the
        root has tops; at the two "under a loss" places the non-roots (no tops) say False, so OR
        is the root's decision (MPI-Caffe's rule); at the "needs backward" place OR lets a
        member whose branch has parameters take gradients even when the root's own bottom
        does not need one (MPI-Caffe's root-only rule would cut that branch off).
        """
        return any(self._group().allgather_obj(bool(flag)))

    def _scratch(self, shape: Sequence[int]) -> Any:
        """An array to receive into when this member's bottom takes no gradient (a Blob's
        memory: reallocated only when it must grow)."""
        if self._scratch_blob is None:
            self._scratch_blob = self.new_blob(shape)
        self._scratch_blob.reshape(shape)
        return self._scratch_blob.data


@register_layer("MPIBroadcast")
class MPIBroadcast(_CommLayer):
    """The root's blob copied to every member of the layer's group.

    Params: ``mpi_param.root`` (world rank, default 0); the group comes from the layer's
    ``include``/``exclude`` rules (see the module docstring).

    Shapes: root: bottom[0] any shape (0 to 32 axes) -> top[0] the same shape; other members
    (the Net strips their bottoms): no bottom -> top[0] the root's bottom shape. The root sends
    its shape at every reshape, so a changed root shape is followed by every member.

    Forward:  y_m = x_root on every member m.
    Backward: dE/dx_root = Σ_m dE/dy_m (the members' top diffs gathered on the root and
    summed there, the root's own included); written only if the root's propagate_down[0]
    (every member still takes part).
    """

    exact_num_top = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._group()
        root = self.comm_root
        self._check_members(len(bottom), "bottom", lambda i: 1 if i == root else 0,
                            "the root has one bottom, the other members none (the Net "
                            "removes theirs)")
        self._shape_msg = np.zeros(1 + MAX_AXES, np.int64)  # [ndim, dim_0, ..., dim_ndim-1]
        # (size, *shape) on the root: the members' top diffs, summed in backward
        self._stack = self.new_blob((self.comm.size, 0)) if self.is_root else None
        # the root's copy of its bottom that its sends read from while it computes on, and
        # those sends (finished before the copy is written again, and in backward)
        self._sent = self.new_blob((0,)) if self.is_root and self.comm.size > 1 else None
        self._sends = comm_mod.DONE

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        msg = self._shape_msg
        if self.is_root:
            shape = bottom[0].shape
            msg[0] = len(shape) if len(shape) <= MAX_AXES else -1  # -1: all raise below
            msg[1:1 + len(shape[:MAX_AXES])] = shape[:MAX_AXES]
        self.comm.bcast(msg, self.comm_root)
        ndim = int(msg[0])
        self.require(ndim >= 0, "bottom", f"the root's bottom has more than {MAX_AXES} axes")
        top[0].reshape(tuple(int(d) for d in msg[1:1 + ndim]))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if not self.is_root:
            self.comm.bcast_nowait(top[0].data, self.comm_root)  # returns with the data
            return
        x = bottom[0].data
        if self._sent is not None:
            # NOTE: the root sends from a copy of its own and computes on while the members
            # take it: layers after this one may write the bottom/top in place
            self._sends.wait()
            self._sent.reshape(x.shape)
            self._sent.data[...] = x
            self._sends = self.comm.bcast_nowait(self._sent.data, self.comm_root)
        if top[0] is not bottom[0]:
            top[0].data[...] = x

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        # NOTE: the Net calls this on every member or on none (flags agreed by sync_flag). The
        # root's propagate_down can still be false here (force_backward with an explicit
        # propagate_down: false); the root then reduces into a scratch buffer.
        # NOTE: Gather + a sum on the root measured ~2x faster than MPICH's Reduce for
        # CIFAR10-quick's pool2 (819 KB, 3 ranks on 2 cores): 0.5 vs 0.77 ms. The root's own
        # dy is not copied into the stack (Gather in place) but added where its row would be.
        dy = top[0].diff
        if not self.is_root:
            self.comm.gather(dy, None, self.comm_root)
            return
        self._stack.reshape((self.comm.size, *dy.shape))
        stack = self._stack.data
        self.comm.gather(None, stack, self.comm_root)  # the root's own row stays unused
        self._sends.wait()  # every member has its data by now: nothing is left pending
        if propagate_down[0]:
            # Σ in group-rank order, the root's dy in its place (what a sum over the stacked
            # rows gives, without copying dy into the stack)
            dx = bottom[0].diff
            if top[0] is bottom[0] and self.comm_root >= 2:  # dx is dy, read after rows 0, 1
                stack[self.comm_root] = dy
                dy = stack[self.comm_root]
            rows = [dy if i == self.comm_root else stack[i] for i in range(len(stack))]
            if len(rows) == 1:
                if dx is not dy:
                    dx[...] = dy
            else:
                self.xp.add(rows[0], rows[1], out=dx)
                for row in rows[2:]:
                    self.xp.add(dx, row, out=dx)


@register_layer("MPIGather")
class MPIGather(_CommLayer):
    """One blob from every member of the layer's group, collected on the root.

    Params: ``mpi_param.root`` (world rank, default 0); the group comes from the layer's
    ``include``/``exclude`` rules (see the module docstring).

    Shapes: every member: bottom[0], the same shape (any number of axes) on all members (checked
    at setup and at every forward, each member's shape travelling with its data; a mismatch
    raises the same error on every member, listing each one's shape). Root: top[i] (one per
    member, i = group rank, i.e. the position in the include list) has that shape. Other
    members (the Net strips their tops): no top.

    Forward:  y_i = x of member i (on the root).
    Backward: dE/dx on member i = dE/dy_i of the root; written only where that member's
    propagate_down[0] (every member still takes part).
    """

    exact_num_bottom = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        group = self._group()
        root, size = self.comm_root, group.size
        self._check_members(len(top), "top", lambda i: size if i == root else 0,
                            f"the root has one top per member of the layer's group ({size} "
                            "members; top i comes from group rank i), the others none")
        # (size, *shape) on the root: what Gather fills and Scatter sends (a Blob's memory,
        # reallocated only when it must grow)
        self._stack = self.new_blob((size, 0)) if self.is_root else None
        # every member's [ndim, dims...]: agreed at setup (Allgather), then sent with the data
        # at every forward
        self._shape_out = np.zeros(MAX_AXES + 1, np.int64)
        self._shapes_in = np.zeros((size, MAX_AXES + 1), np.int64)
        self._put_shape(bottom[0].shape)
        group.allgather(self._shape_out, self._shapes_in)
        self._check_shapes()

    def _put_shape(self, shape: Sequence[int]) -> None:
        self._shape_out[:] = 0
        self._shape_out[0] = len(shape) if len(shape) <= MAX_AXES else -1  # -1: all raise
        self._shape_out[1:1 + len(shape[:MAX_AXES])] = shape[:MAX_AXES]

    def _check_shapes(self) -> None:
        """Raise on every member alike unless all rows of ``_shapes_in`` agree."""
        if (self._shapes_in[:, 0] < 0).any():
            self._fail_together([f"bottoms may have at most {MAX_AXES} axes"], "bottom")
        shapes = [tuple(int(d) for d in row[1:1 + int(row[0])]) for row in self._shapes_in]
        if any(s != shapes[0] for s in shapes):
            self._fail_together([
                "members' bottoms must have the same shape, got " + ", ".join(
                    f"{self._who(i)} {s}" for i, s in enumerate(shapes))], "bottom")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        # NOTE: no exchange here: the root's shape is the only valid one; forward checks that
        # every member's bottom has it (headers sent with the data)
        if not self.is_root:
            return
        shape = bottom[0].shape
        self._stack.reshape((self.comm.size, *shape))
        for t in top:
            t.reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        self._put_shape(x.shape)
        stack = self._stack.data if self._stack is not None else None  # None off the root
        self.comm.gather_checked(x, self._shape_out, stack, self._shapes_in, self.comm_root)
        self._check_shapes()
        for i, t in enumerate(top):  # no tops off the root
            t.data[...] = stack[i]

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        # NOTE: every member or none gets here (sync_flag); a member whose bottom takes no
        # gradient still receives its part, into a scratch buffer.
        stack = self._stack.data if self._stack is not None else None  # None off the root
        for i, t in enumerate(top):
            stack[i] = t.diff
        dx = bottom[0].diff
        dst = dx if propagate_down[0] else self._scratch(dx.shape)
        self.comm.scatter(stack, dst, self.comm_root)
