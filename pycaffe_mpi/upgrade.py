"""Old net and solver formats, upgraded once at read time (Caffe's ``upgrade_proto.cpp``).

:func:`upgrade_net_as_needed` runs Caffe's steps in Caffe's order, each with Caffe's log lines:

1. **V0 nets** (``layers { layer { type: "conv" ... } }``): "padding" layers are folded into
   the pad of the convolution/pooling that reads them, then every V0 layer becomes a V1 layer
   (lower-case type strings become the V1 enum; flat fields move into the typed parameters).
2. **Old data transformation fields**: ``scale``, ``mean_file``, ``crop_size`` and ``mirror``
   inside ``data_param`` / ``image_data_param`` / ``window_data_param`` move to
   ``transform_param``.
3. **V1 nets** (``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 }``) become ``layer``
   blocks with string types and ``param { lr_mult decay_mult name share_mode }``.
4. **Net-level inputs** (``input`` with ``input_shape`` or ``input_dim``) become a leading Input
   layer named "input"; ``input`` alone (old .caffemodel files) is dropped.
5. **BatchNorm** layers with three ``param`` specs (the old definition) get lr_mult and
   decay_mult 0 on each.

Solvers: :func:`upgrade_solver_as_needed` turns the ``solver_type`` enum into the ``type``
string, and :func:`upgrade_snapshot_prefix` fills in ``snapshot_prefix`` as Caffe HEAD does.

What Caffe makes fatal raises :class:`~pycaffe_mpi.errors.PrototxtError`; what Caffe logs as an
error and continues past ("not fully compatible") is logged and reported by the returned flag.

Besides Caffe: step 2 also applies to ``layer`` blocks (Caffe ignores the old fields there),
filling only what ``transform_param`` leaves unset; :func:`transform_param_of` gives the same
merge for a layer built without a net.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from pycaffe_mpi import errors
from pycaffe_mpi.proto import caffe_pb2

log = logging.getLogger("pycaffe_mpi")

V1 = caffe_pb2.V1LayerParameter

# -- V0 -> V1 ----------------------------------------------------------------------------------
V0_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT, "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

_ANY = "*"  # a V0 field that moves to the same place whatever the layer type
_WHOLE = ""  # the V0 field is a message that becomes the V1 layer's namesake
_DATA_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param",
                 "images": "image_data_param", "window_data": "window_data_param"}
_CONV_IP = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_CONV_POOL = {"conv": "convolution_param", "pool": "pooling_param"}
_LRN = {"lrn": "lrn_param"}
_WINDOW = {"window_data": "window_data_param"}
_IMAGES = {"images": "image_data_param"}

# V0 field -> (V1 field name, {V0 type (or _ANY): V1 parameter message}); Caffe's
# UpgradeV0LayerParameter as a table.
V0_FIELDS: dict[str, tuple[str, dict[str, str]]] = {
    "num_output": ("num_output", _CONV_IP),
    "biasterm": ("bias_term", _CONV_IP),
    "weight_filler": ("weight_filler", _CONV_IP),
    "bias_filler": ("bias_filler", _CONV_IP),
    "pad": ("pad", _CONV_POOL),
    "kernelsize": ("kernel_size", _CONV_POOL),
    "group": ("group", {"conv": "convolution_param"}),
    "stride": ("stride", _CONV_POOL),
    "pool": ("pool", {"pool": "pooling_param"}),
    "dropout_ratio": ("dropout_ratio", {"dropout": "dropout_param"}),
    "local_size": ("local_size", _LRN),
    "alpha": ("alpha", _LRN),
    "beta": ("beta", _LRN),
    "k": ("k", _LRN),
    "source": ("source", {**_DATA_SOURCES, "infogain_loss": "infogain_loss_param"}),
    "scale": ("scale", {_ANY: "transform_param"}),
    "meanfile": ("mean_file", {_ANY: "transform_param"}),
    "batchsize": ("batch_size", _DATA_SOURCES),
    "cropsize": ("crop_size", {_ANY: "transform_param"}),
    "mirror": ("mirror", {_ANY: "transform_param"}),
    "rand_skip": ("rand_skip", {"data": "data_param", "images": "image_data_param"}),
    "shuffle_images": ("shuffle", _IMAGES),
    "new_height": ("new_height", _IMAGES),
    "new_width": ("new_width", _IMAGES),
    "concat_dim": ("concat_dim", {"concat": "concat_param"}),
    "det_fg_threshold": ("fg_threshold", _WINDOW),
    "det_bg_threshold": ("bg_threshold", _WINDOW),
    "det_fg_fraction": ("fg_fraction", _WINDOW),
    "det_context_pad": ("context_pad", _WINDOW),
    "det_crop_mode": ("crop_mode", _WINDOW),
    "hdf5_output_param": ("hdf5_output_param", {"hdf5_output": _WHOLE}),
}


def net_needs_v0_to_v1_upgrade(param: Any) -> bool:
    return any(lc.HasField("layer") for lc in param.layers)


def net_needs_v1_to_v2_upgrade(param: Any) -> bool:
    return len(param.layers) > 0


def _where(i: int, locations: Sequence[str]) -> str:
    loc = locations[i] if i < len(locations) else ""
    return f"{loc}: " if loc else ""


def upgrade_v0_padding_layers(param: Any, locations: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """Fold each V0 "padding" layer into the pad of the conv/pool layer reading its output."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layers[:]
    out_locs: list[str] = []
    last_top: dict[str, int] = {name: -1 for name in param.input}
    for i, lc in enumerate(param.layers):
        lp = lc.layer
        if lp.type != "padding":
            out.layers.add().CopyFrom(lc)
            out_locs.append(locations[i] if i < len(locations) else "")
        for j, blob in enumerate(lc.bottom):
            if blob not in last_top:
                raise errors.PrototxtError(
                    f"{_where(i, locations)}Unknown blob input {blob} to layer {j}")
            src_idx = last_top[blob]
            if src_idx == -1 or param.layers[src_idx].layer.type != "padding":
                continue
            src = param.layers[src_idx]
            where = _where(i, locations)
            if lp.type not in ("conv", "pool"):
                raise errors.PrototxtError(f"{where}Padding layer input to non-convolutional / "
                                           f"non-pooling layer type {lp.type}")
            if len(lc.bottom) != 1:
                raise errors.PrototxtError(f"{where}Conv Layer takes a single blob as input.")
            if len(src.bottom) != 1:
                raise errors.PrototxtError(f"{where}Padding Layer takes a single blob as input.")
            if len(src.top) != 1:
                raise errors.PrototxtError(f"{where}Padding Layer produces a single blob as "
                                           "output.")
            out.layers[-1].layer.pad = src.layer.pad
            out.layers[-1].bottom[j] = src.bottom[0]
        for blob in lc.top:
            last_top[blob] = i
    return out, out_locs


def _set_field(msg: Any, name: str, value: Any) -> None:
    current = getattr(msg, name)
    if hasattr(current, "append"):  # a repeated field (conv pad, kernel_size, stride)
        current.append(value)
    elif hasattr(current, "CopyFrom"):  # a message (fillers)
        current.CopyFrom(value)
    else:
        setattr(msg, name, value)


def upgrade_v0_layer(v0_connection: Any, out: Any) -> bool:
    """One V1 layer holding a V0 ``layer`` -> a plain V1 layer; False where a field is lost."""
    out.Clear()
    out.bottom.extend(v0_connection.bottom)
    out.top.extend(v0_connection.top)
    if not v0_connection.HasField("layer"):
        return True
    v0 = v0_connection.layer
    ok = True
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_TYPES:
            raise errors.PrototxtError(f'layer "{v0.name}": Unknown layer name: {v0.type}')
        out.type = V0_TYPES[v0.type]
    for b in v0.blobs:
        out.blobs.add().CopyFrom(b)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for v0_name, (v1_name, targets) in V0_FIELDS.items():
        if not v0.HasField(v0_name):
            continue
        target = targets.get(v0.type, targets.get(_ANY))
        if target is None:
            shown = "shuffle" if v0_name == "shuffle_images" else v0_name
            log.error("Unknown parameter %s for layer type %s", shown, v0.type)
            ok = False
        else:
            _set_field(getattr(out, target) if target else out, v1_name, getattr(v0, v0_name))
    return ok


def upgrade_v0_net(param: Any, locations: Sequence[str] = ()) -> tuple[Any, bool, list[str]]:
    """Caffe's ``UpgradeV0Net``: (V1 net, fully compatible?, locations)."""
    padded, locs = upgrade_v0_padding_layers(param, locations)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    ok = True
    for lc in padded.layers:
        ok &= upgrade_v0_layer(lc, out.layers.add())
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out, ok, locs


# -- old data transformation fields --------------------------------------------------------------
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
_DATA_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                V1.WINDOW_DATA: "window_data_param"}
_DATA_PARAMS_V2 = {"Data": "data_param", "ImageData": "image_data_param",
                   "WindowData": "window_data_param"}


def _old_transform_fields(lp: Any, table: dict[Any, str]) -> list[str]:
    name = table.get(lp.type)
    if name is None or not lp.HasField(name):
        return []
    sub = getattr(lp, name)
    return [f for f in _TRANSFORM_FIELDS if sub.HasField(f)]


def net_needs_data_upgrade(param: Any) -> bool:
    return any(_old_transform_fields(lp, _DATA_PARAMS) for lp in param.layers) or \
        any(_old_transform_fields(lp, _DATA_PARAMS_V2) for lp in param.layer)


def upgrade_net_data_transformation(param: Any) -> None:
    """Move the old transformation fields of data layers into ``transform_param`` (in place)."""
    for lp in param.layers:  # V1, as Caffe: the old field wins
        for f in _old_transform_fields(lp, _DATA_PARAMS):
            sub = getattr(lp, _DATA_PARAMS[lp.type])
            setattr(lp.transform_param, f, getattr(sub, f))
            sub.ClearField(f)
    for lp in param.layer:
        if _old_transform_fields(lp, _DATA_PARAMS_V2):
            lp.transform_param.CopyFrom(transform_param_of(lp))
            for f in _TRANSFORM_FIELDS:
                getattr(lp, _DATA_PARAMS_V2[lp.type]).ClearField(f)


def transform_param_of(lp: Any) -> Any:
    """``lp.transform_param`` with the old fields of its data parameter filled in where
    ``transform_param`` leaves them unset (a copy; ``lp`` is unchanged)."""
    tp = caffe_pb2.TransformationParameter()
    tp.CopyFrom(lp.transform_param)
    for f in _old_transform_fields(lp, _DATA_PARAMS_V2):
        if not tp.HasField(f):
            log.warning("%s: %s.%s is deprecated; use transform_param.%s",
                        errors.layer_where(lp), _DATA_PARAMS_V2[lp.type], f, f)
            setattr(tp, f, getattr(getattr(lp, _DATA_PARAMS_V2[lp.type]), f))
    return tp


# -- V1 -> V2 ----------------------------------------------------------------------------------
V1_TYPES = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL", V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution", V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data",
    V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", V1.MVN: "MVN",
    V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split",
    V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}
# Every typed parameter of a V1 layer has a namesake in LayerParameter.
_V1_PARAM_FIELDS = tuple(f.name for f in V1.DESCRIPTOR.fields
                         if f.name.endswith("_param") and f.message_type is not None)


def upgrade_v1_layer(v1: Any, out: Any) -> bool:
    """One V1 layer -> a ``layer`` (LayerParameter); False where something is lost."""
    out.Clear()
    ok = True
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    for rule in v1.include:
        out.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        out.exclude.add().CopyFrom(rule)
    if v1.HasField("type"):
        if v1.type not in V1_TYPES:
            raise errors.PrototxtError(f'layer "{v1.name}": Unknown V1LayerParameter layer '
                                       f"type: {v1.type}")
        out.type = V1_TYPES[v1.type]
    for b in v1.blobs:
        out.blobs.add().CopyFrom(b)

    def spec(i: int) -> Any:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        # NOTE: V1's DimCheckMode and ParamSpec's have the same names and numbers
        spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(V1.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for name in _V1_PARAM_FIELDS:
        if v1.HasField(name):
            getattr(out, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        log.error("Input NetParameter has V0 layer -- ignoring.")
        ok = False
    return ok


def upgrade_v1_net(param: Any) -> tuple[Any, bool]:
    """Caffe's ``UpgradeV1Net``: (net with ``layer`` blocks, fully compatible?)."""
    if len(param.layer):
        raise errors.PrototxtError(
            "Refusing to upgrade inconsistent NetParameter input; the definition includes both "
            "'layer' and 'layers' fields. The current format defines 'layer' fields with string "
            "type like layer { type: 'Layer' ... } and not layers { type: LAYER ... }. "
            "Manually switch the definition to 'layer' format to continue.")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layers[:]
    ok = True
    for i, v1 in enumerate(param.layers):
        if not upgrade_v1_layer(v1, out.layer.add()):
            log.error("Upgrade of input layer %d failed.", i)
            ok = False
    return out, ok


# -- net-level inputs, BatchNorm -------------------------------------------------------------------
def net_needs_input_upgrade(param: Any) -> bool:
    return len(param.input) > 0


def upgrade_net_input(param: Any) -> bool:
    """``input`` + ``input_shape``/``input_dim`` -> a leading Input layer (in place).

    Returns whether a layer was added (``input`` alone, as old .caffemodel files hold it, is
    only dropped).
    """
    n = len(param.input)
    has_shape, has_dim = len(param.input_shape) > 0, len(param.input_dim) > 0
    added = has_shape or has_dim
    if added:
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=list(param.input))
        if has_shape:
            # NOTE: one shape for several inputs is accepted: the Input layer applies it to all
            if len(param.input_shape) not in (1, n):
                raise errors.PrototxtError(f"input_shape must be given once or once per input "
                                           f"({n}), got {len(param.input_shape)}")
            for s in param.input_shape:
                layer.input_param.shape.add().CopyFrom(s)
        else:
            if len(param.input_dim) != 4 * n:
                raise errors.PrototxtError(f"input_dim must give 4 dimensions for each input "
                                           f"({4 * n} values), got {len(param.input_dim)}")
            dims = list(param.input_dim)
            for i in range(n):
                layer.input_param.shape.add().dim.extend(dims[4 * i: 4 * i + 4])
        layers = [layer, *param.layer]
        del param.layer[:]
        param.layer.extend(layers)
    del param.input[:]
    del param.input_shape[:]
    del param.input_dim[:]
    return added


def net_needs_batchnorm_upgrade(param: Any) -> bool:
    return any(lp.type == "BatchNorm" and len(lp.param) == 3 for lp in param.layer)


def upgrade_net_batchnorm(param: Any) -> None:
    """Old BatchNorm definitions list three param specs: their statistics must not learn."""
    for lp in param.layer:
        if lp.type == "BatchNorm" and len(lp.param) == 3:
            for spec in lp.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# -- the whole net ---------------------------------------------------------------------------------
def net_needs_upgrade(param: Any) -> bool:
    return (net_needs_v0_to_v1_upgrade(param) or net_needs_v1_to_v2_upgrade(param)
            or net_needs_data_upgrade(param) or net_needs_input_upgrade(param)
            or net_needs_batchnorm_upgrade(param))


def upgrade_net_as_needed(source: str, param: Any, locations: Sequence[str] | None = None,
                          log: logging.Logger = log) -> tuple[bool, list[str]]:
    """Upgrade ``param`` in place, as Caffe's ``UpgradeNetAsNeeded``; an error names the file
    (and the line of the layer it names, where known)."""
    locs = list(locations) if locations is not None else []
    names = [lc.layer.name if lc.HasField("layer") else lc.name for lc in param.layers]
    names += [lp.name for lp in param.layer]
    try:
        return _upgrade_net_as_needed(source, param, locations, log)
    except errors.PrototxtError as e:
        msg = str(e)
        named = [i for i, n in enumerate(names) if msg.startswith(f'layer "{n}"')]
        where = locs[named[0]] if named and named[0] < len(locs) and locs[named[0]] else \
            ("" if source.startswith("<") else source)
        if not where or where in msg:
            raise
        raise errors.PrototxtError(f"{where}: {msg}") from None


def _upgrade_net_as_needed(source: str, param: Any, locations: Sequence[str] | None = None,
                           log: logging.Logger = log) -> tuple[bool, list[str]]:
    """Upgrade ``param`` in place, as Caffe's ``UpgradeNetAsNeeded``.

    Args:
        source: the file name for the log lines.
        param: a NetParameter (text or binary) of any format.
        locations: the "file:line" of each top-level ``layer``/``layers`` block; kept in step
            with the layers (padding layers go, the Input layer comes with no location).

    Returns:
        (fully compatible, the layers' locations after the upgrade).
    """
    locs = list(locations) if locations is not None else []
    success = True
    if net_needs_v0_to_v1_upgrade(param):
        log.info("Attempting to upgrade input file specified using deprecated "
                 "V0LayerParameter: %s", source)
        upgraded, ok, locs = upgrade_v0_net(param, locs)
        param.CopyFrom(upgraded)
        if not ok:
            success = False
            log.error("Warning: had one or more problems upgrading V0NetParameter to "
                      "NetParameter (see above); continuing anyway.")
        else:
            log.info("Successfully upgraded file specified using deprecated V0LayerParameter")
        log.warning("Note that future Caffe releases will not support V0NetParameter; use "
                    "pycaffe-mpi upgrade-net for prototxt and model weights to upgrade this "
                    "and any other net protos to the new format.")
    if net_needs_data_upgrade(param):
        log.info("Attempting to upgrade input file specified using deprecated "
                 "transformation parameters: %s", source)
        upgrade_net_data_transformation(param)
        log.info("Successfully upgraded file specified using deprecated data transformation "
                 "parameters.")
        log.warning("Note that future Caffe releases will only support transform_param "
                    "messages for transformation fields.")
    if net_needs_v1_to_v2_upgrade(param):
        log.info("Attempting to upgrade input file specified using deprecated "
                 "V1LayerParameter: %s", source)
        upgraded, ok = upgrade_v1_net(param)
        param.CopyFrom(upgraded)
        if not ok:
            success = False
            log.error("Warning: had one or more problems upgrading V1LayerParameter (see "
                      "above); continuing anyway.")
        else:
            log.info("Successfully upgraded file specified using deprecated V1LayerParameter")
    if net_needs_input_upgrade(param):
        log.info("Attempting to upgrade input file specified using deprecated input fields: %s",
                 source)
        if upgrade_net_input(param):
            locs = ["", *locs]
        log.info("Successfully upgraded file specified using deprecated input fields.")
        log.warning("Note that future Caffe releases will only support input layers and not "
                    "input fields.")
    if net_needs_batchnorm_upgrade(param):
        log.info("Attempting to upgrade batch norm layers using deprecated params: %s", source)
        upgrade_net_batchnorm(param)
        log.info("Successfully upgraded batch norm layers using deprecated params.")
    return success, locs


# -- solvers -----------------------------------------------------------------------------------
_SOLVER = caffe_pb2.SolverParameter
SOLVER_TYPE_NAMES = {_SOLVER.SGD: "SGD", _SOLVER.NESTEROV: "Nesterov",
                     _SOLVER.ADAGRAD: "AdaGrad", _SOLVER.RMSPROP: "RMSProp",
                     _SOLVER.ADADELTA: "AdaDelta", _SOLVER.ADAM: "Adam"}


def solver_needs_type_upgrade(param: Any) -> bool:
    return param.HasField("solver_type")


def solver_type_name(param: Any) -> str:
    """The update rule's name: ``type``, or the deprecated ``solver_type`` enum's.

    Both given is accepted when they agree (Caffe refuses both); disagreeing is an error.
    """
    if not param.HasField("solver_type"):
        return param.type
    name = SOLVER_TYPE_NAMES.get(int(param.solver_type))
    if name is None:
        raise errors.SolverError(f"Unknown SolverParameter solver_type: {param.solver_type}")
    if param.HasField("type") and param.type != name:
        raise errors.SolverError(
            "Failed to upgrade solver: old solver_type field (enum) and new type field "
            f'(string) cannot be both specified in solver proto text (solver_type {name}, type '
            f'"{param.type}"); remove the solver_type field and keep type')
    return name


def upgrade_solver_type(param: Any) -> bool:
    """Move a deprecated ``solver_type`` into ``type`` in place; True if it changed ``param``."""
    if not param.HasField("solver_type"):
        return False
    param.type = solver_type_name(param)
    param.ClearField("solver_type")
    return True


def upgrade_solver_as_needed(source: str, param: Any, log: logging.Logger = log) -> bool:
    """Caffe's ``UpgradeSolverAsNeeded`` (the ``solver_type`` enum), with its log lines."""
    if not solver_needs_type_upgrade(param):
        return True
    log.info("Attempting to upgrade input file specified using deprecated 'solver_type' field "
             "(enum)': %s", source)
    try:
        upgrade_solver_type(param)
    except errors.SolverError as e:
        raise errors.SolverError(f"{source}: {e}") from None
    log.info("Successfully upgraded file specified using deprecated 'solver_type' field (enum) "
             "to 'type' field (string).")
    log.warning("Note that future Caffe releases will only support 'type' field (string) for a "
                "solver's type.")
    return True


def upgrade_snapshot_prefix(source: str, param: Any, log: logging.Logger = log) -> None:
    """Caffe HEAD's ``UpgradeSnapshotPrefixProperty``: an absent ``snapshot_prefix`` is the
    solver file without extension; a directory gets the solver file's stem appended."""
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = os.path.splitext(source)[0]
        log.info("snapshot_prefix was not specified and is set to %s", param.snapshot_prefix)
    elif os.path.isdir(param.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(source))[0]
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
        log.info("snapshot_prefix was a directory and is replaced to %s", param.snapshot_prefix)
