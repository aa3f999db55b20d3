"""The one atomic-write helper: a target is complete or absent, and a failing writer leaves nothing behind."""
import gzip
import json

import pytest

from data_pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_success_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "index.json"
    atomic_write_json(target, {"a": 1}, indent=1)
    assert json.loads(target.read_text()) == {"a": 1} and target.read_text() == json.dumps({"a": 1}, indent=1)
    before = target.stat().st_ino
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_ino != before  # a new file renamed over the old one
    assert listing(target.parent) == ["index.json"]


def test_a_failing_writer_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "data.gz"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp, gzip.open(tmp, "wb") as f:
            f.write(b"half of it")
            raise RuntimeError("disk on fire")
    assert listing(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"not json": object()})
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["data.gz"]  # the old file survives, untouched


def test_a_streaming_writer_sees_a_fresh_path_beside_the_target(tmp_path):
    target = tmp_path / "data.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists() and not target.exists()
        with gzip.open(tmp, "wb") as f:
            f.write(b"payload")
    assert gzip.decompress(target.read_bytes()) == b"payload" and listing(tmp_path) == ["data.gz"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "model.pt").write_text("v1")
        (tmp / "config.yaml").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "model.pt").write_text("v2")
            raise RuntimeError("killed half way")
    assert listing(target) == ["config.yaml", "model.pt"] and (target / "model.pt").read_text() == "v1"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "model.pt").write_text("v3")
    assert listing(target) == ["model.pt"] and (target / "model.pt").read_text() == "v3"  # no file of v1 is left
    assert listing(tmp_path) == ["export"]
