"""Data loading: splits, root resolution, missing-data errors, CIFAR-10 packing, binarisation
and the deterministic training batches."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from vaeflow import data
from vaeflow.data import (
    DatasetNotFoundError,
    DataSplits,
    TrainBatches,
    batches,
    binarize,
    eval_batches,
    fixed_seed_binarize,
    load_splits,
    pack_cifar10,
    prepare_eval,
    resolve_data_root,
    to_unit_interval,
)

DATA = Path(
    os.environ.get("VAEFLOW_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets"
).resolve()


@pytest.fixture(scope="module")
def mnist() -> DataSplits:
    return load_splits("mnist", DATA)


@pytest.fixture(scope="module")
def cifar() -> DataSplits:
    return load_splits("cifar10", DATA)


# ----- root resolution -------------------------------------------------------------------


def test_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAEFLOW_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.setenv("VAEFLOW_DATA", "")  # empty counts as unset
    assert resolve_data_root(None) == Path("data")
    monkeypatch.delenv("VAEFLOW_DATA")
    assert resolve_data_root(None) == Path("data")
    assert resolve_data_root("~/x") == Path.home() / "x"


def test_env_var_is_used_by_load_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEFLOW_DATA", str(DATA))
    assert load_splits("mnist", val_size=100).val.shape[0] == 100


# ----- splits on the real data -------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_splits(name: str, mnist: DataSplits) -> None:
    s = mnist if name == "mnist" else load_splits(name, DATA)
    assert (s.name, s.kind, s.x_shape, s.notes) == (name, "binary", (1, 28, 28), [])
    for x, n in ((s.train, 50000), (s.val, 10000), (s.test, 10000)):
        assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 1, 28, 28)
    assert int(s.train.max()) == 255 and int(s.train.min()) == 0


@pytest.mark.parametrize(("name", "cls"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_split_is_the_documented_one(name: str, cls: str, mnist: DataSplits) -> None:
    """train = first 50k of the training file, val = last 10k, test = the test file,
    checked against torchvision's own loader by index."""
    s = mnist if name == "mnist" else load_splits(name, DATA)
    tv_cls = getattr(torchvision.datasets, cls)
    tv_train = tv_cls(str(DATA), train=True, download=False).data
    tv_test = tv_cls(str(DATA), train=False, download=False).data
    for i in (0, 1, 49999):
        assert torch.equal(s.train[i, 0], tv_train[i])
    for i in (50000, 50001, 59999):
        assert torch.equal(s.val[i - 50000, 0], tv_train[i])
    for i in (0, 9999):
        assert torch.equal(s.test[i, 0], tv_test[i])
    assert np.asarray(tv_cls(str(DATA), train=True)[50000][0]).tolist() == s.val[0, 0].tolist()


def test_cifar10_splits_and_partial_test_note(cifar: DataSplits) -> None:
    assert (cifar.kind, cifar.x_shape) == ("8bit", (3, 32, 32))
    for x, n in ((cifar.train, 45000), (cifar.val, 5000), (cifar.test, 1000)):
        assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 3, 32, 32)
    assert len(cifar.notes) == 1 and "first 1000 of 10000" in cifar.notes[0]
    with np.load(DATA / "CIFAR10" / "cifar10_train.npz") as z:
        x = z["x"]
    # HWC file -> CHW tensor; val is the end of the training file.
    assert torch.equal(cifar.val[0], torch.from_numpy(x[45000]).permute(2, 0, 1))
    assert torch.equal(cifar.train[7], torch.from_numpy(x[7]).permute(2, 0, 1))


def test_val_size_is_configurable() -> None:
    s = load_splits("mnist", DATA, val_size=0)
    assert (s.train.shape[0], s.val.shape[0]) == (60000, 0)
    s = load_splits("mnist", DATA, val_size=123)
    assert (s.train.shape[0], s.val.shape[0]) == (60000 - 123, 123)
    with pytest.raises(ValueError, match=r"val_size=60000.*\[0, 60000\)"):
        load_splits("mnist", DATA, val_size=60000)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10"):
        load_splits("svhn", DATA)


# ----- missing data ------------------------------------------------------------------------


def test_missing_data_error_names_files_root_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("mnist", tmp_path, download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "'mnist'" in msg and str(tmp_path) in msg and "data_root argument" in msg
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte") in msg
    assert "download=False" in msg and "VAEFLOW_DATA" in msg and "--data-root" in msg

    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("cifar10", tmp_path)
    msg = str(info.value)
    for f in ("cifar10_train.npz", "cifar10_test.npz", "data_batch_1", "test_batch"):
        assert f in msg
    assert "vaeflow data pack" in msg and "first 1000" in msg


def test_missing_data_error_says_how_root_was_resolved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VAEFLOW_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"\$VAEFLOW_DATA"):
        load_splits("fashion_mnist")
    monkeypatch.delenv("VAEFLOW_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"default \./data"):
        load_splits("fashion_mnist")


def test_failed_download_ends_in_the_same_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(name: str, root: Path) -> None:
        raise OSError("[Errno -2] Name or service not known")

    with pytest.raises(DatasetNotFoundError) as info:
        load_splits("mnist", tmp_path, download=True, downloader=offline)
    msg = str(info.value)
    assert "tried and failed (OSError: [Errno -2] Name or service not known)" in msg
    assert "train-images-idx3-ubyte" in msg

    # The default path calls torchvision's download (replaced here: no network in tests).
    calls = []

    class FakeTorchvisionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeTorchvisionMNIST)
    with pytest.raises(DatasetNotFoundError, match=r"tried and failed \(RuntimeError: Error"):
        load_splits("mnist", tmp_path, download=True)
    assert calls == [(str(tmp_path), True)]


def _write_idx(path: Path, images: np.ndarray, compress: bool) -> None:
    n, h, w = images.shape
    raw = b"".join(v.to_bytes(4, "big") for v in (2051, n, h, w)) + images.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_successful_download_is_loaded_and_corrupt_idx_is_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)

    def fake_download(name: str, root: Path) -> None:
        raw = root / "MNIST" / "raw"
        _write_idx(raw / "train-images-idx3-ubyte", train, compress=False)
        _write_idx(raw / "t10k-images-idx3-ubyte", test, compress=True)  # .gz is read too

    s = load_splits("mnist", tmp_path, val_size=10, download=True, downloader=fake_download)
    assert torch.equal(s.train[:, 0], torch.from_numpy(train[:20]))
    assert torch.equal(s.val[:, 0], torch.from_numpy(train[20:]))
    assert torch.equal(s.test[:, 0], torch.from_numpy(test))

    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_splits("mnist", tmp_path, val_size=10)


# ----- CIFAR-10 packing ------------------------------------------------------------------


def _fake_cifar_batches(root: Path, n_train: int = 4, n_test: int = 3) -> tuple:
    """A tiny cifar-10-batches-py in the real format: protocol-2 pickles of dicts with bytes
    keys, ``data`` uint8 (N, 3072) (R, G, B planes) and ``labels`` a list of ints."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = n_test if fname == "test_batch" else n_train
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        entry = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n)],
        }
        with open(d / fname, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        xs.append(x)
        ys.append(y)
    meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n_train}
    with open(d / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.asarray(ys[5])


def test_pack_cifar10_round_trip(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = _fake_cifar_batches(tmp_path / "src")
    # What a pack killed while writing leaves; a file of someone else's stays.
    (tmp_path / "dst" / "CIFAR10").mkdir(parents=True)
    (tmp_path / "dst" / "CIFAR10" / ".cifar10_train.npz.ab12cd34.tmp").write_bytes(b"x")
    (tmp_path / "dst" / "CIFAR10" / ".other.npz.ab12cd34.tmp").write_bytes(b"x")
    paths = pack_cifar10(tmp_path / "src", tmp_path / "dst")
    assert paths == [
        tmp_path / "dst" / "CIFAR10" / "cifar10_train.npz",
        tmp_path / "dst" / "CIFAR10" / "cifar10_test.npz",
    ]
    # No temp file left, the stale one removed.
    assert [p.name for p in (tmp_path / "dst" / "CIFAR10").glob("*.tmp")] == [
        ".other.npz.ab12cd34.tmp"
    ]
    with np.load(paths[0]) as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (20, 32, 32, 3)
        # HWC: channel c of image 5 is the c-th 1024-value plane of its row.
        for c in range(3):
            assert np.array_equal(
                z["x"][5, :, :, c], x_train[5, c * 1024 : (c + 1) * 1024].reshape(32, 32)
            )
        assert np.array_equal(z["y"], y_train.astype(np.uint8))
    with np.load(paths[1]) as z:
        assert np.array_equal(z["y"], y_test.astype(np.uint8))

    want_train = torch.from_numpy(x_train.reshape(20, 3, 32, 32))
    want_test = torch.from_numpy(x_test.reshape(3, 3, 32, 32))
    # The packed layout, and the batches layout read directly, give the same splits.
    for root in (tmp_path / "dst", tmp_path / "src"):
        s = load_splits("cifar10", root, val_size=6)
        assert torch.equal(s.train, want_train[:14]) and torch.equal(s.val, want_train[14:])
        assert torch.equal(s.test, want_test)
        assert s.notes == [
            "CIFAR-10 test split: only the first 3 of 10000 images (packed npz); test numbers "
            "are on this subset"
        ]
    # The batches folder itself is accepted as the source too.
    assert pack_cifar10(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "dst2")


def test_pack_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        pack_cifar10(tmp_path, tmp_path / "dst")
    _fake_cifar_batches(tmp_path / "src")
    # A pickle that would run code is refused, not executed.
    with open(tmp_path / "src" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays are allowed"):
        pack_cifar10(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst" / "CIFAR10" / "cifar10_train.npz").exists()


# ----- preprocessing -----------------------------------------------------------------------


def test_binarize_statistics(mnist: DataSplits) -> None:
    x = mnist.test[:2000]
    b = binarize(x, torch.Generator().manual_seed(3))
    assert b.dtype == torch.float32 and b.shape == x.shape
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    # Bernoulli(x/255): the mean over 1.6M pixels matches within ~10 standard errors.
    assert abs(b.mean().item() - x.double().mean().item() / 255) < 4e-3
    assert (b[x == 0] == 0).all() and (b[x == 255] == 1).all()
    # Per-intensity check on mid-grey pixels: P(1) = k/255.
    mid = (x > 100) & (x < 160)
    assert abs(b[mid].mean().item() - x[mid].double().mean().item() / 255) < 1e-2
    with pytest.raises(TypeError, match="uint8"):
        binarize(x.float() / 255)


def test_eval_binarisation_is_fixed(mnist: DataSplits) -> None:
    x = mnist.val[:500]
    a = prepare_eval(x, "binary", "dynamic", seed=0)
    torch.manual_seed(123)  # the global RNG must not matter
    b = prepare_eval(x, "binary", "dynamic", seed=0)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a, prepare_eval(x, "binary", "dynamic", seed=1))
    # Same evaluation bits under fixed-seed training, and fixed_seed_binarize agrees with them.
    assert torch.equal(a, prepare_eval(x, "binary", "fixed_seed", seed=0))
    small = DataSplits(mnist.train[:50], x, x, (1, 28, 28), "binary", "mnist")
    st = fixed_seed_binarize(small, seed=0)
    assert torch.equal(to_unit_interval(st.val), a)
    assert torch.equal(prepare_eval(st.test, "binary", "fixed_seed", seed=0), a)  # idempotent
    assert "fixed-seed binarisation" in st.notes[-1]


def test_8bit_preprocessing_is_the_k_over_255_grid(cifar: DataSplits) -> None:
    x = cifar.test[:10]
    y = prepare_eval(x, "8bit", seed=0)
    assert torch.equal(y, to_unit_interval(x)) and y.dtype == torch.float32
    assert torch.equal((y * 255).round().to(torch.uint8), x)
    assert y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="fixed_seed_binarize.*8bit"):
        fixed_seed_binarize(cifar, 0)


def test_eval_batches_in_order() -> None:
    x = torch.arange(23.0).reshape(23, 1)
    parts = list(eval_batches(x, 10))
    assert [p.shape[0] for p in parts] == [10, 10, 3]
    assert torch.equal(torch.cat(parts), x)


# ----- training batches --------------------------------------------------------------------


def _indexed_images(n: int) -> torch.Tensor:
    """uint8 images whose pixel (0, 0, 0) is their index, to identify them in a batch."""
    x = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return x


def test_train_batches_cover_each_example_once_per_epoch() -> None:
    x = _indexed_images(23)
    tb = TrainBatches(x, 5, seed=7, kind="8bit", drop_last=False)
    assert tb.steps_per_epoch == 5
    for epoch in range(2):
        steps = range(epoch * 5, epoch * 5 + 5)
        ids = torch.cat([(tb.batch(s)[:, 0, 0, 0] * 255).round().long() for s in steps])
        assert sorted(ids.tolist()) == list(range(23))
        assert torch.equal(ids, tb.epoch_permutation(epoch))
    assert not torch.equal(tb.epoch_permutation(0), tb.epoch_permutation(1))

    tb = TrainBatches(x, 5, seed=7, kind="8bit")  # drop_last: 4 full batches, no repeats
    ids = torch.cat([tb.indices(s) for s in range(tb.steps_per_epoch)])
    assert tb.steps_per_epoch == 4 and len(set(ids.tolist())) == 20
    with pytest.raises(ValueError, match="drop_last=False"):
        TrainBatches(x, 24, seed=0, kind="8bit")


def test_train_batches_resume_is_bit_exact(mnist: DataSplits) -> None:
    x = mnist.train[:300]
    a = TrainBatches(x, 64, seed=5, kind="binary")
    seen = [a.batch(s) for s in range(12)]  # crosses epoch boundaries (4 steps per epoch)
    b = TrainBatches(x, 64, seed=5, kind="binary")  # "resumed" object
    for s in (9, 3, 11, 0):  # any order: the batch is a function of (seed, step) only
        assert torch.equal(b.batch(s), seen[s])
    assert not torch.equal(TrainBatches(x, 64, seed=6, kind="binary").batch(0), seen[0])


def test_dynamic_binarisation_differs_between_steps(mnist: DataSplits) -> None:
    # One image repeated: every permutation gives the same uint8 batch, so any difference
    # between steps comes from the binarisation.
    x = mnist.train[:1].expand(64, -1, -1, -1).contiguous()
    tb = TrainBatches(x, 64, seed=0, kind="binary")
    b0, b1 = tb.batch(0), tb.batch(1)
    assert not torch.equal(b0, b1)
    assert set(b0.unique().tolist()) == {0.0, 1.0}
    p = x[0].double() / 255
    assert abs(b0.double().mean(0) - p).mean() < 0.1  # 64 draws per pixel

    st = TrainBatches(x, 64, seed=0, kind="binary", binarization="fixed_seed")
    # Fixed bits per example: epochs 0 and 1 (one step each) hold the same examples, in
    # another order; sorted by example index they are identical.
    s0 = st.batch(0)[st.indices(0).argsort()]
    s1 = st.batch(1)[st.indices(1).argsort()]
    assert not torch.equal(st.indices(0), st.indices(1)) and torch.equal(s0, s1)


def test_fixed_seed_train_batches_match_fixed_seed_binarize(mnist: DataSplits) -> None:
    small = DataSplits(
        mnist.train[:100], mnist.val[:10], mnist.test[:10], (1, 28, 28), "binary", "mnist"
    )
    st = fixed_seed_binarize(small, seed=4)
    for data_in in (small.train, st.train):  # raw or already binarised: same batches
        tb = TrainBatches(data_in, 32, seed=4, kind="binary", binarization="fixed_seed")
        for s in (0, 5):
            assert torch.equal(tb.batch(s), to_unit_interval(st.train[tb.indices(s)]))


def test_train_batches_validate_arguments() -> None:
    x = _indexed_images(10)
    with pytest.raises(TypeError, match="uint8"):
        TrainBatches(x.float(), 2, seed=0, kind="8bit")
    with pytest.raises(ValueError, match="binarization='random'"):
        TrainBatches(x, 2, seed=0, kind="binary", binarization="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind='float'"):
        TrainBatches(x, 2, seed=0, kind="float")  # type: ignore[arg-type]


def test_derived_seeds_are_pinned() -> None:
    # Pinned values: a change here silently changes every run's data order, so old
    # checkpoints would resume onto a different stream.
    assert batches._derive_seed(0, "perm", 0) == 5539632741979705871
    assert batches._derive_seed(0, "perm", 1) != batches._derive_seed(1, "perm", 0)
    perm = TrainBatches(_indexed_images(10), 10, 0, "8bit").epoch_permutation(0)
    assert perm.tolist() == [8, 1, 0, 9, 3, 2, 5, 7, 4, 6]


def test_cli_data_pack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vaeflow.cli import main

    _, _, x_test, _ = _fake_cifar_batches(tmp_path / "src")
    assert main(["data", "pack", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert "cifar10_test.npz" in capsys.readouterr().out
    packed = np.load(tmp_path / "dst" / "CIFAR10" / "cifar10_test.npz")
    assert packed["x"].shape == (3, 32, 32, 3)
    assert np.array_equal(packed["x"], x_test.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))


# ----- binarized MNIST (Larochelle & Murray's static binarisation) -----------------------

# sha256 of the decompressed originals (shared/datasets/PROVENANCE.md; TensorFlow Datasets
# records the same for the download from Larochelle's page).
_AMAT_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}


def _amat_text(bits: np.ndarray, newline: str = "\n") -> bytes:
    return "".join(" ".join(map(str, row)) + newline for row in bits).encode()


def _write_amat(root: Path, sizes: dict[str, int], gz: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "BinarizedMNIST"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in sizes.items():
        bits = (rng.random((n, 784)) < 0.3).astype(np.uint8)
        arrays[split] = bits
        path = folder / f"binarized_mnist_{split}.amat"
        if gz:
            with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
                f.write(_amat_text(bits))
        else:
            path.write_bytes(_amat_text(bits))
    return arrays


def test_parse_amat_layouts_and_errors() -> None:
    bits = (np.random.default_rng(1).random((3, 784)) < 0.5).astype(np.uint8)
    expected = torch.from_numpy(bits * 255).reshape(3, 1, 28, 28)
    assert torch.equal(data.parse_amat(_amat_text(bits)), expected)  # the original layout
    crlf = _amat_text(bits, "\r\n")  # another layout goes through the general parser
    assert torch.equal(data.parse_amat(crlf), expected)
    assert torch.equal(data.parse_amat(_amat_text(bits)[:-1]), expected)  # no final newline
    bad = bits.copy()
    bad[1, 5] = 2
    with pytest.raises(ValueError, match="other than 0 and 1"):
        data.parse_amat(_amat_text(bad), "f.amat")
    with pytest.raises(ValueError, match="line 2 has 783 values"):
        data.parse_amat(_amat_text(bits[:1]) + _amat_text(bits[:1, :-1]), "f.amat")
    with pytest.raises(ValueError, match="values other than 0 and 1 \\(or no images\\)"):
        data.parse_amat(b"", "f.amat")


@pytest.mark.parametrize("gz", [False, True])
def test_binarized_mnist_splits_from_files(tmp_path: Path, gz: bool) -> None:
    arrays = _write_amat(tmp_path, {"train": 7, "valid": 3, "test": 4}, gz=gz)
    s = load_splits("binarized_mnist", tmp_path, val_size=3)
    as_uint8 = {k: torch.from_numpy(v * 255).reshape(-1, 1, 28, 28) for k, v in arrays.items()}
    # val_size = the valid file's size: validation is exactly the valid file.
    assert torch.equal(s.train, as_uint8["train"]) and torch.equal(s.val, as_uint8["valid"])
    assert torch.equal(s.test, as_uint8["test"])
    assert s.kind == "binary" and s.name == "binarized_mnist"
    assert any("sorted by digit class" in n for n in s.notes)
    assert any("not the standard 50000 / 10000 / 10000" in n for n in s.notes)
    full = load_splits("binarized_mnist", tmp_path, val_size=0)  # train on train + valid
    assert torch.equal(full.train, torch.cat([as_uint8["train"], as_uint8["valid"]]))
    assert full.val.shape[0] == 0
    # Used as they are: training batches and evaluation data are the files' bits.
    x_eval = prepare_eval(s.test, "binary", "given", seed=5)
    assert torch.equal(x_eval, as_uint8["test"].float() / 255)
    tb = TrainBatches(s.train, 7, seed=3, kind="binary", binarization="given")
    assert torch.equal(tb.batch(0), as_uint8["train"][tb.indices(0)].float() / 255)


def test_given_binarization_rejects_grey_images(mnist: DataSplits) -> None:
    with pytest.raises(ValueError, match='binarization="given" needs images that are binary'):
        TrainBatches(mnist.train[:64], 8, seed=0, kind="binary", binarization="given")
    with pytest.raises(ValueError, match="these are grey"):
        prepare_eval(mnist.test[:8], "binary", "given")


def test_binarized_mnist_missing_files_name_the_expected_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        load_splits("binarized_mnist", tmp_path)
    message = str(e.value)
    for split in ("train", "valid", "test"):
        assert str(tmp_path / "BinarizedMNIST" / f"binarized_mnist_{split}.amat") in message

    # A download that fails (no network here) ends in the same clear error.
    def failing(name: str, root: Path) -> None:
        raise OSError("no route to host")

    with pytest.raises(DatasetNotFoundError, match="tried and failed.*no route to host"):
        load_splits("binarized_mnist", tmp_path, download=True, downloader=failing)


def test_binarized_mnist_download_checks_each_file_before_saving_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real download path with urlopen served locally: each file is fetched from the
    published folder, saved only when its sha256 is the original's, and a changed file is
    rejected with nothing written."""
    import hashlib
    import io
    import urllib.request

    from vaeflow.data import datasets as ds

    served = {
        f"binarized_mnist_{s}.amat": f"{s} rows\n".encode() for s in ("train", "valid", "test")
    }
    asked: list[str] = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        asked.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(
        ds,
        "_AMAT_SHA256",
        {
            s: hashlib.sha256(f"{s} rows\n".encode()).hexdigest()
            for s in ("train", "valid", "test")
        },
    )
    ds._binarized_mnist_download(tmp_path)
    assert asked == [ds._AMAT_URL + name for name in served]
    for name, content in served.items():
        assert (tmp_path / "BinarizedMNIST" / name).read_bytes() == content
    # A file that is not the original: refused, and nothing is saved.
    other = tmp_path / "other"
    served["binarized_mnist_train.amat"] = b"changed\n"
    with pytest.raises(ValueError, match="binarized_mnist_train.amat has sha256 .* not saved"):
        ds._binarized_mnist_download(other)
    assert not any(p.is_file() for p in other.rglob("*"))


def test_binarized_mnist_is_the_standard_file(tmp_path: Path) -> None:
    """The shipped files decompress to the originals, and load as 50k / 10k / 10k."""
    import hashlib

    for split, digest in _AMAT_SHA256.items():
        with gzip.open(DATA / "BinarizedMNIST" / f"binarized_mnist_{split}.amat.gz") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    s = load_splits("binarized_mnist", DATA)
    assert [x.shape[0] for x in (s.train, s.val, s.test)] == [50000, 10000, 10000]
    assert not any("not the standard" in n for n in s.notes)
    # Mean pixel values as PROVENANCE.md records them: train 0.1306, valid 0.1311, test 0.1325.
    means = [round(float(x.float().mean() / 255), 4) for x in (s.train, s.val, s.test)]
    assert means == [0.1306, 0.1311, 0.1325]
    # It is not grey MNIST binarised here: a different set of bits from the fixed-seed draw.
    grey = load_splits("mnist", DATA)
    assert not torch.equal(s.test, data.fixed_binarize(grey.test, 0, "eval"))


def test_test_subset_is_fixed_random_and_sorted() -> None:
    idx, what = data.test_subset(10000, 500)
    again, _ = data.test_subset(10000, 500)
    assert torch.equal(idx, again) and what == "fixed random subset of 500 of 10000"
    assert idx.unique().numel() == 500 and torch.equal(idx, idx.sort().values)
    # Not the first 500 (the binarized_mnist test file is sorted by class): spread out.
    assert idx.max() > 9000 and idx.min() < 1000
    assert data.test_subset(10000, None) == (None, "all 10000")
    assert data.test_subset(100, 100) == (None, "all 100")


def test_train_batches_without_shuffle_visit_the_stored_order() -> None:
    """shuffle=False (the IWAE code's loop over its array): every epoch takes the examples
    in their stored order; dynamic binarisation is still a fresh draw per step."""
    x = torch.randint(0, 256, (20, 1, 2, 2), dtype=torch.uint8)
    tb = TrainBatches(x, 5, seed=3, kind="binary", shuffle=False)
    for step in range(8):  # two epochs of 4 steps
        i = step % 4
        assert tb.indices(step).tolist() == list(range(5 * i, 5 * i + 5))
    assert not torch.equal(tb.batch(0), tb.batch(4))  # same images, new bits
    shuffled = TrainBatches(x, 5, seed=3, kind="binary")
    assert shuffled.indices(0).tolist() != list(range(5)) or shuffled.indices(1).tolist() != list(
        range(5, 10)
    )


def test_data_shuffle_reaches_the_training_batches(tmp_path, monkeypatch) -> None:
    """data.shuffle in the config is what the training run's TrainBatches gets."""
    from vaeflow.config import load_config
    from vaeflow.run import train as train_mod

    seen = {}
    real = train_mod.TrainBatches

    def spy(*args, **kwargs):
        seen["shuffle"] = kwargs.get("shuffle")
        raise RuntimeError("stop after building the batches")

    monkeypatch.setattr(train_mod, "TrainBatches", spy)
    cfg = load_config(None, ["data.shuffle=false", "train.device=cpu"])
    x = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    splits = data.DataSplits(
        train=x, val=x[:8], test=x[:8], x_shape=(1, 28, 28), kind="binary", name="mnist"
    )
    with pytest.raises(RuntimeError, match="stop after"):
        train_mod.train(cfg, run_dir=tmp_path / "r", splits=splits)
    assert seen["shuffle"] is False
    assert real is not spy
