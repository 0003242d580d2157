"""The files models are loaded from: a structural check of safetensors files, and fedllm's own
cache directories, which verify themselves and are rebuilt when damaged.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
(each tensor's ``dtype``, ``shape`` and ``data_offsets`` into the data section) and the data
section, which the offsets must cover exactly (Hugging Face's safetensors format). Checking that
costs one header read, so a truncated or garbled file is named before a loader fails on it.

A cache directory (the dequantized SmolLM2, its tokenizer, the tiny llama) is filled in a temp
directory, given a manifest (``.fedllm-cache.json``: size, mtime and sha256 of every file) and
renamed into place. Each use checks the manifest: a missing or resized file, or a changed one whose
sha256 differs, makes the directory be deleted and rebuilt with a warning. The user never owns
these files, so a damaged one is never blamed on a recipe field. Check and rebuild hold a lock
(``.<name>.lock`` beside the directory, removed again when done) so that concurrent processes rebuild it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedllm.errors import open_regular
from fedllm.lockfile import LockFile

log = logging.getLogger(__name__)

MANIFEST = ".fedllm-cache.json"
MANIFEST_FORMAT = 1
MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when its header and size agree)."""
    try:
        with open_regular(path) as fh:  # a FIFO would block the read forever
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                return f"not a safetensors file: {size} bytes, too short for its 8-byte header length"
            n = int.from_bytes(head, "little")
            if n < 2 or n > min(MAX_HEADER, size - 8):
                return f"not a safetensors file: its {size:,} bytes do not hold the header its first 8 bytes announce"
            raw = fh.read(n)
    except OSError as exc:
        return f"could not be read ({exc.strerror or exc})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = math.prod(info["shape"]) * DTYPE_BYTES.get(info["dtype"], 0)
            ok = isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop and \
                (stop - begin == count or info["dtype"] not in DTYPE_BYTES)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            return f"not a safetensors file: the header's entry for tensor {name!r} is malformed"
        end = max(end, stop)
    if 8 + n + end != size:
        return (f"truncated or padded: its header describes {8 + n + end:,} bytes, the file has {size:,} "
                "(an interrupted download or copy?)")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size, mtime and sha256 of every file in ``directory`` (not its subfolders)."""
    files = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            st = f.stat()
            files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(f)}
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1)
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def _manifest_problem(directory: Path) -> str | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"] if manifest["format"] == MANIFEST_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict) or not files:
        return f"its manifest {MANIFEST} is unreadable"
    touched = False  # a file with another mtime but the recorded sha256 (e.g. a copy without -p)
    for name, want in files.items():
        f = directory / name
        try:
            st = f.stat()
            if st.st_size != want["size"]:
                return f"{name} has {st.st_size:,} bytes, expected {want['size']:,} (truncated or replaced)"
            if st.st_mtime_ns != want["mtime_ns"]:
                if _sha256(f) != want["sha256"]:
                    return f"{name} was changed (its sha256 differs from the one recorded)"
                touched = True
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, KeyError, TypeError) as exc:
            return f"{name} could not be checked ({exc})"
    if touched:  # record the new mtimes, so later checks need not hash again
        _try_write_manifest(directory)
    return None


def _try_write_manifest(directory: Path) -> None:
    """:func:`write_manifest` where the cache is writable (a read-only shared cache is still used)."""
    try:
        write_manifest(directory)
    except OSError as exc:
        log.debug("could not write %s in %s: %s", MANIFEST, directory, exc)


def cache_problem(directory: Path, required: tuple[str, ...]) -> str | None:
    """Why the cache ``directory`` cannot be used as it is (None when it verifies).

    A directory from a fedllm without manifests is checked by structure (required files present,
    JSON files parse, safetensors files complete) and, if sound, given its manifest.
    """
    if (directory / MANIFEST).exists():
        return _manifest_problem(directory)
    for name in required:
        if not (directory / name).is_file():
            return f"{name} is missing"
    for f in sorted(directory.iterdir()):
        if f.suffix == ".json":
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                return f"{f.name} is not valid JSON"
        elif f.suffix == ".safetensors" and (why := safetensors_problem(f)) is not None:
            return f"{f.name}: {why}"
    _try_write_manifest(directory)  # adopted: later uses check the manifest
    return None


class _Lock:
    """An exclusive ``flock`` on ``.<name>.lock`` beside a cache directory, while checking or filling it."""

    def __init__(self, target: Path) -> None:
        self.lock = LockFile(target.parent / f".{target.name}.lock")  # removed again on release
        try:
            self.lock.acquire(wait=True)
        except OSError:  # a read-only shared cache: nothing will be rebuilt there anyway
            pass

    def __enter__(self) -> _Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()  # removes the lock file, then drops the flock


def cached_dir(target: Path, fill: Callable[[Path], None], required: tuple[str, ...]) -> Path:
    """``target``, verified (:func:`cache_problem`); built by ``fill`` into a temp dir and renamed
    into place when missing, and deleted and rebuilt with a warning when damaged."""
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(target):
        if target.is_dir():
            why = cache_problem(target, required)
            if why is None:
                return target
            log.warning("fedllm's cache %s is damaged (%s); deleting and rebuilding it", target, why)
            shutil.rmtree(target)
        elif target.exists():  # a stray file where the directory belongs
            log.warning("fedllm's cache %s is not a directory; replacing it", target)
            target.unlink()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
        try:
            fill(tmp)
            write_manifest(tmp)
            try:
                os.rename(tmp, target)
            except OSError:  # filled meanwhile by a process that does not take the lock
                if not target.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
