"""The shard tar writer: the same bytes as a plain tarfile stream, and the sha256 and size of what it wrote."""
from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest

from data_pipeline.episode_sample import npy_parts
from data_pipeline.shard_unit import TarStream


def tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("sizes", [[], [0], [1, 511, 512, 513], [10_240 - 3 * 512, 7 * 84 * 84 + 128, (1 << 22) + 7]])
def test_archive_is_byte_identical_to_a_tarfile_stream(sizes, tmp_path):
    rng = np.random.default_rng(len(sizes))
    members = [(f"e{i:09d}.obs.npy.zst", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
               for i, n in enumerate(sizes)]
    tar = TarStream(tmp_path / "a.tar")
    for name, data in members:
        tar.add(name, data)
    tar.finish()
    tar.sync_close()
    written = (tmp_path / "a.tar").read_bytes()
    assert written == tarfile_bytes(members)
    assert tar.bytes == len(written) and tar.sha.hexdigest() == hashlib.sha256(written).hexdigest()


def test_npy_parts_equal_np_save():
    for array in (np.zeros((0, 84, 84), np.uint8), np.arange(12, dtype=">f4").reshape(3, 4)[1:],
                  np.array([True, False]), np.arange(10, dtype=np.int64)[2:7], np.ones((3, 4), np.float32)[:, 1]):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        header, data = npy_parts(array)
        assert header + bytes(data) == buf.getvalue()
