"""``data.streaming``: the rows stay in a memory-mapped Arrow table and become examples when read.

A parquet file (or a directory of them) is converted once, batch by batch, into ``datasets``' Arrow
cache under ``$FEDLLM_CACHE/arrow`` (rebuilt when a file changes); a saved ``datasets`` directory is
already Arrow. Either is memory-mapped, so reading row i reads only its pages from disk; the pages
read are handed back every few rows (:meth:`ArrowRows.release`), so that RSS stays flat too.
:class:`LazyExamples` is a sequence of row ids whose item is tokenized by
:func:`fedllm.data.text.tokenize` each time it is read: a client's loader holds one batch, never its
share of the data. Rows are read as the in-memory path reads them (parquet: pyarrow's
``to_pylist``; a ``datasets`` directory: its own rows), so the examples are the same, token for token.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedllm.config import DataConfig, RecipeError
from fedllm.data.text import (
    Example,
    StreamedRowError,
    one_split,
    parquet_error,
    parquet_files,
    row_place,
    tokenize,
    topic_label,
)
from fedllm.errors import open_regular

if TYPE_CHECKING:
    import pyarrow as pa


def arrow_cache() -> Path:
    """Where parquet sources are converted to Arrow: fedllm's cache, not the hub's."""
    from fedllm.models.llm import cache_root  # noqa: PLC0415

    return cache_root() / "arrow"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """``datasets``' "Generating train split" bars off while converting (restored after)."""
    import datasets as bars  # noqa: PLC0415

    was_on = not bars.are_progress_bars_disabled()
    bars.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            bars.enable_progress_bars()


RELEASE_EVERY = 128  # rows read between two hand-backs of the mapped pages (see ArrowRows.row)


def _map(filename: str) -> tuple[mmap.mmap, pa.Table]:
    """One Arrow stream file of ``datasets``, memory-mapped by us (so that :meth:`ArrowRows.release`
    can hand its pages back): the map and the zero-copy table over it."""
    import pyarrow as pa  # noqa: PLC0415

    with open_regular(filename) as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mapped, pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mapped))).read_all()


def _same_dataset(opened: Any, tables: list[tuple[str, pa.Table]]) -> Any:
    """``opened`` (a saved ``datasets`` directory) over our own maps: the same features and format,
    so ``dataset[i]`` is the row its iteration yields."""
    import datasets  # noqa: PLC0415
    from datasets.table import MemoryMappedTable, concat_tables  # noqa: PLC0415

    table = concat_tables([MemoryMappedTable(t, name) for name, t in tables])
    fmt = opened.format
    return datasets.Dataset(table, info=opened.info.copy(), split=opened.split).with_format(
        fmt["type"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"])


class ArrowRows:
    """The rows of ``data.path``, memory-mapped: ``row(i)``, ``where(i)``, one column's ``labels``."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa  # noqa: PLC0415

        self.path, self.files, self.reads = path, parquet_files(path), 0
        opened, counts = self._open()
        if len(opened) == 0:
            raise RecipeError(str(path), "contains no rows")
        self.starts = np.cumsum([0, *counts]).tolist()  # first row of each parquet file
        self.column_names: list[str] = list(opened.column_names)
        names = [f["filename"] for f in opened.cache_files]
        self.maps, tables = zip(*(_map(name) for name in names))
        self.table = pa.concat_tables(tables)
        self.dataset = None if self.files else _same_dataset(opened, list(zip(names, tables)))

    def _open(self) -> tuple[Any, list[int]]:
        """``datasets``' memory-mapped Dataset of the source (a parquet source converted once into the
        cache) and the rows of each parquet file."""
        import datasets  # noqa: PLC0415
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        if not self.files:
            try:
                return one_split(datasets.load_from_disk(str(self.path), keep_in_memory=False)), []
            except Exception as exc:  # datasets' errors have no common base
                raise RecipeError(str(self.path), f"could not be read as a datasets directory "
                                  f"({type(exc).__name__}: {exc})") from None
        with _no_progress_bars():
            try:
                counts = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
                if not sum(counts):  # datasets cannot convert a file of no rows
                    return datasets.Dataset.from_dict({}), counts
                ds = datasets.Dataset.from_parquet([str(f) for f in self.files], keep_in_memory=False,
                                                   cache_dir=str(arrow_cache()))
            except Exception as exc:  # pyarrow's errors also subclass TypeError, KeyError, NotImplementedError...
                raise parquet_error(self.path, exc) from None
        pa.default_memory_pool().release_unused()  # a first open's conversion buffers go back to the OS
        return ds, counts

    def __len__(self) -> int:
        return self.table.num_rows

    def release(self) -> None:
        """Hand the mapped pages read so far back (``MADV_DONTNEED`` on the read-only maps): they leave
        this process's RSS, and a later read maps them again from the kernel's page cache or the disk."""
        if hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
            for mapped in self.maps:
                mapped.madvise(mmap.MADV_DONTNEED)

    def row(self, i: int) -> dict[str, Any]:
        """Row i as the in-memory path has it. Only its pages are read, but a page read stays in
        RSS until :meth:`release`, which every :data:`RELEASE_EVERY` reads calls."""
        self.reads += 1
        if self.reads % RELEASE_EVERY == 0:
            self.release()
        return self.table.slice(i, 1).to_pylist()[0] if self.files else dict(self.dataset[i])

    def where(self, i: int) -> str:
        """Row i for an error message: "data.parquet row 17" (1-based, per file)."""
        if not self.files:
            return f"{self.path} row {i + 1}"
        k = bisect.bisect_right(self.starts, i) - 1
        return f"{self.path} {row_place(self.path, self.files[k], i - self.starts[k] + 1)}"

    def labels(self, column: str, rows: np.ndarray) -> list:
        """``column`` of ``rows`` only (the other columns are not read), each checked as a label."""
        if self.files:
            values = self.table.column(column).take(rows).to_pylist()
        else:
            values = self.dataset.select_columns([column])[rows.tolist()][column]
        self.release()
        return [topic_label(v, column, self.where(int(r))) for v, r in zip(values, rows)]


@dataclass(frozen=True)
class RowTokenizer:
    """Row id -> :class:`Example`, read and tokenized on each call; a bad row raises
    :class:`StreamedRowError` naming it."""

    rows: ArrowRows
    tokenizer: Any
    cfg: DataConfig
    column: str | None

    def __call__(self, i: int) -> Example:
        where = self.rows.where(i)
        try:
            return tokenize(self.rows.row(i), i, self.tokenizer, self.cfg, where, self.column)
        except RecipeError as exc:
            raise StreamedRowError.of(exc) from None


class LazyExamples(Sequence):
    """Examples of the source rows ``rows`` (item j is row ``rows[j]``), tokenized when read.

    Only the row ids are held; a slice or :meth:`take` is another view of the same source.
    """

    def __init__(self, read: Callable[[int], Example], rows: np.ndarray) -> None:
        self.read, self.rows = read, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return LazyExamples(self.read, self.rows[j])
        return self.read(int(self.rows[j]))

    def __iter__(self) -> Iterator[Example]:
        return (self.read(int(r)) for r in self.rows)

    def take(self, positions: Sequence[int]) -> LazyExamples:
        """The examples at ``positions`` of this sequence, still lazy."""
        return LazyExamples(self.read, self.rows[np.asarray(positions, dtype=np.int64)])

    def row_ids(self, positions: Sequence[int]) -> list[int]:
        """The source rows at ``positions`` (what :class:`Example.index` would say), without tokenizing."""
        return self.rows[np.asarray(positions, dtype=np.int64)].tolist()
