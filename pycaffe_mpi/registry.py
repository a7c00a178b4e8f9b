"""The layer registry: ``@register_layer("Type")`` maps a prototxt ``type`` to a class."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pycaffe_mpi import errors

_LAYERS: dict[str, type] = {}

# Modules that register the built-in layer families (imported on first lookup).
_FAMILIES = (
    "pycaffe_mpi.layer_types.common",
    "pycaffe_mpi.layer_types.neuron",
    "pycaffe_mpi.layer_types.vision",
    "pycaffe_mpi.layer_types.loss",
    "pycaffe_mpi.layer_types.data",
    "pycaffe_mpi.layer_types.python",
    "pycaffe_mpi.layer_types.comm",
    "pycaffe_mpi.layer_types.ensemble",
    "pycaffe_mpi.layer_types.conv",
    "pycaffe_mpi.layer_types.normalization",
    "pycaffe_mpi.layer_types.utility",
    "pycaffe_mpi.layer_types.more_loss",
    "pycaffe_mpi.layer_types.recurrent",
    "pycaffe_mpi.layer_types.hdf5",
    "pycaffe_mpi.layer_types.input_data",
)
_loaded = False


def register_layer(type_name: str) -> Callable[[type], type]:
    """Class decorator registering a layer class under its prototxt ``type`` string.

    Registering the same name twice is an error (Caffe's "Layer type X already registered").
    """

    def deco(cls: type) -> type:
        if type_name in _LAYERS and _LAYERS[type_name] is not cls:
            raise ValueError(f'layer type "{type_name}" already registered by {_LAYERS[type_name]}')
        cls.type = type_name
        _LAYERS[type_name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _FAMILIES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != mod:
                raise


# Layer types that nets found online use but no BVLC Caffe release has: they come from forks.
# Naming the fork saves users from hunting for a typo that is not there.
FORK_LAYER_TYPES = {
    "AnnotatedData": "SSD", "DetectionEvaluate": "SSD", "DetectionOutput": "SSD",
    "MultiBoxLoss": "SSD", "Normalize": "SSD", "Permute": "SSD", "PriorBox": "SSD",
    "SmoothL1Loss": "SSD / Faster R-CNN", "ROIPooling": "Faster R-CNN",
    "Proposal": "Faster R-CNN", "PSROIPooling": "R-FCN", "Interp": "DeepLab / PSPNet",
    "Upsample": "SegNet / YOLO", "BN": "SegNet", "Reorg": "YOLO", "Region": "YOLO",
    "Yolo": "YOLO", "Mish": "YOLOv4", "ShuffleChannel": "ShuffleNet",
    "DepthwiseConvolution": "MobileNet", "ConvolutionDepthwise": "MobileNet",
    "ReLU6": "MobileNet", "Axpy": "SENet", "CenterLoss": "face recognition",
}
_FORK_BY_LOWER = {k.lower(): k for k in FORK_LAYER_TYPES}
_PYTHON_HINT = ('; to add it, write it as a Python layer (type: "Python" with python_param '
                '{ module: "..." layer: "..." }, as in BVLC Caffe)')


def layer_class(type_name: str, where: str = "") -> type:
    """The class registered for ``type_name``; a clear error with a suggestion otherwise.

    A type from a Caffe fork (:data:`FORK_LAYER_TYPES`) is named as such, with the Python layer
    as the way to add it; anything else gets the nearest registered type ("did you mean").
    """
    _load_builtin()
    if type_name not in _LAYERS:
        prefix = f"{where}: " if where else ""
        fork = _FORK_BY_LOWER.get(type_name.lower())
        if fork is not None:
            raise errors.NetError(
                f'{prefix}layer type "{type_name}" is not a BVLC Caffe layer type (it comes '
                f"from a Caffe fork: {FORK_LAYER_TYPES[fork]}), so pycaffe-mpi does not "
                f"provide it{_PYTHON_HINT}")
        hint = errors.did_you_mean(type_name, _LAYERS) or _PYTHON_HINT
        raise errors.NetError(f'{prefix}unknown layer type "{type_name}"{hint}')
    return _LAYERS[type_name]


def layer_type_list() -> list[str]:
    """Sorted names of every registered layer type (pycaffe's ``caffe.layer_type_list()``)."""
    _load_builtin()
    return sorted(_LAYERS)
