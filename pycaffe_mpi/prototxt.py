"""Reading net and solver prototxt files with errors that point at the mistake.

A text-format mistake becomes a :class:`~pycaffe_mpi.errors.PrototxtError` naming the file, line
and column, the enclosing layer when there is one, and the nearest valid field name.
"""

from __future__ import annotations

import os
import re
from typing import Any

from google.protobuf import descriptor_pool, text_format

from pycaffe_mpi import errors
from pycaffe_mpi.proto import caffe_pb2

_QUOTED = r"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'"
_TOKEN = re.compile(r"#[^\n]*|" + _QUOTED + r"|[{}<>]|[A-Za-z_][\w.]*")
_COMMENT_OR_QUOTED = re.compile((r"#[^\n]*|" + _QUOTED).encode())  # over a line's bytes
_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_NO_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named (\w+)')


def layer_lines(text: str) -> list[int]:
    """1-based line numbers of each top-level ``layer``/``layers`` block, in order."""
    lines, depth = [], 0
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok in ("{", "<"):
            depth += 1
        elif tok in ("}", ">"):
            depth -= 1
        elif depth == 0 and tok in ("layer", "layers"):
            lines.append(text.count("\n", 0, m.start()) + 1)
    return lines


def _hint(msg: str) -> str:
    m = _NO_FIELD.search(msg)
    if m:
        try:
            desc = descriptor_pool.Default().FindMessageTypeByName(m.group(1))
            return errors.did_you_mean(m.group(2), [f.name for f in desc.fields])
        except KeyError:
            return ""
    m = _NO_ENUM.search(msg)
    if m:
        try:
            desc = descriptor_pool.Default().FindEnumTypeByName(m.group(1))
            return errors.did_you_mean(m.group(2), [v.name for v in desc.values])
        except KeyError:
            return ""
    return ""


def parse_text(text: str, message: Any, path: str = "<string>") -> Any:
    """Merge prototxt ``text`` into ``message``; a mistake raises a located PrototxtError."""
    try:
        # Parse, not Merge: like Caffe's parser it refuses a singular field written twice
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line = getattr(e, "GetLine", lambda: None)()
        col = getattr(e, "GetColumn", lambda: None)()
        msg = str(e)
        # drop protobuf's own "line:col : " prefix; we print ours
        msg = re.sub(r"^\d+:\d+\s*:\s*", "", msg)
        where = f"{path}:{line}:{col}" if line else path
        layer = ""
        if line:
            starts = layer_lines(text)
            idx = sum(1 for s in starts if s <= line) - 1
            if idx >= 0:
                name = _layer_name_near(text, starts[idx])
                layer = f' (in layer #{idx}{f" {name!r}" if name else ""})'
        raise errors.PrototxtError(f"{where}{layer}: {msg}{_hint(msg)}") from None
    return message


def _layer_name_near(text: str, line: int) -> str:
    block = "\n".join(text.splitlines()[line - 1: line + 40])
    m = re.search(r"\bname\s*:\s*[\"']([^\"']*)[\"']", block)
    return m.group(1) if m else ""


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise errors.PrototxtError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # a NUL byte in the name, e.g. in a path a solver file gives
        raise errors.PrototxtError(f"cannot read {path!r}: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = _decode_with_comments_lenient(data, path)
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it


def _decode_with_comments_lenient(data: bytes, path: str) -> str:
    """``data`` as UTF-8, where bytes that are not UTF-8 may stand in comments (Caffe's parser
    skips a comment's bytes unread: old files carry Latin-1 names there); they become U+FFFD.
    Elsewhere (a name, a path) such a byte is a located PrototxtError."""
    out, pos = [], 0
    for raw in data.splitlines(keepends=True):
        hash_at = _comment_start(raw)
        code, comment = raw[:hash_at], raw[hash_at:]
        try:
            out.append(code.decode("utf-8"))
        except UnicodeDecodeError as e:
            at = pos + e.start
            line = data.count(b"\n", 0, at) + 1
            col = at - (data.rfind(b"\n", 0, at) + 1) + 1
            raise errors.PrototxtError(
                f"{path}:{line}:{col}: byte 0x{data[at]:02x} is not UTF-8 text ({e.reason}); "
                "a prototxt is UTF-8 outside its comments (a binary .caffemodel is not a "
                "prototxt)") from None
        out.append(comment.decode("utf-8", errors="replace"))
        pos += len(raw)
    return "".join(out)


def _comment_start(line: bytes) -> int:
    """Index of the ``#`` that starts ``line``'s comment (outside quotes), or its length."""
    for m in _COMMENT_OR_QUOTED.finditer(line):
        if m.group(0).startswith(b"#"):
            return m.start()
    return len(line)


def read_net(path: str) -> tuple[Any, list[str]]:
    """Parse a net prototxt and upgrade old formats (:mod:`pycaffe_mpi.upgrade`), as Caffe's
    ``ReadNetParamsFromTextFileOrDie``; returns (NetParameter, per-layer "file:line"
    locations)."""
    from pycaffe_mpi import upgrade

    text = read_text(path)
    param = parse_text(text, caffe_pb2.NetParameter(), path)
    _, locations = upgrade.upgrade_net_as_needed(
        path, param, [f"{path}:{n}" for n in layer_lines(text)])
    return param, locations


def read_solver(path: str) -> Any:
    """Parse a solver prototxt into a SolverParameter (not upgraded: see
    :func:`pycaffe_mpi.solvers.read_solver_param`)."""
    return parse_text(read_text(path), caffe_pb2.SolverParameter(), path)


def is_binary_net(path: str) -> bool:
    """True for a binary NetParameter (.caffemodel), judged by content like Caffe does."""
    ext = os.path.splitext(path)[1].lower()
    return ext in (".caffemodel", ".binaryproto", ".pb")


def located(exc: errors.PycaffeError, path: str | None,
            message_type: Any = caffe_pb2.SolverParameter) -> errors.PycaffeError:
    """``exc`` with ``path`` in front (and the line of the first ``message_type`` field its
    message names, or of a quoted value it quotes, where the file has one), unless it names the
    file already or ``path`` is None. For checks made on a parsed message, which no longer
    knows its lines."""
    msg = str(exc)
    if not path or path in msg:
        return exc
    try:
        text = read_text(path)
    except errors.PycaffeError:
        text = ""
    fields = {f.name for f in message_type.DESCRIPTOR.fields}
    where = path
    # the line of a field the message names, else of a quoted value it quotes (a file name)
    spots = [re.search(rf"^\s*{w}\s*[:{{]", text, re.M)
             for w in re.findall(r"\b[a-z][a-z0-9_]*\b", msg) if w in fields]
    spots += [m for m in re.finditer(r'^\s*\w+\s*:\s*"([^"\n]+)"', text, re.M)
              if m.group(1) in msg]
    spot = next((m for m in spots if m), None)
    if spot:
        where = f"{path}:{text.count(chr(10), 0, spot.start()) + 1}"
    try:
        return type(exc)(f"{where}: {msg}")
    except TypeError:  # an error class with another signature: leave it as it is
        return exc
