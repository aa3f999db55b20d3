"""Read NPY arrays stored inside gzip streams (Dopamine checkpoint files) without loading them whole.

``open_npy_gz`` parses the NPY header from the decompressed stream; ``NpyRowStream`` then hands out rows of a
C-ordered array block by block, reading forward only (a request behind the current row reopens the file). Pickled
(object) arrays are refused before anything is unpickled. isal's C gzip reader is used when importable (several times
faster than zlib), the standard ``gzip`` module otherwise. Every decoding problem becomes a ``DatasetFormatError``
naming the file.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from data_pipeline.errors import DatasetFormatError

try:
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - isal is a dependency, the fallback keeps the reader usable without it
    _gzip = gzip
try:
    from isal.isal_zlib import _GzipReader as _IsalGzipReader  # the C reader igzip.open wraps in a BufferedReader
except ImportError:  # pragma: no cover - an isal without it: igzip.open (or gzip) as before
    _IsalGzipReader = None

DECODE_ERRORS = (OSError, EOFError, zlib.error, ValueError)  # gzip.BadGzipFile is an OSError
READ_BYTES = 1 << 18  # bytes decompressed per call: small enough to stay in the CPU cache (~1.5x faster than 14 MB)


GZIP_READ_BUFFER = 1 << 17  # compressed bytes isal's reader takes from the file per read


class _UnbufferedGzip:
    """isal's C gzip reader straight over the file: ``readinto`` decompresses into the caller's buffer. The
    ``io.BufferedReader`` that ``igzip.open`` puts over it measured 1.2-2x slower for the large reads made here
    (benchmarks/RESULTS.md, "Shards, format version 2"); the gzip CRC and size checks are the same reader's."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        try:
            self.reader = _IsalGzipReader(self.file, GZIP_READ_BUFFER)
        except BaseException:
            self.file.close()
            raise
        self.read, self.readinto = self.reader.read, self.reader.readinto

    def close(self) -> None:
        self.reader.close()
        self.file.close()

    def __enter__(self) -> _UnbufferedGzip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path) -> IO[bytes]:
    try:
        return _UnbufferedGzip(path) if _IsalGzipReader is not None else _gzip.open(path, "rb")
    except DECODE_ERRORS as e:
        raise DatasetFormatError(f"{path}: expected a gzip-compressed NPY file, could not open it ({e})") from e


def _read_header(path: Path, f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"NPY version {version}")
    except DECODE_ERRORS as e:
        raise DatasetFormatError(f"{path}: expected an NPY array inside a complete gzip stream, could not read its "
                                 f"header (truncated, corrupt or not NPY: {e})") from e
    if dtype.hasobject:
        raise DatasetFormatError(f"{path}: expected a plain numeric array, found a pickled (object) array; "
                                 "it is not loaded")
    if fortran and len(shape) > 1:
        raise DatasetFormatError(f"{path}: expected a C-ordered array, found Fortran order")
    return tuple(shape), dtype


def header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the NPY array in a gzip file (decompresses only the header)."""
    path = Path(path)
    with _open(path) as f:
        return _read_header(path, f)


def load_small(path: str | Path) -> np.ndarray:
    """A whole (small) array; truncation, corruption or trailing data raise ``DatasetFormatError``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: expected this checkpoint file, found none")
    with _open(path) as f:
        shape, dtype = _read_header(path, f)
        array = np.empty(shape, dtype)
        _read_exact(path, f, array.reshape(-1).view(np.uint8), "the array data")
        _expect_eof(path, f)
    return array


def _read_exact(path: Path, f: IO[bytes], out: np.ndarray, what: str) -> None:
    """Fill the byte array ``out`` from ``f`` (read straight into it, no intermediate copy)."""
    got = 0
    while got < len(out):
        try:
            more = f.readinto(out[got:got + READ_BYTES])
        except DECODE_ERRORS as e:
            raise DatasetFormatError(f"{path}: truncated or corrupt gzip stream while reading {what} ({e})") from e
        if not more:
            raise DatasetFormatError(f"{path}: truncated: expected {len(out)} bytes of {what}, found {got}")
        got += more


def _expect_eof(path: Path, f: IO[bytes]) -> None:
    try:
        extra = f.read(1)
    except DECODE_ERRORS as e:
        raise DatasetFormatError(f"{path}: truncated or corrupt gzip stream at its end ({e})") from e
    if extra:
        raise DatasetFormatError(f"{path}: expected the stream to end after the array, found more data")


class NpyRowStream:
    """Forward reader of rows ``[start, stop)`` of a (rows, ...) array in an NPY-in-gzip file."""

    def __init__(self, path: str | Path, block_rows: int = 2048):
        self.path, self.block_rows = Path(path), max(1, int(block_rows))
        self.f: IO[bytes] | None = None
        self.opens = 0  # times the file was (re)opened: the wrap of a circular buffer costs one more
        self.blocks = 0  # blocks read (including skipped ones)
        self.verified = False  # the whole stream was read once and ended where the array does
        self._open()
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._scratch = np.empty((self.block_rows, *self.row_shape), self.dtype)

    def _open(self) -> None:
        if self.f is not None:
            self.f.close()
        self.f = _open(self.path)
        self.shape, self.dtype = _read_header(self.path, self.f)
        if len(self.shape) < 1:
            raise DatasetFormatError(f"{self.path}: expected an array of rows, found a 0-d array")
        self.rows, self.pos = self.shape[0], 0
        self.opens += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def __enter__(self) -> NpyRowStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self, out: np.ndarray) -> None:
        """Read ``len(out)`` rows at the current position into ``out``, block by block."""
        if len(out) == 0:
            return
        view = out.reshape(len(out), -1).view(np.uint8).reshape(-1)
        step = self.block_rows * self.row_bytes
        for lo in range(0, len(view), step):
            self._read_into(view[lo:lo + step], lo)
            self.blocks += 1
        self.pos += len(out)
        if self.pos == self.rows and not self.verified:
            _expect_eof(self.path, self.f)  # the gzip CRC is checked at the end of the stream
            self.verified = True

    def _read_into(self, chunk: np.ndarray, offset: int) -> None:
        """Fill ``chunk`` (bytes ``offset...`` of the rows being read) in pieces of at most ``READ_BYTES``."""
        got = 0
        while got < len(chunk):  # readinto may also return fewer bytes than asked before the end of the stream
            try:
                more = self.f.readinto(chunk[got:got + READ_BYTES])
            except DECODE_ERRORS as e:
                raise DatasetFormatError(f"{self.path}: truncated or corrupt gzip stream near row "
                                         f"{self.pos + (offset + got) // self.row_bytes} ({e})") from e
            if not more:
                raise DatasetFormatError(f"{self.path}: truncated: expected {self.rows} rows of "
                                         f"{self.row_bytes} bytes, the stream ended at row "
                                         f"{self.pos + (offset + got) // self.row_bytes}")
            got += more

    def skip_to(self, row: int) -> None:
        """Move to ``row`` (reopening the file when it lies behind the current position)."""
        if row < self.pos:
            self._open()
        while self.pos < row:
            self._fill(self._scratch[:min(self.block_rows, row - self.pos)])

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)``, into ``out`` when given."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside [0, {self.rows})")
        if out is None:
            out = np.empty((stop - start, *self.row_shape), self.dtype)
        self.skip_to(start)
        self._fill(out)
        return out

    def finish(self) -> None:
        """Make sure the whole stream was read once and ended where the array does (reads what is left)."""
        if not self.verified:
            self.skip_to(self.rows)
