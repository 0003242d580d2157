"""Lock files that do not outlive their lock: an exclusive ``flock`` on ``.<name>.lock`` beside what
it guards, and the file removed when the lock is let go (at the latest when the process exits,
also after an error; only a killed process, SIGKILL, leaves one, and the next lock reuses it).

Removing a lock file while others may open it is safe with one rule: after ``flock`` succeeds, the
holder checks that the path still names the file it locked (same device and inode). A process that
opened the old file just before its holder removed it then holds a lock on a deleted file, sees the
mismatch, and locks the new file instead, so two processes never both believe they hold the lock.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

_HELD: set[LockFile] = set()


class LockFile:
    """One lock file; :meth:`acquire` it (waiting or not), :meth:`release` it (and its file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None
        self.holder = ""  # what the holder wrote into the file, when acquire(wait=False) failed
        self.pid = os.getpid()

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock (``wait=False``: return False at once if another process holds it). An
        OSError opening the file (a read-only folder) propagates."""
        import fcntl  # noqa: PLC0415  (POSIX only, like the rest of the deployment story)

        while True:
            handle = self.path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError:
                handle.seek(0)
                self.holder = handle.read().strip()
                handle.close()
                return False
            if _names(self.path, handle):
                self.file, self.pid = handle, os.getpid()
                _HELD.add(self)
                return True
            handle.close()  # its holder removed it after we opened it: lock the file there now

    def release(self) -> None:
        """Remove the file (while still holding the lock) and let go of the lock."""
        if self.file is None or self.file.closed:
            return
        try:
            if os.getpid() == self.pid and _names(self.path, self.file):  # never a forked child's copy
                self.path.unlink()
        except OSError:
            pass  # already gone, or a read-only folder: the lock still ends below
        finally:
            self.file.close()  # closing the descriptor drops the flock
            _HELD.discard(self)


def _names(path: Path, handle) -> bool:
    """Whether ``path`` is still the file ``handle`` has open."""
    try:
        on_disk, opened = os.stat(path), os.fstat(handle.fileno())
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


@atexit.register
def _release_all() -> None:
    """At exit, also after an exception ended the program: no lock file stays behind."""
    for lock in list(_HELD):
        lock.release()
