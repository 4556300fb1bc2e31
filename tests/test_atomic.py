"""The one atomic-write mechanism: all or nothing, no temp files left behind."""

import json

import pytest

from vaeflow.atomic import atomic_write, write_json_atomic, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_json_and_binary_round_trip_into_new_folders(tmp_path):
    write_json_atomic(tmp_path / "x" / "d.json", {"a": [1, 2], "p": tmp_path})
    assert json.loads((tmp_path / "x" / "d.json").read_text()) == {"a": [1, 2], "p": str(tmp_path)}
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "c", "a"):
            pass
