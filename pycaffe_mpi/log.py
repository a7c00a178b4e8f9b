"""Caffe-style (glog) logging, so existing Caffe log parsers read our logs.

Lines look like ``I1128 02:28:11.123456 12345 solver.py:218] Iteration 100, loss = 0.5``.
Library code logs through ``logging.getLogger("pycaffe_mpi")``; the CLI calls :func:`setup`.
Under MPI, :func:`setup` is given the rank and size: every line is tagged ``[rank r/n]``; rank 0
logs everything at INFO, other ranks their warnings and errors plus the lines that report what
their own net computes (records logged with ``extra={"all_ranks": True}``: net outputs, losses).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys

LOGGER = logging.getLogger("pycaffe_mpi")
_LEVEL_CHAR = {"DEBUG": "I", "INFO": "I", "WARNING": "W", "ERROR": "E", "CRITICAL": "F"}


class GlogFormatter(logging.Formatter):
    """``Lmmdd hh:mm:ss.uuuuuu pid file:line] [rank r/n] message``."""

    def __init__(self, rank_tag: str = "") -> None:
        super().__init__()
        self.rank_tag = rank_tag

    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created)
        head = (f"{_LEVEL_CHAR.get(record.levelname, 'I')}{t:%m%d %H:%M:%S.%f} {os.getpid()} "
                f"{os.path.basename(record.pathname)}:{record.lineno}] ")
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return head + self.rank_tag + msg


def _own_lines(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or bool(getattr(record, "all_ranks", False))


def setup(rank: int = 0, size: int = 1, level: int | None = None,
          stream: object = None) -> logging.Logger:
    """Send the package's log to stderr (as glog does) in Caffe's line format."""
    tag = f"[rank {rank}/{size}] " if size > 1 else ""
    if level is None:
        level = logging.INFO
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter(tag))
    if rank != 0:
        handler.addFilter(_own_lines)
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    return LOGGER
