"""Errors that end a run because its numbers cannot be trusted (no torch import: the CLI catches them),
and the one way the CLI opens a file it reads: only a regular file (never a FIFO that blocks)."""

from __future__ import annotations

import errno
import os
import stat
from typing import IO, Any


class IntegrityError(RuntimeError):
    """The run cannot be trusted (e.g. training changed nothing): stop it, never skip a client for it.

    Engines leave a failing client out of a round; an IntegrityError instead ends the run with
    one line naming the cause (the CLI's exit code 3), since every later number would be wrong.
    """


class NotRegularFile(OSError):
    """A path the CLI was asked to read is a FIFO, a device, a socket or a folder, not a file.

    An ``OSError``, so that every reader which already turns "could not be read" into one line
    (``exc.strerror``) says this too. Raised before a byte is read: opening a FIFO for reading
    blocks until a writer comes, and a device can be endless.
    """


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def open_regular(path: str | os.PathLike, mode: str = "rb", encoding: str | None = None) -> IO[Any]:
    """``path`` opened for reading, only if it is a regular file (else :class:`NotRegularFile`).

    The check is on the opened descriptor (``fstat``), not on the name, so the file cannot be
    swapped for a FIFO between the check and the read; the open itself is non-blocking (a FIFO
    with no writer opens at once instead of hanging) and made blocking again for a regular file.
    Every file a CLI verb reads goes through here or :func:`read_regular`.
    """
    if mode not in ("r", "rb"):
        raise ValueError(f"open_regular reads only ('r' or 'rb'), got mode {mode!r}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
            raise NotRegularFile(errno.EINVAL, f"{kind}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, encoding=encoding if mode == "r" else None)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, only if it is a regular file (see :func:`open_regular`)."""
    with open_regular(path) as fh:
        return fh.read()


def read_regular_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of ``path``, only if it is a regular file (see :func:`open_regular`)."""
    return read_regular(path).decode(encoding)
