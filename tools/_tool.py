"""What the data tools share: finding the package from an uninstalled checkout, a parser built
from the tool's docstring, and a user error printed as one ``<tool>: error:`` line (exit 1)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import pycaffe_mpi  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycaffe_mpi import errors


def parser(doc: str) -> argparse.ArgumentParser:
    """First paragraph of ``doc`` as the description, the rest as the epilog."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` with INFO logging; a PycaffeError becomes one error line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return body()
    except errors.PycaffeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
