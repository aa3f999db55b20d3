"""The hand-written USTAR bytes: tarfile and webdataset read back every member's name, contents and attributes."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from data_pipeline.tar_writer import NAME_BYTES, archive_end, member_header, member_padding


def archive(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray()
    for name, data in members:
        out += member_header(name, len(data)) + data + member_padding(len(data))
    return bytes(out + archive_end(len(out)))


def members_of_sizes(sizes: list[int]) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(len(sizes))
    return [(f"e{i:09d}.obs.npy.zst", rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [[], [0], [1, 511, 512, 513, 10_240]])
def test_tarfile_reads_back_names_contents_and_attributes(sizes):
    members = members_of_sizes(sizes) + [("x" * NAME_BYTES, b"longest name")]
    with tarfile.open(fileobj=io.BytesIO(archive(members))) as tar:
        infos = tar.getmembers()
        assert [(i.name, tar.extractfile(i).read()) for i in infos] == members
    for info in infos:
        assert (info.type, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname) == \
               (tarfile.REGTYPE, 0o444, 0, 0, 0, "bigdata", "bigdata")


def test_archive_ends_on_a_whole_tarfile_record():
    for sizes in ([], [0], [9_000], [10_240 - 1024]):
        assert len(archive(members_of_sizes(sizes))) % (20 * 512) == 0


def test_webdataset_reads_the_samples(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = {"e000000001": {"meta.json": b"{}", "obs.npy.zst": b"\x01" * 600},
               "e000000002": {"meta.json": b"{\"a\": 1}", "obs.npy.zst": b""}}
    members = [(f"{key}.{ext}", data) for key, sample in samples.items() for ext, data in sorted(sample.items())]
    (tmp_path / "s.tar").write_bytes(archive(members))
    read = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False, empty_check=False)}
    assert read == samples


def test_a_name_too_long_for_ustar_is_refused_clearly():
    with pytest.raises(ValueError, match="at most 100"):
        member_header("x" * (NAME_BYTES + 1), 1)
    with pytest.raises(ValueError, match="at most 100"):
        member_header("é" * 51, 1)  # 102 bytes in UTF-8
