#!/usr/bin/env python
"""Regenerate pycaffe_mpi/proto/caffe_pb2.py(.pyi) from proto/caffe.proto.

Runs the pinned generator (grpcio-tools 1.71.x, i.e. protoc 29 / protobuf 5.29 gencode)
in-process, exactly as::

    python -m grpc_tools.protoc -Iproto --python_out=pycaffe_mpi/proto \\
        --pyi_out=pycaffe_mpi/proto proto/caffe.proto

Usage::

    python tools/gen_proto.py            # rewrite the committed generated files
    python tools/gen_proto.py --check    # exit 1 if they differ from a fresh generation
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "caffe.proto"
OUT_DIR = REPO_ROOT / "pycaffe_mpi" / "proto"
GENERATED = ("caffe_pb2.py", "caffe_pb2.pyi")
PINNED_SERIES = "1.71."


def generator_version() -> str:
    """Return the installed grpcio-tools version (raises ImportError if absent)."""
    from grpc_tools import grpc_version

    return str(grpc_version.VERSION)


def generate(out_dir: Path) -> None:
    """Run protoc on proto/caffe.proto, writing the generated files into ``out_dir``."""
    from grpc_tools import protoc

    # NOTE: the descriptor records the .proto path relative to its -I root ("caffe.proto"),
    # so the output does not depend on the working directory or on out_dir.
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")


def diff_generated(fresh_dir: Path, committed_dir: Path = OUT_DIR) -> list[str]:
    """Return unified-diff lines between freshly generated and committed files (empty = same)."""
    lines: list[str] = []
    for name in GENERATED:
        fresh = (fresh_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)
        committed_path = committed_dir / name
        committed = (
            committed_path.read_text(encoding="utf-8").splitlines(keepends=True)
            if committed_path.exists()
            else []
        )
        lines.extend(
            difflib.unified_diff(committed, fresh, f"committed/{name}", f"regenerated/{name}", n=1)
        )
    return lines


def check() -> int:
    """Regenerate into a temporary directory; return 1 (and print the diff) on any difference."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        diff = diff_generated(Path(tmp))
    if diff:
        sys.stdout.writelines(line[:200] + ("\n" if len(line) > 200 else "") for line in diff)
        print(
            "generated protobuf code is stale; run `python tools/gen_proto.py`",
            file=sys.stderr,
        )
        return 1
    print("generated protobuf code is up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail (exit 1) if the committed files differ",
    )
    args = parser.parse_args(argv)
    version = generator_version()
    if not version.startswith(PINNED_SERIES):
        print(
            f"warning: grpcio-tools {version} is not the pinned {PINNED_SERIES}x; "
            "output may differ from the committed files",
            file=sys.stderr,
        )
    if args.check:
        return check()
    generate(OUT_DIR)
    print(f"wrote {', '.join(str(OUT_DIR / n) for n in GENERATED)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
