"""Layer cases for ``type: "Python"``: BVLC-style user layers from
:mod:`pycaffe_mpi.testing.pylayers`, built through the Python layer factory."""

from __future__ import annotations

from pycaffe_mpi.testing.layer_cases import LayerCase, add_case

_MODULE = "pycaffe_mpi.testing.pylayers"


def _proto(layer: str, param_str: str = "") -> str:
    extra = f" param_str: '{param_str}'" if param_str else ""
    return f'python_param {{ module: "{_MODULE}" layer: "{layer}"{extra} }}'


add_case(LayerCase(
    type="Python", id="times_ten", proto=_proto("TimesTenLayer"), bottoms=[(2, 3, 4)],
    reference=lambda b, layer: [10 * b[0]]))
add_case(LayerCase(
    type="Python", id="times_ten_param_str", proto=_proto("TimesTenLayer", '{"multiplier": -3}'),
    bottoms=[(3, 5)], reference=lambda b, layer: [-3 * b[0]]))
add_case(LayerCase(
    type="Python", id="learnable_param", proto=_proto("ParamLayer", '{"w": 0.75}'),
    bottoms=[(2, 3, 2)], reference=lambda b, layer: [layer.blobs[0].data[0] * b[0]]))
