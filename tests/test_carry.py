"""vaeflow carry: a stopped run packed on one machine resumes on another, checked byte by byte."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from tests.test_train import _cfg
from vaeflow.cli import main as cli_main
from vaeflow.run.checkpoint import load_checkpoint
from vaeflow.run.train import train
from vaeflow.tools.carry import MANIFEST, PACK_SUFFIX, pack_run, read_pack, unpack_run


def _fake_run(root: Path, name: str = "vae_k1", step: int = 20) -> Path:
    run = root / "burda_long" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"train": {"steps": 40}}')
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "train/loss_nats": 1.0}) for s in (10, step)) + "\n{tru"
    )
    (run / "checkpoints" / "last.pt").write_bytes(bytes(range(256)) * 40)
    (run / "checkpoints" / ".last.pt.abcd1234.tmp").write_bytes(b"half a write")
    return run


def _files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_pack_unpack_round_trip(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "m1")
    pack = pack_run(run, tmp_path / "in_flight")
    assert pack == tmp_path / "in_flight" / "burda_long" / f"vae_k1{PACK_SUFFIX}"
    manifest, files = read_pack(pack)
    assert manifest["sweep"] == "burda_long" and manifest["run"] == "vae_k1"
    assert manifest["step"] == 20  # the truncated last line is skipped, as the run does
    assert ".last.pt.abcd1234.tmp" not in " ".join(files)  # an interrupted write stays behind
    out = unpack_run(pack, tmp_path / "m2")
    assert out == tmp_path / "m2" / "burda_long" / "vae_k1"
    expected = {k: v for k, v in _files(run).items() if not k.endswith(".tmp")}
    assert _files(out) == expected
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_unpack_refuses_to_replace_a_run_unless_forced(tmp_path: Path) -> None:
    pack = pack_run(_fake_run(tmp_path / "m1", step=20), tmp_path / "packs")
    newer = _fake_run(tmp_path / "m2", step=30)
    before = _files(newer)
    with pytest.raises(FileExistsError, match="last logged step 30; the pack's is 20"):
        unpack_run(pack, tmp_path / "m2")
    assert _files(newer) == before
    unpack_run(pack, tmp_path / "m2", force=True)
    assert json.loads((newer / "metrics.jsonl").read_text().splitlines()[1])["step"] == 20
    assert sorted(p.name for p in newer.parent.iterdir()) == ["vae_k1"]


def _rewrite(pack: Path, change) -> None:  # noqa: ANN001
    with tarfile.open(pack, "r:gz") as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar]
    with tarfile.open(pack, "w:gz") as tar:
        for info, data in change(members):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_corrupt_or_foreign_pack_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    pack = pack_run(_fake_run(tmp_path / "m1"), tmp_path / "packs")
    good = pack.read_bytes()
    flip = lambda ms: [(i, d[:-1] + b"X" if i.name.endswith("last.pt") else d) for i, d in ms]  # noqa: E731

    def manifest(**kw: object):  # noqa: ANN202
        def change(ms):  # noqa: ANN001, ANN202
            return [
                (i, json.dumps({**json.loads(d), **kw}).encode() if i.name == MANIFEST else d)
                for i, d in ms
            ]

        return change

    cases = {
        "checkpoints/last.pt does not match its SHA-256": flip,
        "metrics.jsonl is in the manifest but not in the pack": lambda ms: [
            (i, d) for i, d in ms if i.name != "run/metrics.jsonl"
        ],
        "extra.txt is in the pack but not in its manifest": lambda ms: [
            *ms,
            (tarfile.TarInfo("run/extra.txt"), b"x"),
        ],
        r"member '../escape' is not a file inside the run": lambda ms: [
            *ms,
            (tarfile.TarInfo("../escape"), b"x"),
        ],
        "member 'elsewhere.txt' is not a file inside the run": lambda ms: [
            *ms,
            (tarfile.TarInfo("elsewhere.txt"), b"x"),
        ],
        f"no {MANIFEST}": lambda ms: [(i, d) for i, d in ms if i.name != MANIFEST],
        # the manifest names the folders the run goes to: never a path out of the root
        "sweep '..' and run 'vae_k1' must be plain folder names": manifest(sweep=".."),
        "sweep '/tmp/x' and run": manifest(sweep="/tmp/x"),
        "run '' must be plain": manifest(run=""),
        "run 'a/../../b' must be plain": manifest(run="a/../../b"),
    }
    for message, change in cases.items():
        pack.write_bytes(good)
        _rewrite(pack, change)
        with pytest.raises(ValueError, match=message):
            unpack_run(pack, tmp_path / "m2")
        assert not (tmp_path / "m2").exists() or not any((tmp_path / "m2").rglob("*.pt"))
    pack.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable run pack"):
        unpack_run(pack, tmp_path / "m2")
    # a flipped bit in the compressed stream: zlib's or gzip's error or a checksum's,
    # never a traceback; a flip that only touches the tar's zero padding (which tarfile
    # never reads back) still gives the run's exact files
    original = _files(tmp_path / "m1" / "burda_long" / "vae_k1")
    expected = {k: v for k, v in original.items() if not k.endswith(".tmp")}
    refused = 0
    for n, at in enumerate(range(20, len(good) - 8, max(1, len(good) // 40))):
        pack.write_bytes(good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1 :])
        try:
            out = unpack_run(pack, tmp_path / f"flip{n}")
        except ValueError as e:
            assert re.search("not a readable run pack|SHA-256|manifest", str(e)), e
            refused += 1
        else:
            assert _files(out) == expected
    assert refused > 0
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        pack_run(tmp_path, tmp_path / "packs")


def test_a_carried_run_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped at step 25 on one machine (checkpoint at 20), packed, unpacked under another
    run root and resumed there: bit for bit the run trained in one go."""
    cfg = _cfg("train.steps=40", "train.val_every=20", "train.ckpt_every=10")
    train(cfg, tmp_path / "whole" / "sweep" / "r")
    first = tmp_path / "machine1" / "sweep" / "r"
    train(cfg, first, stop_after_step=25)
    assert cli_main(["carry", "pack", str(first), "-o", str(tmp_path / "packs")]) == 0
    assert (
        cli_main(["carry", "unpack", str(tmp_path / "packs"), "--root", str(tmp_path / "m2")]) == 0
    )
    carried = tmp_path / "m2" / "sweep" / "r"
    train(cfg, carried, resume=True)
    a = load_checkpoint(tmp_path / "whole/sweep/r/checkpoints/last.pt")
    b = load_checkpoint(carried / "checkpoints/last.pt")
    assert a["step"] == b["step"] == 40
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # the CLI's errors are one line, not a traceback
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / f"x{PACK_SUFFIX}").write_bytes(b"not gzip")
    with pytest.raises(SystemExit, match="vaeflow carry: error: .*not a readable run pack"):
        cli_main(["carry", "unpack", str(tmp_path / "bad"), "--root", str(tmp_path / "m3")])


def test_packs_are_reproducible_and_leave_packs_out(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "m1")
    first = pack_run(run, tmp_path / "a").read_bytes()
    (run / f"old{PACK_SUFFIX}").write_bytes(b"a pack written into the run")
    assert pack_run(run, tmp_path / "b").read_bytes() == first


def test_a_failed_forced_unpack_puts_the_old_run_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack = pack_run(_fake_run(tmp_path / "m1", step=20), tmp_path / "packs")
    there = _fake_run(tmp_path / "m2", step=30)
    before = _files(there)
    rename = Path.rename

    def failing(self: Path, target: Path) -> Path:
        if self.name.endswith(".unpack"):
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        unpack_run(pack, tmp_path / "m2", force=True)
    assert _files(there) == before
    assert sorted(p.name for p in there.parent.iterdir()) == ["vae_k1"]
