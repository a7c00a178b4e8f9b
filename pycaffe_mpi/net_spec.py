"""pycaffe's net specification: write nets in Python, get the NetParameter pycaffe would write.

    import pycaffe_mpi as caffe
    from pycaffe_mpi import layers as L, params as P

    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=64, backend=P.Data.LMDB, source="train_lmdb",
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.conv1, n.label)
    open("train.prototxt", "w").write(str(n.to_proto()))

The magic (the same as BVLC's ``python/caffe/net_spec.py``):

* ``layers`` and ``params`` are objects whose attributes are made up on access: ``L.<Type>(*tops,
  **kwargs)`` is a layer of type ``<Type>`` (any string; nothing checks it is registered) and
  returns its Top (a tuple of Tops when ``ntop`` > 1, the layer itself when ``ntop=0``);
  ``P.<Name>.<CONST>`` is ``caffe_pb2.<Name>Parameter.<CONST>`` (e.g. ``P.Pooling.MAX``).
* Special keywords: ``ntop`` (number of tops, default 1) and ``in_place`` (tops = bottoms).
* Any other keyword is a field. Keywords ending in ``param`` (``param``, ``convolution_param``,
  ``transform_param``...) are fields of the LayerParameter itself; other keywords go to the
  type's own ``<type>_param`` message when it has that field (``num_output`` of Convolution goes
  to ``convolution_param``), else to the LayerParameter (``loss_weight``, ``include``, ``name``,
  ``propagate_down``...). Dicts become messages, lists become repeated fields (a list of dicts a
  repeated message, e.g. ``param=[dict(lr_mult=1), dict(lr_mult=2)]``), and a single value given
  to a repeated field becomes a one-element list (``loss_weight=1``, ``include=dict(phase=0)``).
* Names: ``NetSpec`` attribute names name the tops and, by the first top, the layers. Tops not
  assigned to a NetSpec attribute (and layers with no top) get ``<Type><k>`` names, counted per
  type in the order ``to_proto`` meets them. An in-place layer's tops keep its bottoms' names
  while the layer takes its attribute's name. Layers come out in dependency order, each once.

Limits: only what the LayerParameter schema holds can be written (unknown fields raise
AttributeError naming the layer type and field); nothing checks bottoms/tops against the layer
type until a Net is built; as in pycaffe, the automatic names are not promised to be stable.
Beyond pycaffe: the keywords of ``Deconvolution`` go to ``convolution_param`` and those of the
MPI layers to ``mpi_param`` (pycaffe's rule finds no ``<type>_param`` for them), ``NetSpec``
raises AttributeError (not KeyError) for an unassigned name, and ``L``/``P`` refuse names that
start with an underscore, so introspection does not make layers.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

from pycaffe_mpi.proto import caffe_pb2

__all__ = ["Function", "NetSpec", "Parameters", "Top", "assign_proto", "layers",
           "param_name_dict", "params", "to_proto"]

#: layer types whose keywords go to a ``*_param`` message not named after the type
_EXTRA_PARAM_NAMES = {"Deconvolution": "convolution", "MPIBroadcast": "mpi", "MPIGather": "mpi"}


def param_name_dict() -> dict[str, str]:
    """Layer type -> its parameter field's stem, from the schema (``"Pooling": "pooling"``).

    Found as pycaffe does: every ``<stem>_param`` field of LayerParameter whose message type is
    ``<Type>Parameter``.
    """
    out: dict[str, str] = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    out.update(_EXTRA_PARAM_NAMES)
    return out


_param_names = param_name_dict()


def to_proto(*tops: Top) -> Any:
    """A NetParameter with every layer needed to compute ``tops`` (automatic names)."""
    layers: collections.OrderedDict[Function, Any] = collections.OrderedDict()
    autonames: collections.Counter[str] = collections.Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def assign_proto(proto: Any, name: str, val: Any) -> None:
    """Set field ``name`` of message ``proto`` from a Python value (recursively).

    Lists fill repeated fields (dicts in them become messages), dicts fill messages, and a
    single value given to a repeated field is taken as a one-element list.
    """
    field = getattr(proto, name)
    if hasattr(field, "extend") and not isinstance(val, list):
        val = [val]
    if isinstance(val, list):
        if val and isinstance(val[0], dict):
            for item in val:
                message = field.add()
                for k, v in item.items():
                    assign_proto(message, k, v)
        else:
            field.extend(val)
    elif isinstance(val, dict):
        for k, v in val.items():
            assign_proto(field, k, v)
    else:
        setattr(proto, name, val)


class Top:
    """One output blob of a layer: the ``n``-th top of Function ``fn``."""

    def __init__(self, fn: Function, n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self) -> Any:
        """A NetParameter with every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layers: dict, names: dict, autonames: collections.Counter) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer: its type, its bottoms (Tops of other layers) and its keyword parameters."""

    def __init__(self, type_name: str, inputs: Iterable[Any], params: dict[str, Any]) -> None:
        self.type_name = type_name
        self.inputs = tuple(inputs)
        for index, inp in enumerate(self.inputs):
            if not isinstance(inp, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
        self.params = dict(params)
        self.ntop = int(self.params.pop("ntop", 1))
        self.in_place = bool(self.params.pop("in_place", False))
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names: dict, autonames: collections.Counter) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top: Top, names: dict, autonames: collections.Counter) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _to_proto(self, layers: dict, names: dict, autonames: collections.Counter) -> None:
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name, bottom=bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._get_top_name(t, names, autonames) for t in self.tops)
        layer.name = self._get_name(names, autonames)
        for k, v in self.params.items():
            self._assign(layer, k, v)
        layers[self] = layer

    def _assign(self, layer: Any, key: str, val: Any) -> None:
        if not key.endswith("param"):
            stem = _param_names.get(self.type_name)
            if stem is not None:
                sub = getattr(layer, stem + "_param")
                if key in sub.DESCRIPTOR.fields_by_name:
                    assign_proto(sub, key, val)
                    return
        if key not in layer.DESCRIPTOR.fields_by_name:
            where = f" nor of {_param_names[self.type_name]}_param" \
                if self.type_name in _param_names else ""
            raise AttributeError(f'layer type "{self.type_name}": "{key}" is a field neither '
                                 f"of LayerParameter{where}")
        assign_proto(layer, key, val)


class NetSpec:
    """Named tops; ``to_proto()`` writes every layer they need, named after the attributes."""

    def __init__(self) -> None:
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name: str, value: Any) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top named {name!r}") from None

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str) -> Any:
        return self.tops[item]

    def to_proto(self) -> Any:
        """The NetParameter of all assigned tops (and the layers they depend on)."""
        names = {v: k for k, v in self.tops.items()}
        autonames: collections.Counter[str] = collections.Counter()
        layers: collections.OrderedDict[Function, Any] = collections.OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``layers.<Type>(*bottoms, **params)`` makes a layer of that type; see the module doc."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def layer_fn(*args: Top, **kwargs: Any) -> Any:
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = name
        return layer_fn


class Parameters:
    """``params.<Name>.<CONST>`` is ``caffe_pb2.<Name>Parameter.<CONST>`` (e.g. Pooling.MAX)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        message = getattr(caffe_pb2, name + "Parameter")

        class Param:
            def __getattr__(self, param_name: str) -> Any:
                return getattr(message, param_name)

        return Param()


layers = Layers()
params = Parameters()
