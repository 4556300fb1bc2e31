"""The one atomic-write mechanism: all or nothing; temp files of killed writes removed."""

import json
import os
import tempfile

import pytest

from vaeflow import atomic
from vaeflow.atomic import (
    atomic_write,
    is_atomic_temp,
    remove_stale_temps,
    write_json_atomic,
    write_text_atomic,
)


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


# ----------------------------------------------------- temp files of killed writes


@pytest.mark.parametrize(
    "name",
    [
        ".last.pt.ab12cd_4.tmp",
        ".summary.json.zzzzzzzz.tmp",
        ".a.b.c.00000000.tmp",
        "..x.________.tmp",
    ],
)
def test_matcher_accepts_the_writer_names(name):
    assert is_atomic_temp(name)


@pytest.mark.parametrize(
    "name",
    [
        ".notes.tmp",  # a user's hidden temp file
        "x.tmp",
        ".last.pt.tmp",
        "last.pt.ab12cd34.tmp",  # no leading dot
        ".last.pt.AB12CD34.tmp",  # mkstemp never uses upper case
        ".last.pt.ab12cd3.tmp",  # 7 random characters
        ".last.pt.ab12cd345.tmp",  # 9
        ".last.pt.ab12-d34.tmp",
        "..ab12cd34.tmp",  # no final name
        ".last.pt.ab12cd34.tmp.bak",
        ".last.pt.ab12cd34.TMP",
        "last.pt",
    ],
)
def test_matcher_rejects_every_other_name(name):
    assert not is_atomic_temp(name)


def test_matcher_can_be_limited_to_final_names():
    assert is_atomic_temp(".sweep.json.ab12cd34.tmp", final_names={"sweep.json"})
    assert not is_atomic_temp(".last.pt.ab12cd34.tmp", final_names={"sweep.json"})


def test_every_temp_name_the_writer_creates_matches(tmp_path):
    for i in range(50):
        with atomic_write(tmp_path / f"f{i}.json") as f:
            (temp,) = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            assert is_atomic_temp(temp, final_names={f"f{i}.json"}), temp
            f.write("{}")
    assert len(list(tmp_path.iterdir())) == 50


def _touch(path, size=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_removes_abandoned_temps_and_nothing_else(tmp_path, capsys):
    top = _touch(tmp_path / ".last.pt.ab12cd34.tmp", 2_500_000)
    deep = _touch(tmp_path / "checkpoints" / ".best.pt.zz_9zz9z.tmp")
    keep = [
        _touch(tmp_path / name)
        for name in (".notes.tmp", "x.tmp", ".last.pt.tmp", "last.pt", ".last.pt.AB12CD34.tmp")
    ]
    (tmp_path / ".d.ab12cd34.tmp").mkdir()  # a folder, not a write's temp file
    (tmp_path / ".l.ab12cd34.tmp").symlink_to(keep[-2])  # a link is never followed

    assert remove_stale_temps(tmp_path) == [top]
    out = capsys.readouterr().out
    assert out == (
        f"removed 1 temporary file left by an interrupted write in {tmp_path}: "
        ".last.pt.ab12cd34.tmp (2.5 MB)\n"
    )
    assert deep.exists()  # not recursive
    assert remove_stale_temps(tmp_path, recursive=True, announce=False) == [deep]
    assert capsys.readouterr().out == ""
    assert all(p.exists() for p in keep)
    assert (tmp_path / ".d.ab12cd34.tmp").is_dir() and (tmp_path / ".l.ab12cd34.tmp").is_symlink()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_final_names_limit_what_is_removed(tmp_path):
    ours = _touch(tmp_path / ".cmds.txt.ab12cd34.tmp")
    theirs = _touch(tmp_path / ".other.txt.ab12cd34.tmp")
    assert remove_stale_temps(tmp_path, final_names={"cmds.txt"}) == [ours]
    assert theirs.exists()


def test_a_running_write_keeps_its_temp_file(tmp_path):
    """The writer's flock marks its temp file as in use; a cleaner must leave it alone
    (here in the same process; tests/test_train.py does it across processes)."""
    path = tmp_path / "summary.json"
    with atomic_write(path) as f:
        f.write('{"a": ')
        assert remove_stale_temps(tmp_path, recursive=True) == []
        f.write("1}")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_temp_file_taken_by_a_cleaner_before_the_lock_is_replaced(tmp_path, monkeypatch):
    """A cleaner may remove a new temp file between its creation and the writer's lock;
    the writer must notice and start again, not write into a removed file."""
    original = tempfile.mkstemp
    made = []

    def mkstemp_then_cleaner(**kwargs):
        fd, name = original(**kwargs)
        made.append(name)
        if len(made) == 1:
            os.unlink(name)  # what remove_stale_temps does to an unlocked temp file
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_cleaner)
    write_text_atomic(tmp_path / "a.txt", "new")
    assert len(made) == 2 and (tmp_path / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_without_flock_only_temps_older_than_the_process_are_removed(tmp_path, monkeypatch):
    """Windows, or a file system without locks: age stands in for the writer's lock."""
    monkeypatch.setattr(atomic, "fcntl", None)
    old = _touch(tmp_path / ".a.json.ab12cd34.tmp")
    new = _touch(tmp_path / ".b.json.ab12cd34.tmp")
    os.utime(old, (atomic._STARTED - 60, atomic._STARTED - 60))
    assert remove_stale_temps(tmp_path, announce=False) == [old]
    assert new.exists()
