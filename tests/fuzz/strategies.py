"""Hypothesis strategies that break prototxt files the ways users do.

Each mutation takes the text of a real net or solver and draws where and how to break it:
braces, value types, enum names, numbers (out of range, huge, zero, negative, non-finite),
unknown fields, a singular field written twice, blob wiring (missing, cyclic, duplicate tops,
split-like names), duplicate layer names, layer types swapped, ``mpi_rank`` rules and
``mpi_param.root``. Byte-level damage (non-UTF-8 bytes, truncation, an empty file) comes last,
so it can hit any of the above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

from pycaffe_mpi import registry
from pycaffe_mpi.proto import caffe_pb2

Draw = Callable[..., object]

# numbers a user may write by mistake, and the edges of every integer type in the schema
NUMBERS = ["0", "-1", "1", "2", "3", "7", "-2147483648", "2147483647", "2147483648",
           "4294967295", "4294967296", "99999999999", "9223372036854775808", "1e40", "-1e40",
           "0.5", "-0.5", "1e-45", "nan", "inf", "-inf", "0x7fffffff", "1.5e308"]
_NUMBER = re.compile(r"(?<=:)(\s*)(-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))\b")
_FIELD_VALUE = re.compile(r"(\b\w+\s*:\s*)(\"[^\"\n]*\"|[-\w.]+)")
_ENUM = re.compile(r"(?<=:)(\s*)([A-Z][A-Z0-9_]+)\b")
_QUOTED = re.compile(r'\b(bottom|top|name)(\s*:\s*)"([^"\n]*)"')
_LAYER_OPEN = re.compile(r"\blayers?\s*\{")
_TYPE = re.compile(r'\btype(\s*:\s*)"([^"\n]*)"')


def _enum_names() -> list[str]:
    names: set[str] = set()
    for enum in caffe_pb2.DESCRIPTOR.enum_types_by_name.values():
        names.update(v.name for v in enum.values)
    for msg in caffe_pb2.DESCRIPTOR.message_types_by_name.values():
        for enum in msg.enum_types:
            names.update(v.name for v in enum.values)
    return sorted(names)


ENUMS = [*_enum_names(), "BOGUS", "max", "Train"]
LAYER_TYPES = sorted(registry.layer_type_list())
# what a user may put where a value belongs
VALUES = ['"x"', '""', "BOGUS", "MAX", "TRAIN", "true", "-1", "0", "2147483648", "1.5", "{ }",
          "nan", '"\\xff"', "[1, 2]"]


def _pick(draw: Draw, matches: Sequence[re.Match]) -> re.Match | None:
    return draw(st.sampled_from(matches)) if matches else None


def _splice(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


# -- the mutations: each (draw, text) -> text --------------------------------------------------
def drop_brace(draw: Draw, text: str) -> str:
    m = _pick(draw, list(re.finditer(r"[{}]", text)))
    return _splice(text, m.start(), m.end(), "") if m else text


def add_brace(draw: Draw, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    return _splice(text, at, at, draw(st.sampled_from(["{", "}", " }", "{ {", ":", '"'])))


def change_number(draw: Draw, text: str) -> str:
    m = _pick(draw, list(_NUMBER.finditer(text)))
    if m is None:
        return text
    return _splice(text, m.start(2), m.end(2), draw(st.sampled_from(NUMBERS)))


def wrong_value(draw: Draw, text: str) -> str:
    m = _pick(draw, list(_FIELD_VALUE.finditer(text)))
    return _splice(text, m.start(2), m.end(2), draw(st.sampled_from(VALUES))) if m else text


def change_enum(draw: Draw, text: str) -> str:
    m = _pick(draw, list(_ENUM.finditer(text)))
    return _splice(text, m.start(2), m.end(2), draw(st.sampled_from(ENUMS))) if m else text


def unknown_field(draw: Draw, text: str) -> str:
    m = _pick(draw, list(re.finditer(r"\{", text)))
    at = m.end() if m else 0
    field = draw(st.sampled_from(["bogus: 1", "bogus_param { x: 1 }", "num_outputs: 3",
                                  "kernelsize: 3", 'layer_type: "ReLU"', "mpi_ranks: 0"]))
    return _splice(text, at, at, f" {field} ")


def field_twice(draw: Draw, text: str) -> str:
    m = _pick(draw, list(_FIELD_VALUE.finditer(text)))
    return _splice(text, m.end(), m.end(), " " + m.group(0)) if m else text


def rewire(draw: Draw, text: str) -> str:
    """A bottom, top or layer name made to name something else (missing, cyclic, duplicate,
    shaped like an automatic split blob)."""
    found = list(_QUOTED.finditer(text))
    m = _pick(draw, found)
    if m is None:
        return text
    others = sorted({x.group(3) for x in found}) or ["x"]
    new = draw(st.one_of(st.sampled_from(others), st.sampled_from(
        ["missing", "", f"{m.group(3)}_{m.group(3)}_0_split_0", "data", "label", "loss"])))
    return _splice(text, m.start(3), m.end(3), new)


def swap_type(draw: Draw, text: str) -> str:
    m = _pick(draw, list(_TYPE.finditer(text)))
    if m is None:
        return text
    new = draw(st.sampled_from([*LAYER_TYPES, "Bogus", "relu", "Python"]))
    return _splice(text, m.start(2), m.end(2), new)


def rank_rule(draw: Draw, text: str) -> str:
    """``include``/``exclude`` rules with ``mpi_rank`` lists, or an ``mpi_param.root``."""
    m = _pick(draw, list(_LAYER_OPEN.finditer(text)))
    if m is None:
        return text
    ranks = draw(st.lists(st.sampled_from(["0", "1", "2", "3", "7", "-1", "4294967295"]),
                          min_size=0, max_size=3))
    body = " ".join(f"mpi_rank: {r}" for r in ranks)
    new = draw(st.sampled_from([f"include {{ {body} }}", f"exclude {{ {body} }}",
                                f"include {{ {body} }} exclude {{ {body} }}",
                                f"mpi_param {{ root: {ranks[0] if ranks else '5'} }}"]))
    return _splice(text, m.end(), m.end(), f" {new} ")


def _value_for(draw: Draw, field: FieldDescriptor) -> str:
    """A value of the field's own type (so the parser lets it through), often an edge."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "{ }"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return draw(st.sampled_from([v.name for v in field.enum_type.values]))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return draw(st.sampled_from(["true", "false"]))
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        return draw(st.sampled_from(['""', '"x"', '"/no/such/file"', '"L3"', '"Adam"']))
    return draw(st.sampled_from(NUMBERS))


def known_field(draw: Draw, text: str) -> str:
    """A field the schema knows, set to a value of its type: a solver field at the top of a
    solver, a layer field inside a layer (a second value of a singular field included)."""
    layers = list(_LAYER_OPEN.finditer(text))
    if layers:
        at, desc = draw(st.sampled_from(layers)).end(), caffe_pb2.LayerParameter.DESCRIPTOR
    else:
        at, desc = 0, caffe_pb2.SolverParameter.DESCRIPTOR
    field = draw(st.sampled_from(sorted(desc.fields, key=lambda f: f.name)))
    return _splice(text, at, at, f" {field.name}: {_value_for(draw, field)}\n")


def delete_line(draw: Draw, text: str) -> str:
    lines = text.split("\n")
    i = draw(st.integers(0, max(len(lines) - 1, 0)))
    return "\n".join(lines[:i] + lines[i + 1:])


# Mutations that keep the file parseable are drawn more often: the syntax ones all end in the
# parser, the others reach preparation, layer setup and the solver.
SYNTAX_MUTATIONS: list[Callable[[Draw, str], str]] = [
    drop_brace, add_brace, wrong_value, change_enum, unknown_field, field_twice]
SEMANTIC_MUTATIONS: list[Callable[[Draw, str], str]] = [
    change_number, rewire, swap_type, rank_rule, delete_line, known_field]
TEXT_MUTATIONS = SYNTAX_MUTATIONS + 3 * SEMANTIC_MUTATIONS


def damage_bytes(draw: Draw, data: bytes) -> bytes:
    """Non-UTF-8 bytes, a truncation, or an empty file."""
    kind = draw(st.sampled_from(["invalid", "truncate", "empty"]))
    if kind == "empty":
        return b""
    at = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:at]
    bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80", b"\x00",
                                b"\xfe\xff"]))
    return data[:at] + bad + data[at:]


@st.composite
def mutated(draw: Draw, seeds: Sequence[tuple[str, str]], max_mutations: int = 2,
            byte_damage: bool = True) -> tuple[str, bytes]:
    """(seed name, mutated file content) from one of ``seeds`` ((name, text) pairs)."""
    name, text = draw(st.sampled_from(seeds))
    ops = draw(st.lists(st.sampled_from(TEXT_MUTATIONS), min_size=1, max_size=max_mutations))
    for op in ops:
        text = op(draw, text)
    data = text.encode()
    if byte_damage and draw(st.integers(0, 9)) == 0:
        data = damage_bytes(draw, data)
    return name, data
