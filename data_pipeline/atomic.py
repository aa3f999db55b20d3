"""Atomic writes: a file or directory appears complete under its name, or not at all.

Every writer of the project goes through here: a temporary name beside the target (same folder, so the rename
stays on one file system), flushed to disk, then renamed over the target. A writer that fails leaves neither a
target nor a temporary behind (a hard kill can leave a ``.<name>.<random>.tmp``, never a half-written target).

``atomic_path`` serves writers that stream into a path themselves (h5py, gzip, tar, matplotlib, a checkpoint
directory); ``atomic_write_bytes`` / ``atomic_write_text`` / ``atomic_write_json`` the rest. This module sits at
the head of the data flow (``data_pipeline`` imports nothing of ``mambadm``), so every box can use it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """``.<name>.<random>.tmp`` beside ``path``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Renames the finished directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed
    after, so at every moment one complete directory (old or new) exists under one of the two names."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` for the caller to write; on success it is synced and renamed over
    ``path``, on any exception removed. With ``directory`` the temporary is an empty directory, created here
    (fill it, then it replaces ``path`` through ``replace_dir``); otherwise nothing exists at it yet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            replace_dir(tmp, path)
        else:
            _fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **dump_args: Any) -> None:
    """``json.dumps(obj, indent=indent, **dump_args)`` written atomically (no trailing newline, as ``json.dump``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dump_args))
